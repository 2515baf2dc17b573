"""torch.nn's rules that a fused layer must keep beyond its arithmetic: the
dropout masks it draws (draw for draw, so the generator is left as torch.nn
leaves it) and the device and dtype checks made before any kernel runs."""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from helpers import CELLS, LAYERS, pair

# (num_layers, bidirectional, dropout): two and three layers, each direction
# count, a dropout that draws and one (p = 1) that torch.nn applies without
# drawing.
DROPOUTS = [(2, False, 0.3), (3, True, 0.3), (3, False, 1.0), (2, True, 0.55)]
FORMS = ["padded", "batch_first", "packed_sorted", "packed_unsorted", "unbatched"]


def _input(form, T=6, N=4, C=5):
    x = torch.randn(T, N, C, dtype=torch.float64)
    if form == "batch_first":
        return x.transpose(0, 1).contiguous().requires_grad_()
    if form == "unbatched":
        return x[:, 0].clone().requires_grad_()
    x.requires_grad_()
    if form == "packed_sorted":
        return pack_padded_sequence(x, torch.tensor([6, 5, 3, 1]))
    if form == "packed_unsorted":
        return pack_padded_sequence(x, torch.tensor([3, 6, 1, 5]), enforce_sorted=False)
    return x


def _draw(module, inp, seed):
    """The call's results and gradients, and the generator's next draw."""
    torch.manual_seed(seed)
    out, h = module(inp)
    y = out.data if hasattr(out, "batch_sizes") else out
    finals = h if isinstance(h, tuple) else (h,)
    loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()
    loss = loss + sum((f * f).sum() for f in finals)
    leaves = list(module.parameters())
    grads = torch.autograd.grad(loss, leaves)
    return [y, *finals, *grads], torch.rand(4, dtype=torch.float64)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cell,options", CELLS)
def test_training_dropout_draws_torch_nn_masks(cell, options, form):
    """In training, every input form gets torch.nn's masks: the outputs, the
    final states and every gradient agree in float64, and the generator
    draws the same numbers afterwards."""
    for L, bidirectional, p in DROPOUTS:
        ref, ours = pair(5, 7, cell, num_layers=L, dropout=p, bidirectional=bidirectional,
                         batch_first=form == "batch_first", dtype=torch.float64, **options)
        inp = _input(form)
        expected, after_ref = _draw(ref, inp, seed=11)
        got, after = _draw(ours, inp, seed=11)
        assert ours.last_path == "fused"
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)
        assert torch.equal(after, after_ref), (L, bidirectional, p)


def _mix(cell, x_spec, h_spec, w_spec, backend):
    """A layer with weights w_spec and a call with input x_spec and states
    h_spec, each (device, dtype); its outcome as a comparable value."""
    cls = LAYERS[cell][0] if backend is None else LAYERS[cell][1]
    kw = {} if backend is None else {"backend": backend}
    torch.manual_seed(0)
    layer = cls(3, 4, device=w_spec[0], dtype=w_spec[1], **kw)
    x = torch.randn(2, 1, 3, dtype=x_spec[1]).to(x_spec[0])
    h = torch.full((1, 1, 4), 0.5, dtype=h_spec[1]).to(h_spec[0])
    hx = (h, h.clone()) if cell == "lstm" else h
    try:
        out, h_n = layer(x, hx)
    except (RuntimeError, ValueError) as exc:
        return type(exc), str(exc)
    finals = h_n if isinstance(h_n, tuple) else (h_n,)
    return [(t.device, t.dtype, t.shape, None if t.is_meta else t.detach()) for t in (out, *finals)]


@pytest.mark.parametrize("cell", list(LAYERS))
def test_device_and_dtype_mixes_fail_like_torch_nn(cell):
    """Every mix of devices (cpu, meta) and dtypes (float32, float64) over
    the input, the states and the weights: the fused layer raises what
    torch.nn raises (nn's words first, where nn's own are oneDNN's and
    fastrnn's say what is wrong), and where torch.nn computes, it computes
    the same thing, on the same device; no mix reaches a kernel."""
    specs = list(itertools.product(["cpu", "meta"], [torch.float32, torch.float64]))
    for x_spec, h_spec, w_spec in itertools.product(specs, repeat=3):
        expected = _mix(cell, x_spec, h_spec, w_spec, None)
        got = _mix(cell, x_spec, h_spec, w_spec, "fused")
        where = (x_spec, h_spec, w_spec)
        if isinstance(expected, tuple):
            assert isinstance(got, tuple) and got[0] is expected[0], (where, got, expected)
            assert got[1].startswith(expected[1]), (where, got[1], expected[1])
            continue
        assert not isinstance(got, tuple), (where, got)
        for (dev, dt, shape, value), (dev_r, dt_r, shape_r, value_r) in zip(got, expected):
            assert (dev, shape) == (dev_r, shape_r), where
            if value is not None:  # (on the meta device nn promotes mixed dtypes)
                assert dt == dt_r, where
                torch.testing.assert_close(value, value_r)


def test_lstm_cell_state_of_a_wider_dtype_is_promoted_like_torch_nn():
    """A float32 c_0 for float64 weights: torch.nn promotes it in the cell
    arithmetic; the fused LSTM casts it, which agrees to the bit."""
    ref, ours = pair(3, 4, "lstm", dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    h0 = torch.randn(1, 2, 4, dtype=torch.float64)
    c0 = torch.randn(1, 2, 4, dtype=torch.float32)
    (y, (h, c)), (y_r, (h_r, c_r)) = ours(x, (h0, c0)), ref(x, (h0, c0))
    assert c.dtype == c_r.dtype == torch.float64
    for a, b in ((y, y_r), (h, h_r), (c, c_r)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("cell", list(LAYERS))
def test_meta_state_with_cpu_input_never_reaches_the_op(cell):
    """The op itself (what torch.compile and torch.func call) refuses a meta
    state beside CPU tensors, in its meta kernel too."""
    layer = LAYERS[cell][1](3, 4, backend="fused")
    x = torch.randn(2, 1, 3)
    meta = torch.zeros(1, 1, 4, device="meta")
    w = layer._weights()
    name, states = {"lstm": ("lstm", [meta, meta]), "gru": ("gru", [meta])}.get(cell, ("rnn_tanh", [meta]))
    with pytest.raises(RuntimeError, match="hx must be on the input's device cpu, got meta"):
        torch.ops.fastrnn.forward(name, x, states, w, None, None, 1, False, True, False)


def test_dropout_of_one_leaves_the_generator_alone():
    """torch.nn multiplies by zero at p = 1 and draws nothing."""
    ours = fastrnn.GRU(3, 4, 3, dropout=1.0, backend="fused")
    torch.manual_seed(3)
    ours(torch.randn(5, 2, 3))
    after = torch.rand(3)
    torch.manual_seed(3)
    torch.randn(5, 2, 3)
    assert torch.equal(torch.rand(3), after)
