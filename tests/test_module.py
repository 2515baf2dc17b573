"""fastrnn.RNN, LSTM and GRU as drop-ins for torch.nn's: construction,
parameters, state_dict, repr, backends, errors, dropout and torch.compile."""

import contextlib
import copy
import inspect
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils._python_dispatch import TorchDispatchMode

import fastrnn
from fastrnn import gru_reference, lstm_reference, rnn_reference
from helpers import CELLS, DEVICES, LAYERS, TOL, initial_state, leaf, pair


CONFIGS = [
    dict(input_size=4, hidden_size=6),
    dict(input_size=4, hidden_size=6, num_layers=3, bias=False),
    dict(input_size=2, hidden_size=3, num_layers=2, bidirectional=True, batch_first=True, dropout=0.25),
]


def configs(cell):
    extra = {"rnn": [dict(nonlinearity="relu")], "lstm": [dict(proj_size=2)], "gru": []}[cell]
    return [{**c, **e} for c in CONFIGS for e in [{}] + extra]


ALL_CONFIGS = [pytest.param(cell, kw, id=f"{cell}-{i}") for cell in LAYERS
               for i, kw in enumerate(configs(cell))]


@pytest.mark.parametrize("cell,kw", ALL_CONFIGS)
def test_same_parameters_init_and_repr(cell, kw):
    ref_cls, our_cls = LAYERS[cell]
    torch.manual_seed(3)
    ref = ref_cls(**kw)
    torch.manual_seed(3)
    ours = our_cls(**kw)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for (_, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
        assert p.shape == q.shape and torch.equal(p, q)
    assert repr(ours) == repr(ref)
    assert isinstance(ours, nn.RNNBase)


@pytest.mark.parametrize("cell,kw", ALL_CONFIGS)
def test_state_dict_loads_both_ways(cell, kw):
    ref_cls, our_cls = LAYERS[cell]
    ref, ours = ref_cls(**kw), our_cls(**kw)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)
    back = ref_cls(**kw)
    back.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


@pytest.mark.parametrize("cell,args", [
    ("rnn", (3, 4, 2, "relu", False, True, 0.5, True)),
    ("lstm", (3, 4, 2, False, True, 0.5, True, 2)),
    ("gru", (3, 4, 2, False, True, 0.5, True)),
])
def test_positional_constructor_and_repr_with_backend(cell, args):
    ref_cls, our_cls = LAYERS[cell]
    ref = ref_cls(*args)
    ours = our_cls(*args, backend="fused")
    assert repr(ours) == repr(ref)[:-1] + ", backend='fused')"
    for name in ("num_layers", "bias", "batch_first", "dropout", "bidirectional", "proj_size"):
        assert getattr(ours, name) == getattr(ref, name)


@pytest.mark.parametrize("cell", list(LAYERS))
def test_signature_lists_torch_nn_arguments(cell):
    """The constructor's signature is spelled out (IDEs, help()), with
    torch.nn's arguments in torch.nn's order, then the backend."""
    params = list(inspect.signature(LAYERS[cell][1].__init__).parameters)
    order = {"rnn": ["nonlinearity", "bias", "batch_first", "dropout", "bidirectional"],
             "lstm": ["bias", "batch_first", "dropout", "bidirectional", "proj_size"],
             "gru": ["bias", "batch_first", "dropout", "bidirectional"]}[cell]
    expected = ["self", "input_size", "hidden_size", "num_layers", *order, "device", "dtype",
                "backend"]
    assert params[:len(expected)] == expected
    assert LAYERS[cell][1].forward.__doc__ and "Runs" in LAYERS[cell][1].forward.__doc__


CONSTRUCTOR_CASES = [
    ((4, 5), dict(dropout=1.5), ValueError),
    ((4, 5), dict(num_layers=0), ValueError),
    ((4, 0), dict(), ValueError),
    ((4, 5), dict(dropout=0.5), UserWarning),
    (("4", 5), dict(), TypeError),
    ((4, 5), dict(bias=1), TypeError),
]
EXTRA_CONSTRUCTOR_CASES = {
    "rnn": [((4, 5), dict(nonlinearity="gelu"), ValueError),
            ((4, 5), dict(proj_size=2), ValueError)],
    "lstm": [((4, 5), dict(proj_size=5), ValueError), ((4, 5), dict(proj_size=-1), ValueError)],
    "gru": [((4, 5), dict(proj_size=2), ValueError)],
}


@pytest.mark.parametrize("cell,args,kwargs,kind", [
    (cell, *case) for cell in LAYERS for case in CONSTRUCTOR_CASES + EXTRA_CONSTRUCTOR_CASES[cell]
])
def test_constructor_errors_and_warnings_match(cell, args, kwargs, kind):
    def outcome(cls):
        """(exception type, message) raised, else the warnings given."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                cls(*args, **kwargs)
            except Exception as e:  # compared below, not swallowed
                return [(type(e), str(e))]
        return [(w.category, str(w.message)) for w in caught]

    ref_cls, our_cls = LAYERS[cell]
    expected = outcome(ref_cls)
    assert [k for k, _ in expected] == [kind]
    assert outcome(our_cls) == expected


def test_unknown_backend():
    with pytest.raises(ValueError, match="Unknown backend 'fast'"):
        fastrnn.RNN(3, 4, backend="fast")
    with pytest.raises(ValueError, match="Unknown backend 'fast'"):
        fastrnn.set_default_backend("fast")


def _bad_inputs(cell):
    f64 = torch.float64
    cases = {
        "4d_input": (torch.randn(2, 3, 4, 1), None),
        "1d_input": (torch.randn(4), None),
        "input_size": (torch.randn(2, 3, 6), None),
        "input_dtype": (torch.randn(2, 3, 4, dtype=f64), None),
        "zero_steps": (torch.randn(0, 3, 4), None),
        "zero_steps_unbatched": (torch.randn(0, 4), None),
    }
    if cell == "lstm":
        h, c = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
        cases.update({
            "hx_shape": (torch.randn(2, 3, 4), (torch.randn(1, 3, 5), c)),
            "cx_shape": (torch.randn(2, 3, 4), (h, torch.randn(2, 3, 4))),
            "hx_2d_for_3d": (torch.randn(2, 3, 4), (torch.randn(2, 5), c)),
            "hx_3d_for_2d": (torch.randn(2, 4), (h, c)),
            "hx_dtype": (torch.randn(2, 3, 4), (h.double(), c)),
            "hx_long": (torch.randn(2, 3, 4), (h.long(), c)),
            "cx_dtype": (torch.randn(2, 3, 4), (h, c.double())),
        })
    else:
        cases.update({
            "hx_shape": (torch.randn(2, 3, 4), torch.randn(1, 3, 5)),
            "hx_batch": (torch.randn(2, 3, 4), torch.randn(2, 2, 5)),
            "hx_3d_for_2d": (torch.randn(2, 4), torch.randn(2, 1, 5)),
            "hx_2d_for_3d": (torch.randn(2, 3, 4), torch.randn(2, 5)),
            "hx_dtype": (torch.randn(2, 3, 4), torch.randn(2, 3, 5, dtype=f64)),
            "hx_long": (torch.randn(2, 3, 4), torch.ones(2, 3, 5, dtype=torch.long)),
        })
    return cases


def _outcome(m, x, hx):
    with pytest.raises(Exception) as info:
        m(x, hx)
    return type(info.value), str(info.value)


@pytest.mark.parametrize("cell,case", [(c, k) for c in LAYERS for k in _bad_inputs(c)])
def test_bad_input_errors_match_torch_nn(cell, case):
    """The errors of torch.nn's native implementation, which nn.LSTM's oneDNN
    path on the CPU does not raise for some (it reports "get_mkldnn_dtype:
    unsupported data type" for a state of the wrong dtype)."""
    x, hx = _bad_inputs(cell)[case]
    ref, ours = pair(4, 5, cell, num_layers=2)
    with torch.backends.mkldnn.flags(enabled=False):
        assert _outcome(ours, x, hx) == _outcome(ref, x, hx)


def _with_weight(cell, name, shape):
    ref, ours = pair(4, 6, cell, num_layers=2, **({"proj_size": 3} if name == "weight_hr_l0" else {}))
    for m in (ref, ours):
        setattr(m, name, nn.Parameter(torch.randn(shape)))
    return ref, ours


@pytest.mark.parametrize("cell,name,shape", [
    ("rnn", "weight_ih_l0", (6, 7)), ("rnn", "weight_hh_l1", (6, 5)), ("rnn", "bias_ih_l0", (5,)),
    ("gru", "weight_ih_l0", (18, 7)), ("gru", "weight_hh_l1", (18, 5)), ("gru", "bias_hh_l0", (5,)),
    ("lstm", "weight_ih_l0", (24, 7)), ("lstm", "weight_hh_l1", (24, 5)), ("lstm", "bias_hh_l0", (5,)),
    ("lstm", "weight_hr_l0", (3, 5)),
])
def test_weight_of_the_wrong_shape_raises_like_torch_nn(cell, name, shape):
    ref, ours = _with_weight(cell, name, shape)
    x = torch.randn(5, 3, 4)
    with torch.backends.mkldnn.flags(enabled=False):
        assert _outcome(ours, x, None) == _outcome(ref, x, None)


@pytest.mark.parametrize("cell", ["rnn", "gru"])
def test_packed_bad_hx_matches_torch_nn(cell):
    ref, ours = pair(4, 5, cell)
    packed = pack_padded_sequence(torch.randn(5, 3, 4), torch.tensor([5, 3, 2]))
    hx = torch.randn(1, 2, 5)
    assert _outcome(ours, packed, hx) == _outcome(ref, packed, hx)


def test_packed_lstm_bad_state_names_the_state():
    """nn.LSTM does not check a packed call's states and fails on whatever
    operation their shape breaks first; fastrnn says which state is wrong."""
    _, ours = pair(4, 5, "lstm")
    packed = pack_padded_sequence(torch.randn(5, 3, 4), torch.tensor([5, 3, 2]))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[1\] size \(1, 3, 5\), got \[1, 2, 5\]"):
        ours(packed, (torch.randn(1, 3, 5), torch.randn(1, 2, 5)))


@pytest.mark.parametrize("cell", list(LAYERS))
def test_backends(cell):
    cls = LAYERS[cell][1]
    x = torch.randn(5, 2, 3)
    auto = cls(3, 4)
    auto(x)
    assert auto.last_path == "torch"  # CPU tensors: torch.nn's implementation by default
    torch_backend = cls(3, 4, backend="torch")
    torch_backend(x)
    assert torch_backend.last_path == "torch"
    fused = cls(3, 4, backend="fused")
    fused(x)
    assert fused.last_path == "fused"
    assert auto.last_cuda_path is None and fused.last_cuda_path is None


def test_default_backend_and_use_backend():
    """Layers built without a backend follow the innermost use_backend block,
    then the process-wide default; a layer's own backend wins over both."""
    x = torch.randn(5, 2, 3)
    free, pinned = fastrnn.LSTM(3, 4), fastrnn.LSTM(3, 4, backend="torch")
    assert fastrnn.get_default_backend() == "auto"
    with fastrnn.use_backend("fused"):
        free(x), pinned(x)
        assert (free.last_path, pinned.last_path) == ("fused", "torch")
        with fastrnn.use_backend("torch"):
            free(x)
            assert free.last_path == "torch"
        free(x)
        assert free.last_path == "fused"
    free(x)
    assert free.last_path == "torch"
    try:
        fastrnn.set_default_backend("fused")
        free(x)
        assert free.last_path == "fused"
        with fastrnn.use_backend("torch"):
            free(x)
            assert free.last_path == "torch"
    finally:
        fastrnn.set_default_backend("auto")
    assert repr(free) == repr(nn.LSTM(3, 4))


def test_missing_extension(monkeypatch):
    """Without the extension, backend='fused' raises with the real cause, and
    'auto' warns once with it and runs torch.nn's implementation."""
    from fastrnn import _ops

    monkeypatch.setattr(_ops, "_C", None)
    monkeypatch.setattr(_ops, "_EXTENSION_ERROR", "fastrnn._C failed to load: undefined symbol: xyz")
    monkeypatch.setattr(_ops, "_warned_missing", False)
    x = torch.randn(5, 2, 3)
    with pytest.warns(RuntimeWarning, match="undefined symbol: xyz"):
        fused = fastrnn.RNN(3, 4, backend="fused")
    with pytest.raises(RuntimeError, match=r"extension is not available \(fastrnn._C failed to load: "
                                           r"undefined symbol: xyz\), so backend='fused' cannot run"):
        fused(x)
    ref = nn.RNN(3, 4)
    auto = fastrnn.RNN(3, 4)
    auto.load_state_dict(ref.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once already
        y, h = auto(x)
    assert auto.last_path == "torch"
    y_ref, h_ref = ref(x)
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)


def test_test_header_names_why_the_extension_is_missing(monkeypatch):
    """The test run's header (tests/conftest.py) says why the extension did
    not load, rather than failing on its own."""
    import conftest
    from fastrnn import _ops

    monkeypatch.setattr(_ops, "_C", None)
    monkeypatch.setattr(_ops, "_EXTENSION_ERROR", "fastrnn._C failed to load: undefined symbol: xyz")
    assert conftest.pytest_report_header(None) == (
        "fastrnn extension: NOT BUILT (fastrnn._C failed to load: undefined symbol: xyz)")


@pytest.mark.parametrize("cell", list(LAYERS))
def test_pickle_deepcopy_and_conversions_keep_backend(cell):
    ours = LAYERS[cell][1](3, 4, 2, backend="fused")
    for clone in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours), ours.double()):
        assert clone.backend == "fused"
        clone(torch.randn(5, 2, 3, dtype=clone.weight_ih_l0.dtype))
        assert clone.last_path == "fused"


@pytest.mark.parametrize("cell", list(LAYERS))
def test_save_load(cell, tmp_path):
    ours = LAYERS[cell][1](3, 4, 2, backend="fused")
    path = tmp_path / "m.pt"
    torch.save(ours, path)
    loaded = torch.load(path, weights_only=False)
    x = torch.randn(5, 2, 3)
    assert loaded.backend == "fused"
    assert torch.equal(loaded(x)[0], ours(x)[0])


def _reference(cell, x, state, weights, mask, L, bidirectional):
    if cell == "lstm":
        return lstm_reference(x, *state, weights, None, mask, L, bidirectional, True, False)
    ref = rnn_reference if cell == "rnn" else gru_reference
    return ref(x, state, weights, None, mask, L, bidirectional, True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", list(LAYERS))
def test_dropout_applies_the_saved_mask(cell, device):
    """In training, the mask drawn for a call is the one the forward applies
    and the backward uses: a reference run with the same mask agrees."""
    L, D, T, N, C, H, p = 3, 2, 6, 4, 3, 5, 0.4
    ours = LAYERS[cell][1](C, H, L, dropout=p, bidirectional=True, backend="fused",
                           dtype=torch.float64, device=device)
    x = leaf(T, N, C, dtype=torch.float64, device=device)
    torch.manual_seed(7)
    y, h = ours(x)
    torch.manual_seed(7)
    mask = torch.empty(L - 1, T, N, D * H, dtype=torch.float64, device=device).bernoulli_(1 - p) / (1 - p)
    zeros = torch.zeros(L * D, N, H, dtype=torch.float64, device=device)
    state = (zeros, zeros) if cell == "lstm" else zeros
    weights = [getattr(ours, n) for n in ours._flat_weights_names]
    expected = _reference(cell, x, state, weights, mask, L, True)
    got = (y, *h) if cell == "lstm" else (y, h)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    g = torch.autograd.grad(sum(t.sum() for t in got), [x, *weights])
    g_ref = torch.autograd.grad(sum(t.sum() for t in expected), [x, *weights])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cell", list(LAYERS))
def test_dropout_only_in_training(cell):
    ref, ours = pair(3, 4, cell, num_layers=2, dropout=0.5, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours(x)[0], ref(x)[0])
    ours.train()
    y1, y2 = ours(x)[0], ours(x)[0]
    assert not torch.equal(y1, y2)


@pytest.mark.parametrize("cell", list(LAYERS))
def test_dropout_one_zeroes_upper_layer_input(cell):
    ours = LAYERS[cell][1](3, 4, 2, dropout=1.0, backend="fused", dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    y, _ = ours(x)
    w = [getattr(ours, n) for n in ours._flat_weights_names]
    mask = torch.zeros(1, 5, 2, 4, dtype=torch.float64)
    zeros = torch.zeros(2, 2, 4, dtype=torch.float64)
    expected = _reference(cell, x, (zeros, zeros) if cell == "lstm" else zeros, w, mask, 2, False)
    torch.testing.assert_close(y, expected[0])


class Model(nn.Module):
    def __init__(self, cell, **kw):
        super().__init__()
        self.rnn = LAYERS[cell][1](3, 8, 2, bidirectional=True, batch_first=True, backend="fused", **kw)
        width = 2 * kw.get("proj_size", 8)
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        y, h = self.rnn(x)
        h = torch.cat(h, 2) if isinstance(h, tuple) else h
        return self.head(y).sum() + h.sum()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("cell,options", CELLS)
def test_compile_fullgraph_matches_eager(cell, options, backend):
    if options.get("nonlinearity") == "relu" or (backend == "inductor" and options):
        pytest.skip("one variant per cell under inductor")
    torch._dynamo.reset()
    model = Model(cell, **{k: v for k, v in options.items() if k != "nonlinearity"})
    x = torch.randn(4, 6, 3)
    eager_loss = model(x)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    loss = compiled(x)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cell", list(LAYERS))
def test_fused_module_call_runs_the_kernel_not_torch_nn(cell, monkeypatch):
    """Guards the parity tests: with torch.nn's own forward disabled, the
    fused backend still runs."""
    ours = LAYERS[cell][1](3, 4, backend="fused")

    def broken(*a, **k):
        raise AssertionError("torch.nn's forward was called")

    monkeypatch.setattr(LAYERS[cell][0], "forward", broken)
    monkeypatch.setattr(type(ours), "_torch_forward", broken)
    y, h = ours(torch.randn(5, 2, 3))
    assert y.shape == (5, 2, 4)


@pytest.mark.parametrize("cell", list(LAYERS))
def test_meta_device_gives_shapes_like_torch_nn(cell):
    ref_cls, our_cls = LAYERS[cell]
    ours = our_cls(3, 4, 2, bidirectional=True, backend="fused", device="meta")
    ref = ref_cls(3, 4, 2, bidirectional=True, device="meta")
    x = torch.randn(5, 2, 3, device="meta")
    (y, h), (y_ref, h_ref) = ours(x), ref(x)
    assert y.device.type == "meta" and y.shape == y_ref.shape
    for a, b in zip(h if isinstance(h, tuple) else (h,), h_ref if isinstance(h_ref, tuple) else (h_ref,)):
        assert a.shape == b.shape


@pytest.mark.parametrize("cell", list(LAYERS))
def test_functional_call_uses_the_given_parameters(cell):
    ours = LAYERS[cell][1](3, 4, 2, backend="fused")
    params = {k: torch.randn_like(v) for k, v in ours.named_parameters()}
    x = torch.randn(5, 2, 3)
    y, h = torch.func.functional_call(ours, params, (x,))
    loaded = LAYERS[cell][1](3, 4, 2, backend="fused")
    loaded.load_state_dict(params)
    y_ref, h_ref = loaded(x)
    assert torch.equal(y, y_ref)
    for a, b in zip(h if isinstance(h, tuple) else (h,), h_ref if isinstance(h_ref, tuple) else (h_ref,)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cell", list(LAYERS))
def test_initial_state_gradients_reach_every_layer(cell):
    """A gradient through h_n (and c_n) of every layer and direction reaches
    h0 (and c0) of that layer and direction."""
    ref, ours = pair(3, 4, cell, num_layers=2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for m in (ref, ours):
        state = initial_state(m, 2, dtype=torch.float64)
        _, h = m(x, state)
        finals = h if isinstance(h, tuple) else (h,)
        inits = state if isinstance(state, tuple) else (state,)
        grads = torch.autograd.grad(sum(f.sum() for f in finals), inits)
        assert all(g.abs().sum(dim=(1, 2)).min() > 0 for g in grads)


class _Orthogonalish(nn.Module):
    def forward(self, w):
        return w - w.t().mean()


@pytest.mark.parametrize("cell", list(LAYERS))
def test_parametrized_weight_is_recomputed_every_call(cell):
    """torch.nn.utils.parametrize: the weight is computed on every access, and
    the fused layer sees its current value, as torch.nn's does."""
    from torch.nn.utils import parametrize

    ref, ours = pair(3, 4, cell, dtype=torch.float64)
    for m in (ref, ours):
        parametrize.register_parametrization(m, "weight_hh_l0", _Orthogonalish())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x)[0], ref(x)[0])
    for m in (ref, ours):
        with torch.no_grad():
            m.parametrizations.weight_hh_l0.original.mul_(2.0)
    torch.testing.assert_close(ours(x)[0], ref(x)[0])


class _Converted(nn.Module):
    """A model as users write it, with torch.nn layers, before replace_rnn."""

    def __init__(self, cell, **kw):
        super().__init__()
        self.rnn = LAYERS[cell][0](3, 8, 2, batch_first=True, **kw)
        self.head = nn.Linear(kw.get("proj_size", 0) or 8, 1)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y).sum()


@pytest.mark.parametrize("cell,options,backend", [
    ("lstm", {}, None), ("lstm", dict(proj_size=2), None), ("lstm", {}, "torch"),
    ("gru", {}, None), ("rnn", {}, None), ("lstm", {}, "fused"), ("gru", {}, "fused")])
def test_compile_after_replace_rnn_runs_every_backend(cell, options, backend):
    """replace_rnn, then torch.compile with inductor, training: the compiled
    model's loss and gradients are the eager ones with every backend; on the
    CPU the default and 'torch' run torch.nn's implementation (the LSTM's,
    oneDNN, outside the graph, as torch.nn.LSTM is), 'fused' the kernel in
    one graph."""
    torch._dynamo.reset()
    model = fastrnn.replace_rnn(_Converted(cell, **options), backend=backend)
    x = torch.randn(4, 6, 3)
    eager_loss = model(x)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=backend == "fused")
    loss = compiled(x)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_plain_calls_take_the_short_path_with_the_same_results(cell, monkeypatch):
    """A padded call with states of the expected shapes (or none), one dtype,
    no autocast and no dropout skips torch.nn's argument handling
    (_plain_forward) and gives the full path's bits; every other call takes
    the full path."""
    from fastrnn import module

    cls = {"rnn": fastrnn.RNN, "lstm": fastrnn.LSTM, "gru": fastrnn.GRU}[cell]
    layer = cls(3, 5, num_layers=2, bidirectional=True, batch_first=True, backend="fused")
    short = []
    plain = module._FusedBase._plain_forward

    def counted(self, input, hx):
        out = plain(self, input, hx)
        short.append(out is not None)
        return out

    monkeypatch.setattr(module._FusedBase, "_plain_forward", counted)
    x = torch.randn(2, 4, 3, requires_grad=True)
    h = torch.randn(4, 2, 5)
    hx = (h, torch.randn(4, 2, 5)) if cell == "lstm" else h

    def results(y, state):
        states = state if isinstance(state, tuple) else (state,)
        grads = torch.autograd.grad(y.sum() + sum(s.sum() for s in states), [x, *layer.parameters()])
        return [y, *states, *grads]

    for state in (hx, None):
        got = results(*layer(x, state))
        assert short.pop() is True
        monkeypatch.setattr(module._FusedBase, "_plain_forward", lambda self, i, h: None)
        expected = results(*layer(x, state))
        monkeypatch.setattr(module._FusedBase, "_plain_forward", counted)
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
    bad_h = torch.randn(4, 3, 5)
    others = [
        (x[0], None),                                                 # unbatched
        (x.double(), None),                                           # another dtype
        (x, (bad_h, bad_h) if cell == "lstm" else bad_h),             # states of another batch
        (x, tuple(s.double() for s in hx) if cell == "lstm" else hx.double()),  # another state dtype
        (torch.randn(2, 4, 4), None),                                 # another input width
        (torch.randn(2, 0, 3), None),                                 # no steps
        (nn.Parameter(x.detach()), None),                             # a tensor subclass
    ]
    for inp, state in others:
        with contextlib.suppress(RuntimeError, ValueError):
            layer(inp, state)
        assert short.pop() is False
    layer.dropout = 0.5
    layer(x, hx)
    assert short.pop() is False


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "nothing_requires_grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", ["stream", "stream_batch_first", "no_state", "long", "wide"])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_plain_call_no_backward_can_follow(cell, form, dtype, mode):
    """A plain one-layer call that no backward can follow (a stream's step
    without grad: the CPU kernels called without the dispatcher) gives
    nn's values, and bit for bit those of the same call with a graph."""
    pairs = {"rnn": (nn.RNN, fastrnn.RNN), "lstm": (nn.LSTM, fastrnn.LSTM),
             "gru": (nn.GRU, fastrnn.GRU)}
    H = 40 if form == "wide" else 7
    batch_first = form == "stream_batch_first"
    torch.manual_seed(0)
    ref = pairs[cell][0](5, H, batch_first=batch_first, dtype=dtype)
    ours = pairs[cell][1](5, H, batch_first=batch_first, dtype=dtype, backend="fused")
    ours.load_state_dict(ref.state_dict())
    T, N = {"stream": (1, 1), "stream_batch_first": (1, 1), "long": (30, 3)}.get(form, (4, 3))
    x = torch.randn(*((N, T, 5) if batch_first else (T, N, 5)), dtype=dtype)
    hx = None
    if form != "no_state":
        h = torch.randn(1, N, H, dtype=dtype)
        hx = (h, torch.randn(1, N, H, dtype=dtype)) if cell == "lstm" else h

    def flat(out):
        y, state = out
        return [y, *(state if isinstance(state, tuple) else (state,))]

    graph = flat(ours(x.clone().requires_grad_(), hx))
    if mode == "nothing_requires_grad":
        ours.requires_grad_(False)
        got = flat(ours(x, hx))
    else:
        with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
            got = flat(ours(x, hx))
    assert ours.last_path == "fused"
    with torch.inference_mode() if mode == "inference_mode" else torch.no_grad():
        expected = flat(ref(x, hx))
    for a, b, g in zip(expected, got, graph):
        assert b.shape == a.shape and b.dtype == a.dtype and not b.requires_grad
        assert b.is_inference() == a.is_inference()
        torch.testing.assert_close(b, a, **TOL[dtype])
        assert torch.equal(b, g.detach())


NO_GRAD_CASES = [
    ("lstm", {}), ("lstm", {"num_layers": 2, "bidirectional": True}), ("lstm", {"proj_size": 3}),
    ("gru", {}), ("gru", {"num_layers": 2, "bidirectional": True, "batch_first": True}),
    ("rnn", {"nonlinearity": "relu"}),
]


@pytest.mark.parametrize("cell,options", NO_GRAD_CASES)
@pytest.mark.parametrize("form", ["padded", "packed", "wide"])
def test_no_grad_forward_keeps_no_workspace_and_gives_the_same_bits(cell, options, form, monkeypatch):
    """Without grad mode no backward can follow, so the layers' eager forward
    asks the op for no workspace (the CPU kernels then write no saved
    values, and an expanded zero stands in): the outputs and states are the
    bits of a forward that keeps it (grad mode on, nothing requiring grad).
    'padded' runs the row loop on packed weights, 'packed' (lengths) on the
    weights as stored, 'wide' the column split on two threads."""
    from fastrnn import _ops

    cls = {"rnn": fastrnn.RNN, "lstm": fastrnn.LSTM, "gru": fastrnn.GRU}[cell]
    torch.manual_seed(0)
    layer = cls(5, 384 if form == "wide" else 7, backend="fused", **options).requires_grad_(False)
    batch_first = bool(options.get("batch_first"))
    # 18 rows x steps read the weights as stored, 48 and 36 packed; 'wide'
    # gives each thread 3 rows, fewer than any row split takes.
    N = {"packed": 3, "wide": 6}.get(form, 8)
    x = torch.randn(N, 6, 5) if batch_first else torch.randn(6, N, 5)
    if form == "packed":
        x = nn.utils.rnn.pack_padded_sequence(x, [6, 4, 2], batch_first=batch_first)
    workspaces = []

    class Recording(TorchDispatchMode):
        # Sees the op however the layer calls it (from Python, or from C++
        # through the dispatcher on the plainest call).
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if func is torch.ops.fastrnn.forward.default:
                workspaces.append(result[-1])
            return result

    def outputs():
        with Recording():
            y, state = layer(x)
        y = y.data if isinstance(y, nn.utils.rnn.PackedSequence) else y
        return [y, *(state if isinstance(state, tuple) else (state,))]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if form == "wide" else 1)
        with torch.enable_grad():
            full = outputs()
        with torch.no_grad():
            bare = outputs()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(full, bare):
        assert torch.equal(a, b)
    kept, none = workspaces
    if cell != "rnn":  # an Elman step keeps nothing: its workspace has width 0
        assert kept.stride() != (0,) * kept.dim() and kept.abs().sum() > 0
        assert none.shape == kept.shape and none.stride() == (0,) * none.dim() and not none.any()
    assert _ops._C.set_keep_workspace(True) is True  # on again after the call


def test_the_workspace_setting_survives_an_op_that_raises():
    from fastrnn import _ops, module

    def refuses(*args):
        raise RuntimeError("refused")

    with torch.no_grad(), pytest.raises(RuntimeError, match="refused"):
        module._call_op(refuses, ())
    assert _ops._C.set_keep_workspace(True) is True


def test_the_op_itself_keeps_its_workspace_without_grad():
    """torch.ops.fastrnn.* called directly return the workspace in any grad
    mode; only the setting the layers use turns it off."""
    layer = fastrnn.LSTM(5, 7)
    x, h = torch.randn(6, 3, 5), torch.zeros(1, 3, 7)
    args = ("lstm", x, [h, h], layer._weights(), None, None, 1, False, True, False)
    with torch.no_grad():
        direct = torch.ops.fastrnn.forward(*args)[-1]
    with torch.enable_grad():
        kept = torch.ops.fastrnn.forward(*args)[-1]
    assert torch.equal(direct, kept) and direct.abs().sum() > 0
