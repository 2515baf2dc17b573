"""Installing and using fastrnn like a well-kept torch extension: the build's
record of what it was built for and the check at import, python -m
fastrnn.info, a build without torch, the whole-model switch, kernel logging
and the extension missing under torch.compile."""

import logging
import os
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

import fastrnn
from fastrnn import _ops
from helpers import LAYERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_info_records_this_torch():
    info = _ops._built_for()
    assert info is not None, "the build writes fastrnn/_build_info.py beside the extension"
    assert info.version == fastrnn.__version__
    assert (info.torch, info.torch_cuda) == (torch.__version__, torch.version.cuda)
    assert info.cuda == fastrnn.cuda_built()
    assert _ops._torch_mismatch(info) is None


def test_mismatch_message_says_what_and_how():
    # A torch that is not the running one, whichever that is.
    built = types.SimpleNamespace(torch="2.0.0+cu117", torch_cuda="11.7")
    message = _ops._torch_mismatch(built)
    assert message.startswith("fastrnn's extension was built for PyTorch 2.0.0+cu117 with CUDA 11.7, "
                              f"and this is PyTorch {torch.__version__} with CUDA {torch.version.cuda}")
    assert "pip install --no-build-isolation ." in message


def test_info_module_reports_the_build():
    # The fastrnn under test (the checkout's, or a build directory's), not
    # whichever the working directory holds: -P keeps it off sys.path.
    here = os.path.dirname(os.path.dirname(os.path.abspath(fastrnn.__file__)))
    out = subprocess.run([sys.executable, "-P", "-m", "fastrnn.info"], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, PYTHONPATH=here))
    assert out.returncode == 0, out.stderr
    assert f"fastrnn {fastrnn.__version__}" in out.stdout
    assert "extension: loaded" in out.stdout
    assert f"built for: torch {torch.__version__}" in out.stdout


def test_build_without_torch_says_how_to_install():
    """pip's isolated build environment has no torch: setup.py stops with the
    command that works instead of building against some other torch."""
    base = getattr(sys, "_base_executable", sys.executable)
    has = subprocess.run([base, "-I", "-c", "import torch, setuptools"], capture_output=True)
    if has.returncode == 0:
        pytest.skip("the base interpreter has torch")
    if subprocess.run([base, "-I", "-c", "import setuptools"], capture_output=True).returncode:
        pytest.skip("the base interpreter has no setuptools")
    out = subprocess.run([base, "-I", "setup.py", "build_ext"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert "no torch can be imported in this build environment" in out.stderr
    assert "pip install --no-build-isolation ." in out.stderr


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.LSTM(3, 8, 2, batch_first=True, bidirectional=True, proj_size=4)
        self.mid = nn.Sequential(nn.GRU(8, 6), nn.Identity())
        self.rnn = nn.RNN(6, 5, nonlinearity="relu", bias=False)
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        y, _ = self.enc(x)
        y, _ = self.mid[0](y)
        y, _ = self.rnn(y)
        return self.head(y)


class Custom(nn.GRU):
    pass


def test_replace_rnn_swaps_every_layer_in_place_keeping_its_parameters():
    model = Model()
    model.custom = Custom(2, 2)
    model = model.double().eval()
    params = dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    expected = model(x)
    assert fastrnn.replace_rnn(model) is model
    assert type(model.enc) is fastrnn.LSTM and model.enc.proj_size == 4
    assert type(model.mid[0]) is fastrnn.GRU
    assert type(model.rnn) is fastrnn.RNN and model.rnn.nonlinearity == "relu"
    assert type(model.custom) is Custom, "a subclass keeps its own forward"
    assert not model.enc.training
    assert dict(model.named_parameters()).keys() == params.keys()
    for name, p in model.named_parameters():
        assert p is params[name] and p.dtype == torch.float64
    assert optimizer.param_groups[0]["params"][0] is model.enc.weight_ih_l0
    with fastrnn.use_backend("fused"):
        got = model(x)
    assert model.enc.last_path == model.rnn.last_path == "fused"
    torch.testing.assert_close(got, expected)


def test_replace_rnn_of_a_layer_returns_its_twin_with_hooks():
    calls = []
    layer = nn.RNN(3, 4)
    layer.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    twin = fastrnn.replace_rnn(layer, backend="fused")
    assert type(twin) is fastrnn.RNN and twin.backend == "fused"
    twin(torch.randn(2, 1, 3))
    assert calls == ["RNN"] and twin.last_path == "fused"
    with pytest.raises(ValueError, match="Unknown backend 'fast'"):
        fastrnn.replace_rnn(nn.RNN(3, 4), backend="fast")


@pytest.mark.parametrize("cell", list(LAYERS))
def test_kernel_choices_are_logged(cell, caplog):
    layer = LAYERS[cell][1](3, 4)
    x = torch.randn(5, 2, 3)
    with caplog.at_level(logging.DEBUG, logger="fastrnn"):
        layer(x)
        with fastrnn.use_backend("fused"):
            layer(x)
    messages = [r.getMessage() for r in caplog.records if r.name == "fastrnn"]
    assert messages == [
        f"fastrnn.{type(layer).__name__}: torch.nn's implementation (backend 'auto', cpu tensors)",
        f"fastrnn.{type(layer).__name__}: fused CPU kernels ({fastrnn.cpu_isa()})",
    ]


def test_public_kernel_switches():
    before = fastrnn.cpu_isa()
    with fastrnn.kernels(cpu_isa="base"):
        assert fastrnn.cpu_isa() == "base"
    assert fastrnn.cpu_isa() == before
    assert "base" in fastrnn.available_cpu_isas()
    with pytest.raises(RuntimeError, match="unknown CPU instruction set 'sse9'"):
        fastrnn.set_cpu_isa("sse9")
    if fastrnn.cuda_built():
        with fastrnn.kernels(cuda_path="grid", blocks=3):
            assert fastrnn.cuda_path() == ("grid", 3)
        assert fastrnn.cuda_path() == ("auto", 0)


def test_missing_extension_under_torch_compile(monkeypatch):
    """backend 'auto' without the extension runs torch.nn's implementation,
    compiled with fullgraph=True too; the warning came before, outside the
    graph."""
    monkeypatch.setattr(_ops, "_C", None)
    monkeypatch.setattr(_ops, "_warned_missing", True)
    layer = fastrnn.GRU(3, 4)
    x = torch.randn(5, 2, 3)
    torch._dynamo.reset()
    y, h = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    assert layer.last_path == "torch"
    torch.testing.assert_close(y, nn.GRU.forward(layer, x)[0])
