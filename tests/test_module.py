"""fastrnn.RNN as a drop-in for nn.RNN: construction, parameters, state_dict,
repr, backends, errors, dropout and torch.compile."""

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn import rnn_reference
from helpers import DEVICES, leaf, pair, run


CONFIGS = [
    dict(input_size=4, hidden_size=6),
    dict(input_size=4, hidden_size=6, num_layers=3, nonlinearity="relu", bias=False),
    dict(input_size=2, hidden_size=3, num_layers=2, bidirectional=True, batch_first=True, dropout=0.25),
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_same_parameters_init_and_repr(kw):
    torch.manual_seed(3)
    ref = nn.RNN(**kw)
    torch.manual_seed(3)
    ours = fastrnn.RNN(**kw)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for (_, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
        assert p.shape == q.shape and torch.equal(p, q)
    assert repr(ours) == repr(ref)
    assert isinstance(ours, nn.RNNBase)


def test_positional_constructor_and_repr_with_backend():
    ref = nn.RNN(3, 4, 2, "relu", False, True, 0.5, True)
    ours = fastrnn.RNN(3, 4, 2, "relu", False, True, 0.5, True, backend="fused")
    assert ours.nonlinearity == "relu" and ours.mode == "RNN_RELU"
    assert repr(ours) == repr(ref)[:-1] + ", backend='fused')"


@pytest.mark.parametrize("kw", CONFIGS)
def test_state_dict_loads_both_ways(kw):
    ref, ours = nn.RNN(**kw), fastrnn.RNN(**kw)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)
    back = nn.RNN(**kw)
    back.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


@pytest.mark.parametrize("args,kwargs,kind", [
    ((4, 5), dict(nonlinearity="gelu"), ValueError),
    ((4, 5), dict(proj_size=2), ValueError),
    ((4, 5), dict(dropout=1.5), ValueError),
    ((4, 5), dict(num_layers=0), ValueError),
    ((4, 0), dict(), ValueError),
    ((4, 5), dict(dropout=0.5), UserWarning),
])
def test_constructor_errors_and_warnings_match(args, kwargs, kind):
    def outcome(cls):
        """(exception type, message) raised, else the warnings given."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                cls(*args, **kwargs)
            except Exception as e:  # compared below, not swallowed
                return [(type(e), str(e))]
        return [(w.category, str(w.message)) for w in caught]

    expected = outcome(nn.RNN)
    assert [k for k, _ in expected] == [kind]
    assert outcome(fastrnn.RNN) == expected


def test_unknown_backend():
    with pytest.raises(ValueError, match="Unknown backend 'fast'"):
        fastrnn.RNN(3, 4, backend="fast")


def _bad_inputs():
    f64 = torch.float64
    return {
        "4d_input": (torch.randn(2, 3, 4, 1), None),
        "1d_input": (torch.randn(4), None),
        "input_size": (torch.randn(2, 3, 6), None),
        "hx_shape": (torch.randn(2, 3, 4), torch.randn(1, 3, 5)),
        "hx_batch": (torch.randn(2, 3, 4), torch.randn(2, 2, 5)),
        "hx_3d_for_2d": (torch.randn(2, 4), torch.randn(2, 1, 5)),
        "hx_2d_for_3d": (torch.randn(2, 3, 4), torch.randn(2, 5)),
        "input_dtype": (torch.randn(2, 3, 4, dtype=f64), None),
        "hx_dtype": (torch.randn(2, 3, 4), torch.randn(2, 3, 5, dtype=f64)),
        "zero_steps": (torch.randn(0, 3, 4), None),
        "zero_steps_unbatched": (torch.randn(0, 4), None),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_errors_match_nn_rnn(case):
    x, hx = _bad_inputs()[case]
    ref, ours = pair(4, 5, num_layers=2)

    def outcome(m):
        with pytest.raises(Exception) as info:
            m(x, hx)
        return type(info.value), str(info.value)

    assert outcome(ours) == outcome(ref)


def test_packed_bad_hx_matches_nn_rnn():
    ref, ours = pair(4, 5)
    packed = pack_padded_sequence(torch.randn(5, 3, 4), torch.tensor([5, 3, 2]))
    hx = torch.randn(1, 2, 5)
    with pytest.raises(RuntimeError) as a:
        ref(packed, hx)
    with pytest.raises(RuntimeError) as b:
        ours(packed, hx)
    assert str(a.value) == str(b.value)


def test_backends():
    x = torch.randn(5, 2, 3)
    auto = fastrnn.RNN(3, 4)
    auto(x)
    assert auto.last_path == "torch"  # CPU tensors: nn.RNN's implementation by default
    torch_backend = fastrnn.RNN(3, 4, backend="torch")
    torch_backend(x)
    assert torch_backend.last_path == "torch"
    fused = fastrnn.RNN(3, 4, backend="fused")
    fused(x)
    assert fused.last_path == "fused"
    # No CUDA time loop ran on any of them.
    assert auto.last_cuda_path is None and fused.last_cuda_path is None


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    from fastrnn import _ops, module

    monkeypatch.setattr(_ops, "_C", None)
    monkeypatch.setattr(module, "_warned_missing_extension", False)
    ref, ours = pair(3, 4)
    x = torch.randn(5, 2, 3)
    with pytest.warns(RuntimeWarning, match="runs through torch.nn.RNN"):
        y, h = ours(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(x)
    assert ours.last_path == "torch"
    y_ref, h_ref = ref(x)
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)


def test_pickle_deepcopy_and_conversions_keep_backend():
    ours = fastrnn.RNN(3, 4, 2, backend="fused")
    for clone in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours), ours.double()):
        assert clone.backend == "fused"
        y, _ = clone(torch.randn(5, 2, 3, dtype=clone.weight_ih_l0.dtype))
        assert clone.last_path == "fused"


def test_save_load(tmp_path):
    ours = fastrnn.RNN(3, 4, 2, backend="fused")
    path = tmp_path / "m.pt"
    torch.save(ours, path)
    loaded = torch.load(path, weights_only=False)
    x = torch.randn(5, 2, 3)
    assert loaded.backend == "fused"
    assert torch.equal(loaded(x)[0], ours(x)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_applies_the_saved_mask(device):
    """In training, the mask drawn for a call is the one the forward applies
    and the backward uses: a reference run with the same mask agrees."""
    L, D, T, N, C, H, p = 3, 2, 6, 4, 3, 5, 0.4
    ours = fastrnn.RNN(C, H, L, dropout=p, bidirectional=True, backend="fused",
                       dtype=torch.float64, device=device)
    x = leaf(T, N, C, dtype=torch.float64, device=device)
    torch.manual_seed(7)
    y, h = ours(x)
    torch.manual_seed(7)
    mask = torch.empty(L - 1, T, N, D * H, dtype=torch.float64, device=device).bernoulli_(1 - p) / (1 - p)
    hx = torch.zeros(L * D, N, H, dtype=torch.float64, device=device)
    weights = [getattr(ours, n) for n in ours._flat_weights_names]
    y_ref, h_ref = rnn_reference(x, hx, weights, None, mask, L, True, True, False)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)
    g = torch.autograd.grad(y.sum() + h.sum(), [x, *weights])
    g_ref = torch.autograd.grad(y_ref.sum() + h_ref.sum(), [x, *weights])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_dropout_only_in_training():
    ref, ours = pair(3, 4, num_layers=2, dropout=0.5, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours(x)[0], ref(x)[0])
    ours.train()
    y1, y2 = ours(x)[0], ours(x)[0]
    assert not torch.equal(y1, y2)


def test_dropout_one_zeroes_upper_layer_input():
    ours = fastrnn.RNN(3, 4, 2, dropout=1.0, backend="fused", dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    y, _ = ours(x)
    w = [getattr(ours, n) for n in ours._flat_weights_names]
    mask = torch.zeros(1, 5, 2, 4, dtype=torch.float64)
    y_ref, _ = rnn_reference(x, torch.zeros(2, 2, 4, dtype=torch.float64), w, None, mask, 2)
    torch.testing.assert_close(y, y_ref)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = fastrnn.RNN(3, 8, 2, bidirectional=True, batch_first=True, backend="fused")
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        y, h = self.rnn(x)
        return self.head(y).sum() + h.sum()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    model = Model()
    x = torch.randn(4, 6, 3)
    eager_loss = model(x)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    loss = compiled(x)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_fused_module_call_runs_the_kernel_not_nn_rnn(monkeypatch):
    """Guards the parity tests: with nn.RNN's own forward disabled, the fused
    backend still runs."""
    ours = fastrnn.RNN(3, 4, backend="fused")

    def broken(*a, **k):
        raise AssertionError("nn.RNN.forward was called")

    monkeypatch.setattr(nn.RNN, "forward", broken)
    y, h = ours(torch.randn(5, 2, 3))
    assert y.shape == (5, 2, 4)


def test_meta_device_gives_shapes_like_nn_rnn():
    ours = fastrnn.RNN(3, 4, 2, bidirectional=True, backend="fused", device="meta")
    ref = nn.RNN(3, 4, 2, bidirectional=True, device="meta")
    x = torch.randn(5, 2, 3, device="meta")
    for a, b in zip(ours(x), ref(x)):
        assert a.device.type == "meta" and a.shape == b.shape


def test_functional_call_uses_the_given_parameters():
    ours = fastrnn.RNN(3, 4, 2, backend="fused")
    params = {k: torch.randn_like(v) for k, v in ours.named_parameters()}
    x = torch.randn(5, 2, 3)
    y, h = torch.func.functional_call(ours, params, (x,))
    loaded = fastrnn.RNN(3, 4, 2, backend="fused")
    loaded.load_state_dict(params)
    y_ref, h_ref = loaded(x)
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)
