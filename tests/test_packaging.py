"""Installing and using fastrnn like a well-kept torch extension: the build's
record of what it was built for and the check at import, python -m
fastrnn.info, a build without torch, the whole-model switch, kernel logging
and the extension missing under torch.compile."""

import logging
import os
import subprocess
import sys
import types
import warnings

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


def test_build_info_names_the_instruction_sets_the_extension_runs():
    """Each instruction set the extension can switch to is one the build
    recorded: a build of FASTRNN_CPU_ISAS=native (the sanitizer and
    compatibility builds) leaves out what this processor cannot run, and
    then has no kernels of it to switch to."""
    info = _ops._built_for()
    runs = fastrnn.available_cpu_isas()
    assert runs and set(runs) <= set(info.cpu_isas), (runs, info.cpu_isas)


def test_unknown_instruction_set_choice_stops_the_build(tmp_path):
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib",
                          str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, FASTRNN_CPU_ISAS="avx1024", FASTRNN_CUDA="0"))
    assert out.returncode != 0
    assert "FASTRNN_CPU_ISAS must be 'all', 'native' or 'base', got 'avx1024'" in out.stderr
    assert not (tmp_path / "tmp").exists()


@pytest.mark.skipif(not _ops.cuda_built(), reason="a CUDA build's setting")
@pytest.mark.parametrize("value, message", [
    ("yes", "FASTRNN_CUDA_PTX_ONLY must be '0' or '1', got 'yes'"),
    ("1", "FASTRNN_CUDA_PTX_ONLY=1 takes TORCH_CUDA_ARCH_LIST as numbers (such as 9.0), "
          "got 'sm_90'"),
])
def test_bad_ptx_only_choice_stops_the_build(tmp_path, value, message):
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib",
                          str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, FASTRNN_CUDA_PTX_ONLY=value, FASTRNN_CUDA="1",
                                  TORCH_CUDA_ARCH_LIST="sm_90"))
    assert out.returncode != 0
    assert message in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "tmp").exists()


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
    with pytest.warns(UserWarning, match=r"swapped 3 layer\(s\) and left 1 alone.*custom "
                      r"\(test_packaging.Custom\).*subclasses=True"):
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


class Mixin:
    def describe(self):
        return f"{type(self).__name__} of {self.hidden_size}"


class SubLSTM(Mixin, nn.LSTM):
    """As libraries write them (pytorch-forecasting's LSTM, say): methods of
    their own, and a forward that calls the parent's."""

    def forward(self, x, hx=None, scale=2.0):
        out, state = super().forward(x, hx)
        return out * scale, state


class SubGRU(nn.GRU):
    pass


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = SubLSTM(3, 5, 2, bidirectional=True)
        self.dec = SubGRU(10, 4)
        self.plain = nn.RNN(4, 4)

    def forward(self, x):
        y, _ = self.enc(x)
        y, _ = self.dec(y)
        return self.plain(y)[0]


def test_replace_rnn_rebases_subclasses_on_request(monkeypatch, tmp_path):
    """subclasses=True: each subclass is rebased in place onto fastrnn's
    layer (same object, Parameters and methods), its super().forward is the
    fused one, and it still saves, loads and copies; restore_rnn undoes it."""
    import copy

    model = Wrapped().double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    expected = model(x)
    enc, params = model.enc, list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastrnn.replace_rnn(model, backend="fused", subclasses=True)
    assert model.enc is enc and list(model.parameters()) == params
    assert isinstance(enc, SubLSTM) and isinstance(enc, nn.LSTM) and isinstance(enc, fastrnn.LSTM)
    assert isinstance(model.dec, fastrnn.GRU) and type(model.plain) is fastrnn.RNN
    assert enc.describe() == "SubLSTM of 5" and enc.backend == "fused"

    def broken(*a, **k):
        raise AssertionError("torch.nn's forward was called")

    monkeypatch.setattr(nn.LSTM, "forward", broken)
    monkeypatch.setattr(nn.GRU, "forward", broken)
    torch.testing.assert_close(model(x), expected)
    assert enc.last_path == model.dec.last_path == "fused"
    torch.save(model, tmp_path / "m.pt")
    for other in (torch.load(tmp_path / "m.pt", weights_only=False), copy.deepcopy(model)):
        assert isinstance(other.enc, SubLSTM) and isinstance(other.enc, fastrnn.LSTM)
        torch.testing.assert_close(other(x), expected)
    monkeypatch.undo()
    assert fastrnn.restore_rnn(model) is model
    assert type(model.enc) is SubLSTM and type(model.dec) is SubGRU and type(model.plain) is nn.RNN
    assert "backend" not in model.enc.__dict__ and list(model.parameters()) == params
    torch.testing.assert_close(model(x), expected)


def test_restore_rnn_gives_back_torch_nn_layers_with_their_parameters():
    model = Model().double().eval()
    params = dict(model.named_parameters())
    hook_calls = []
    model.enc.register_forward_hook(lambda m, i, o: hook_calls.append(type(m)))
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    expected = model(x)
    fastrnn.replace_rnn(model, backend="fused")
    assert fastrnn.restore_rnn(model) is model
    assert (type(model.enc), type(model.mid[0]), type(model.rnn)) == (nn.LSTM, nn.GRU, nn.RNN)
    assert not model.enc.training and model.enc.proj_size == 4
    for name, p in model.named_parameters():
        assert p is params[name]
    torch.testing.assert_close(model(x), expected)
    assert hook_calls == [nn.LSTM, nn.LSTM], "the hook moves with the layer, both ways"
    layer = fastrnn.GRU(3, 4, backend="fused")
    assert type(fastrnn.restore_rnn(layer)) is nn.GRU


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
