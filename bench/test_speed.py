"""pytest-benchmark suite: torch.nn and fastrnn side by side, one group per
cell, mode and shape (the shapes of `python -m fastrnn.bench`).

    pytest bench/                                  # CPU, or CUDA when present
    pytest bench/ --benchmark-json=out.json        # then: pytest-benchmark compare
    pytest bench/ -k "forward_backward and lstm and H64"

Not part of `make test`: timings are reported, never asserted.
"""

import pytest
import torch

import fastrnn
from fastrnn.bench import CELLS, layer_classes, named_shapes

DEVICE = "cuda" if torch.cuda.is_available() and fastrnn.cuda_built() else "cpu"
SHAPES = named_shapes(DEVICE)


def shape_id(s):
    return "C{}-H{}-L{}-N{}-T{}".format(*s)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def outputs(cell, out):
    y, h = out
    return [y, *h] if cell == "lstm" else [y, h]


@pytest.fixture(scope="module", params=[(c, s) for c in CELLS for s in SHAPES],
                ids=lambda p: f"{p[0]}-{shape_id(p[1])}")
def case(request):
    cell, (C, H, L, N, T) = request.param
    torch.manual_seed(0)
    ref_cls, fused_cls = layer_classes(cell)
    ref = ref_cls(C, H, L, device=DEVICE)
    ours = fused_cls(C, H, L, device=DEVICE, backend="fused")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, N, C, device=DEVICE, requires_grad=True)
    return request.param, {"torch.nn": ref, "fastrnn": ours}, x


@pytest.mark.parametrize("impl", ["torch.nn", "fastrnn"])
def test_forward(benchmark, case, impl):
    (cell, shape), modules, x = case
    m = modules[impl]
    benchmark.group = f"forward {cell} {shape_id(shape)} {DEVICE}"

    def run():
        with torch.no_grad():
            m(x)
        sync()

    benchmark(run)
    if impl == "fastrnn":
        assert m.last_path == "fused"


@pytest.mark.parametrize("impl", ["torch.nn", "fastrnn"])
def test_forward_backward(benchmark, case, impl):
    (cell, shape), modules, x = case
    m = modules[impl]
    benchmark.group = f"forward_backward {cell} {shape_id(shape)} {DEVICE}"

    def run():
        sum(t.sum() for t in outputs(cell, m(x))).backward()
        sync()

    benchmark(run)
