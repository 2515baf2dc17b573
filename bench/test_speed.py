"""pytest-benchmark suite: nn.RNN and fastrnn side by side, one group per shape.

    pytest bench/                                  # CPU, or CUDA when present
    pytest bench/ --benchmark-json=out.json        # then: pytest-benchmark compare
    pytest bench/ -k "forward_backward and H64"

Not part of `make test`: timings are reported, never asserted.
"""

import pytest
import torch
from torch import nn

import fastrnn

DEVICE = "cuda" if torch.cuda.is_available() and fastrnn.cuda_built() else "cpu"
if DEVICE == "cuda":
    SHAPES = [(9, 16, 1, 2, 5), (64, 64, 1, 8, 512), (64, 256, 1, 64, 512), (512, 1024, 1, 64, 512)]
else:
    SHAPES = [(9, 16, 1, 2, 5), (9, 16, 3, 2, 100), (32, 64, 1, 8, 256), (64, 256, 2, 32, 128),
              (256, 1024, 1, 16, 64)]


def shape_id(s):
    return "C{}-H{}-L{}-N{}-T{}".format(*s)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module", params=SHAPES, ids=shape_id)
def case(request):
    C, H, L, N, T = request.param
    torch.manual_seed(0)
    ref = nn.RNN(C, H, L, device=DEVICE)
    ours = fastrnn.RNN(C, H, L, device=DEVICE, backend="fused")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, N, C, device=DEVICE, requires_grad=True)
    return request.param, {"nn.RNN": ref, "fastrnn": ours}, x


@pytest.mark.parametrize("impl", ["nn.RNN", "fastrnn"])
def test_forward(benchmark, case, impl):
    shape, modules, x = case
    m = modules[impl]
    benchmark.group = f"forward {shape_id(shape)} {DEVICE}"

    def run():
        with torch.no_grad():
            m(x)
        sync()

    benchmark(run)
    if impl == "fastrnn":
        assert m.last_path == "fused"


@pytest.mark.parametrize("impl", ["nn.RNN", "fastrnn"])
def test_forward_backward(benchmark, case, impl):
    shape, modules, x = case
    m = modules[impl]
    benchmark.group = f"forward_backward {shape_id(shape)} {DEVICE}"

    def run():
        y, h = m(x)
        (y.sum() + h.sum()).backward()
        sync()

    benchmark(run)
