"""fastrnn.RNNCell, LSTMCell and GRUCell against torch.nn's cells: one step
through the fused op, its values and every gradient, nn's constructor,
parameters and errors, and what people do with a cell (replace_rnn,
compile, torch.func, TorchScript)."""

import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fastrnn
from helpers import CUDA, DEVICES, TOL, assert_backward_twice_needs_retain_graph

# (torch.nn cell, fastrnn cell, constructor options)
CELL_KINDS = [
    pytest.param(nn.RNNCell, fastrnn.RNNCell, dict(nonlinearity="tanh"), id="rnn_tanh"),
    pytest.param(nn.RNNCell, fastrnn.RNNCell, dict(nonlinearity="relu"), id="rnn_relu"),
    pytest.param(nn.LSTMCell, fastrnn.LSTMCell, dict(), id="lstm"),
    pytest.param(nn.GRUCell, fastrnn.GRUCell, dict(), id="gru"),
]


def cell_pair(ref_cls, our_cls, options, C=5, H=7, device="cpu", dtype=torch.float32, **kw):
    ref = ref_cls(C, H, device=device, dtype=dtype, **options, **kw)
    ours = our_cls(C, H, device=device, dtype=dtype, backend="fused", **options, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def state(cell, n, device="cpu", dtype=torch.float32, unbatched=False):
    """Random leaves for the cell's hx: h, or (h, c)."""
    shape = (cell.hidden_size,) if unbatched else (n, cell.hidden_size)

    def one():
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()

    return (one(), one()) if isinstance(cell, nn.LSTMCell) else one()


def step(cell, x, hx):
    """The cell's results as a tuple and the gradients of a loss that weighs
    every element differently, with respect to x, the states and the
    parameters (None where one gets none)."""
    out = cell(x, hx)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o * torch.linspace(-1, 2, o.numel(), dtype=o.dtype, device=o.device)
                .view(o.shape)).sum() for o in outs)
    leaves = [x, *(hx if isinstance(hx, tuple) else (() if hx is None else (hx,)))]
    leaves += list(cell.parameters())
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return outs, grads


def assert_steps_match(ref, ours, x, hx, dtype):
    expected = step(ref, x, hx)
    got = step(ours, x, hx)
    assert ours.last_path == "fused"
    for a, b in zip([*expected[0], *expected[1]], [*got[0], *got[1]]):
        assert (a is None) == (b is None)
        if a is not None:
            assert b.shape == a.shape and b.dtype == a.dtype
            torch.testing.assert_close(b, a, **TOL[dtype])


@pytest.mark.parametrize("packing", ["always", "never"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("form", ["batched", "unbatched", "no_hx", "no_hx_unbatched", "wide"])
@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_step_matches_torch_nn(ref_cls, our_cls, options, form, bias, dtype, device, packing):
    """Outputs and every gradient (input, states, all four parameters), for
    each input form, with the weights packed and as stored; 'wide' has whole
    vectors and a remainder in every product and every block of rows."""
    C, H = (37, 70) if form == "wide" else (5, 7)
    ref, ours = cell_pair(ref_cls, our_cls, options, C=C, H=H, device=device, dtype=dtype,
                          bias=bias)
    unbatched = "unbatched" in form
    n = 9 if form == "wide" else 3
    x = torch.randn(*((C,) if unbatched else (n, C)), device=device, dtype=dtype).requires_grad_()
    hx = None if form.startswith("no_hx") else state(ref, n, device, dtype, unbatched)
    with fastrnn.kernels(cpu_packing=packing):
        assert_steps_match(ref, ours, x, hx, dtype)


def _plain(cell, x, hx):
    out = cell(x, hx)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "nothing_requires_grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("form", ["batched", "unbatched", "no_hx", "wide", "packed"])
@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_step_no_backward_can_follow(ref_cls, our_cls, options, form, bias, dtype, mode):
    """A step that no backward can follow (the CPU kernels called without the
    dispatcher) gives nn's values, and bit for bit those of the same step
    with a graph, which the op computes with the same kernel."""
    C, H = (37, 40) if form in ("wide", "packed") else (5, 7)
    ref, ours = cell_pair(ref_cls, our_cls, options, C=C, H=H, dtype=dtype, bias=bias)
    n = {"wide": 9, "packed": 40}.get(form, 3)
    x = torch.randn(*((C,) if form == "unbatched" else (n, C)), dtype=dtype)
    hx = None if form == "no_hx" else state(ref, n, dtype=dtype, unbatched=form == "unbatched")
    if hx is not None:
        hx = tuple(h.detach() for h in hx) if isinstance(hx, tuple) else hx.detach()
    packing = "always" if form == "packed" else "auto"
    with fastrnn.kernels(cpu_packing=packing):
        graph = _plain(ours, x.clone().requires_grad_(), hx)
        if mode == "nothing_requires_grad":
            for p in ours.parameters():
                p.requires_grad_(False)
            got = _plain(ours, x, hx)
        else:
            with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
                got = _plain(ours, x, hx)
    assert ours.last_path == "fused"
    with torch.inference_mode() if mode == "inference_mode" else torch.no_grad():
        expected = _plain(ref, x, hx)
    for a, b, g in zip(expected, got, graph):
        assert b.shape == a.shape and b.dtype == a.dtype and not b.requires_grad
        assert b.is_inference() == a.is_inference()
        torch.testing.assert_close(b, a, **TOL[dtype])
        assert torch.equal(b, g.detach())


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_jit_trace_without_grad_records_the_step():
    """Traced without grad, the step is the op in the trace, not a constant
    computed outside the dispatcher: the trace follows a new input."""
    cell = fastrnn.GRUCell(5, 7, backend="fused")
    layer = fastrnn.GRU(5, 7, backend="fused")  # a stream's step takes the same route
    with torch.no_grad():
        for m, shape in ((cell, (3,)), (layer, (1, 3))):
            traced = torch.jit.trace(m, (torch.randn(*shape, 5), torch.randn(*shape, 7)),
                                     check_trace=False)
            x, h = torch.randn(*shape, 5), torch.randn(*shape, 7)
            torch.testing.assert_close(traced(x, h), m(x, h))


def test_step_without_grad_shows_in_the_profiler():
    """The step that skips the dispatcher still records the op's name."""
    cell = fastrnn.LSTMCell(5, 7, backend="fused")
    with torch.no_grad(), torch.profiler.profile() as prof:
        cell(torch.randn(3, 5))
    assert [e.name for e in prof.events() if "fastrnn" in e.name] == ["fastrnn::forward"]


def test_step_with_grad_shows_in_the_profiler():
    """A step with a graph runs the forward op's kernel and, in its
    autograd node (fastrnn::FusedBackward), the backward op's: the profiler
    records each once."""
    cell = fastrnn.LSTMCell(5, 7, backend="fused")
    x = torch.randn(3, 5, requires_grad=True)
    with torch.profiler.profile() as prof:
        h, c = cell(x)
        (h.sum() + c.sum()).backward()
    names = [e.name for e in prof.events() if e.name.startswith("fastrnn::")]
    assert sorted(names) == ["fastrnn::FusedBackward", "fastrnn::backward", "fastrnn::forward"]


@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_many_steps_of_a_loop(ref_cls, our_cls, options):
    """A loop of the caller's over 20 steps with the state carried, as a
    decoder runs a cell, backward through all of it."""
    ref, ours = cell_pair(ref_cls, our_cls, options, C=4, H=6, dtype=torch.float64)
    xs = torch.randn(20, 2, 4, dtype=torch.float64, requires_grad=True)

    def unroll(cell):
        hx, outs = None, []
        for x in xs:
            hx = cell(x, hx)
            outs.append(hx[0] if isinstance(hx, tuple) else hx)
        y = torch.stack(outs)
        return y, torch.autograd.grad((y * y.detach().sign()).sum(), [xs, *cell.parameters()])

    y_ref, g_ref = unroll(ref)
    y, g = unroll(ours)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("unbatched", [False, True])
@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_states_with_grad_come_from_the_fused_node(ref_cls, our_cls, options, unbatched):
    """With grad, the new states come straight from the fused autograd node:
    the step's views are made inside it, so the graph has no view nodes
    around it; the gradients through it are nn's."""
    ref, ours = cell_pair(ref_cls, our_cls, options, dtype=torch.float64)
    x = torch.randn(*((5,) if unbatched else (3, 5)), dtype=torch.float64, requires_grad=True)
    hx = state(ref, 3, dtype=torch.float64, unbatched=unbatched)
    grads = []
    for cell in (ref, ours):
        out = cell(x, hx)
        outs = out if isinstance(out, tuple) else (out,)
        if cell is ours:
            assert all(o.grad_fn.name() == "fastrnn::FusedBackward" and o._base is None for o in outs)
        loss = sum((o * o).sum() for o in outs)
        leaves = [x, *(hx if isinstance(hx, tuple) else (hx,)), *cell.parameters()]
        grads.append(torch.autograd.grad(loss, leaves))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, **TOL[torch.float64])


def _outs(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("grad_form", ["expanded", "transposed"])
@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_step_node_takes_gradients_of_any_strides(ref_cls, our_cls, options, grad_form):
    """The node reads gradients that are not contiguous (a sum's, expanded
    from one value; a transposed one) as nn's cells do."""
    ref, ours = cell_pair(ref_cls, our_cls, options, C=6, H=9, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    hx = state(ref, 4, dtype=torch.float64)
    leaves = [x, *_outs(hx), *ref.parameters()]
    if grad_form == "expanded":
        grad = torch.tensor(0.7, dtype=torch.float64).expand(4, 9)
    else:
        grad = torch.randn(9, 4, dtype=torch.float64).t()
    assert not grad.is_contiguous()
    got = torch.autograd.grad(_outs(ours(x, hx))[0], [x, *_outs(hx), *ours.parameters()], grad)
    assert _outs(ours(x, hx))[0].grad_fn.name() == "fastrnn::FusedBackward"
    expected = torch.autograd.grad(_outs(ref(x, hx))[0], leaves, grad)
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, **TOL[torch.float64])


@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_step_node_keeps_autograds_rules(ref_cls, our_cls, options):
    """The node's saved tensors follow autograd's rules: freed after a
    backward (a second one fails as torch's do) unless retain_graph, checked
    against writes in place, and packed by saved-tensor hooks."""
    _, ours = cell_pair(ref_cls, our_cls, options)
    x = torch.randn(3, 5, requires_grad=True)
    hx = state(ours, 3)
    loss = sum(o.sum() for o in _outs(ours(x, hx)))
    assert_backward_twice_needs_retain_graph(loss, [x, *ours.parameters()])

    out = _outs(ours(x, hx))[0]
    with torch.no_grad():
        ours.weight_hh.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    out = _outs(ours(x, hx))[0]
    out.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()

    packed = []

    def pack(t):
        packed.append(t)
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = _outs(ours(x, hx))
    assert any(t is x for t in packed) and any(t is ours.weight_ih for t in packed)
    got = torch.autograd.grad(outs[0].sum(), [x, ours.weight_ih])
    expected = torch.autograd.grad(_outs(ours(x, hx))[0].sum(), [x, ours.weight_ih])
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_step_node_with_batched_gradients(ref_cls, our_cls, options):
    """Gradients batched by autograd.grad(is_grads_batched=True) through the
    node: each one as a call of its own gives."""
    ref, ours = cell_pair(ref_cls, our_cls, options, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    hx = state(ref, 3, dtype=torch.float64)
    grads = torch.randn(4, 3, 7, dtype=torch.float64)
    for cell in (ref, ours):
        (got,) = torch.autograd.grad(_outs(cell(x, hx))[0], x, grads, is_grads_batched=True)
        for g, b in zip(grads, got):
            (one,) = torch.autograd.grad(_outs(ref(x, hx))[0], x, g)
            torch.testing.assert_close(b, one, **TOL[torch.float64])


@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_gradcheck_and_gradgradcheck(ref_cls, our_cls, options):
    _, ours = cell_pair(ref_cls, our_cls, options, C=3, H=4, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    hx = state(ours, 2, dtype=torch.float64)
    flat = list(hx) if isinstance(hx, tuple) else [hx]
    params = list(ours.parameters())

    def f(x, *rest):
        states, weights = rest[:len(flat)], rest[len(flat):]
        names = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
        out = torch.func.functional_call(
            ours, dict(zip(names, weights)),
            (x, tuple(states) if len(states) == 2 else states[0]))
        return out

    inputs = (x, *flat, *[p.detach().requires_grad_() for p in params])
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)
    assert ours.last_path == "fused"


def _error_of(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the exception is what is compared
        return type(exc), str(exc)
    return None


BAD_CALLS = {
    "input_3d": lambda c, s: (torch.randn(2, 3, 5), s(3)),
    "input_size": lambda c, s: (torch.randn(3, 4), s(3)),
    "batch": lambda c, s: (torch.randn(2, 5), s(3)),
    "hidden_size": lambda c, s: (torch.randn(3, 5), s(3, 6)),
    "hidden_3d": lambda c, s: (torch.randn(3, 5), s(3, 7, lead=(1,))),
    "unbatched_input_batched_hx": lambda c, s: (torch.randn(5), s(1)),
    "batched_input_unbatched_hx": lambda c, s: (torch.randn(1, 5), s(None)),
    "hx_dtype": lambda c, s: (torch.randn(3, 5), s(3, dtype=torch.float64)),
    "input_dtype": lambda c, s: (torch.randn(3, 5, dtype=torch.float64), s(3)),
    "int_input": lambda c, s: (torch.ones(3, 5, dtype=torch.int64), s(3)),
    "meta_hx": lambda c, s: (torch.randn(3, 5), s(3, device="meta")),
}


@pytest.mark.parametrize("bad", sorted(BAD_CALLS))
@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_bad_calls_fail_like_torch_nn(ref_cls, our_cls, options, bad):
    """Every bad call raises torch.nn's exception with its message (or, where
    torch.nn computes, gives its result)."""
    ref, ours = cell_pair(ref_cls, our_cls, options)
    lstm = ref_cls is nn.LSTMCell

    def s(n, width=7, dtype=torch.float32, device="cpu", lead=()):
        shape = (*lead, width) if n is None else (*lead, n, width)
        h = torch.randn(*shape, dtype=dtype, device=device)
        return (h, h.clone()) if lstm else h

    x, hx = BAD_CALLS[bad](ours, s)
    expected = _error_of(lambda: ref(x, hx))
    got = _error_of(lambda: ours(x, hx))
    if expected is None:
        a, b = ref(x, hx), ours(x, hx)
        for p, q in zip(a if lstm else (a,), b if lstm else (b,)):
            assert q.shape == p.shape and q.dtype == p.dtype and q.device == p.device
            if p.device.type != "meta":
                torch.testing.assert_close(q, p)
    else:
        assert got == expected


@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_lstm_state_pair_errors(ref_cls, our_cls, options):
    if ref_cls is not nn.LSTMCell:
        pytest.skip("LSTMCell's pair only")
    ref, ours = cell_pair(ref_cls, our_cls, options)
    x, h = torch.randn(3, 5), torch.randn(3, 7)
    for hx in [(h,), (h, h, h), (h, torch.randn(3, 7, 1)), (h, torch.randn(3, 6))]:
        assert _error_of(lambda: ours(x, hx)) == _error_of(lambda: ref(x, hx))


def test_unknown_nonlinearity_fails_like_torch_nn():
    ref, ours = nn.RNNCell(3, 4, nonlinearity="gelu"), fastrnn.RNNCell(3, 4, nonlinearity="gelu",
                                                                       backend="fused")
    x = torch.randn(2, 3)
    assert _error_of(lambda: ours(x)) == _error_of(lambda: ref(x))
    assert _error_of(lambda: ours(x)) is not None


@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_constructor_parameters_and_state_dict(ref_cls, our_cls, options):
    for bias in (True, False):
        torch.manual_seed(3)
        ref = ref_cls(5, 7, bias=bias, **options)
        torch.manual_seed(3)
        ours = our_cls(5, 7, bias=bias, **options)
        # nn's initialisation, draw for draw, and its names and shapes.
        assert [(n, p.shape) for n, p in ours.named_parameters()] == \
            [(n, p.shape) for n, p in ref.named_parameters()]
        for p, q in zip(ref.parameters(), ours.parameters()):
            assert torch.equal(p, q)
        assert repr(ours) == repr(ref)
        assert isinstance(ours, ref_cls)
        assert list(ours.state_dict()) == list(ref.state_dict())
        ref.load_state_dict(ours.state_dict())
        ours.load_state_dict(ref.state_dict())
    ours = our_cls(5, 7, backend="fused", dtype=torch.float64, **options)
    assert repr(ours).endswith("backend='fused')")
    assert ours.weight_ih.dtype == torch.float64
    with pytest.raises(ValueError, match="Unknown backend"):
        our_cls(5, 7, backend="nope", **options)


@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_backends(ref_cls, our_cls, options):
    """'auto' runs torch.nn's cell on CPU tensors, 'fused' the fused op, and
    use_backend switches a cell built without one."""
    _, ours = cell_pair(ref_cls, our_cls, options)
    ours.backend = None
    x = torch.randn(2, 5)
    ours(x)
    assert ours.last_path == "torch"
    with fastrnn.use_backend("fused"):
        ours(x)
        assert ours.last_path == "fused"
    ours.backend = "torch"
    with fastrnn.use_backend("fused"):
        ours(x)
        assert ours.last_path == "torch"


def test_replace_and_restore_swap_cells():
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.RNNCell(3, 4, nonlinearity="relu", bias=False)
            self.lstm = nn.LSTMCell(4, 5)
            self.gru = nn.GRUCell(5, 6)

        def forward(self, x):
            h = self.rnn(x)
            h, _ = self.lstm(h)
            return self.gru(h)

    model = Decoder()
    params = list(model.parameters())
    x = torch.randn(2, 3)
    expected = model(x)
    fastrnn.replace_rnn(model, backend="fused")
    assert [type(m) for m in model.children()] == [fastrnn.RNNCell, fastrnn.LSTMCell,
                                                   fastrnn.GRUCell]
    assert model.rnn.nonlinearity == "relu" and model.rnn.bias is False
    assert all(p is q for p, q in zip(model.parameters(), params))
    torch.testing.assert_close(model(x), expected)
    assert all(m.last_path == "fused" for m in model.children())
    fastrnn.restore_rnn(model)
    assert [type(m) for m in model.children()] == [nn.RNNCell, nn.LSTMCell, nn.GRUCell]
    assert all(p is q for p, q in zip(model.parameters(), params))


def test_replace_rebases_a_cell_subclass():
    class Scaled(nn.GRUCell):
        def forward(self, x, hx=None):
            return 2 * super().forward(x, hx)

    model = nn.Sequential(Scaled(3, 4))
    x = torch.randn(2, 3)
    expected = model(x)
    with pytest.warns(UserWarning, match="left 1 alone"):
        fastrnn.replace_rnn(model)
    fastrnn.replace_rnn(model, backend="fused", subclasses=True)
    assert isinstance(model[0], Scaled) and isinstance(model[0], fastrnn.GRUCell)
    torch.testing.assert_close(model(x), expected)
    assert model[0].last_path == "fused"


@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_compile_fullgraph_matches_eager(ref_cls, our_cls, options):
    _, ours = cell_pair(ref_cls, our_cls, options)
    x, hx = torch.randn(3, 5), state(ours, 3)
    expected = ours(x, hx)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    got = compiled(x, hx)
    for a, b in zip(got if isinstance(got, tuple) else (got,),
                    expected if isinstance(expected, tuple) else (expected,)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_vmap_and_jacrev(ref_cls, our_cls, options):
    ref, ours = cell_pair(ref_cls, our_cls, options, C=3, H=4, dtype=torch.float64)
    xs = torch.randn(6, 2, 3, dtype=torch.float64)

    def first(cell):
        return lambda x: (lambda o: o[0] if isinstance(o, tuple) else o)(cell(x))

    # (torch.nn's LSTMCell has no batching rule: the reference is a loop.)
    torch.testing.assert_close(torch.vmap(first(ours))(xs),
                               torch.stack([first(ref)(x) for x in xs]))
    torch.testing.assert_close(torch.func.jacrev(first(ours))(xs[0]),
                               torch.autograd.functional.jacobian(first(ref), xs[0]))
    assert ours.last_path == "fused"


@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_torchscript_and_pickle(ref_cls, our_cls, options):
    ref, ours = cell_pair(ref_cls, our_cls, options)
    x = torch.randn(2, 5)
    scripted = torch.jit.script(ours)
    out, expected = scripted(x), ref(x)
    for a, b in zip(out if isinstance(out, tuple) else (out,),
                    expected if isinstance(expected, tuple) else (expected,)):
        torch.testing.assert_close(a, b)
    again = copy.deepcopy(ours)
    assert type(again) is our_cls and again.backend == "fused"
    again(x)
    assert again.last_path == "fused"


@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_weight_written_through_data_is_seen(ref_cls, our_cls, options):
    """Nothing of the weights is kept between calls: a write through .data
    (which bumps no version counter) shows in the next step."""
    ref, ours = cell_pair(ref_cls, our_cls, options)
    x = torch.randn(1, 5)
    ours(x)
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(0.5)
    for p, q in zip(ours.parameters(), ref.parameters()):
        p.data.copy_(q)
    for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (ours(x), ref(x)))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_zero_batch(ref_cls, our_cls, options):
    ref, ours = cell_pair(ref_cls, our_cls, options)
    x = torch.randn(0, 5)
    for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (ours(x), ref(x)))):
        assert a.shape == b.shape


@CUDA
@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_cuda_step_records_its_path(ref_cls, our_cls, options):
    ref, ours = cell_pair(ref_cls, our_cls, options, device="cuda")
    ours(torch.randn(3, 5, device="cuda"))
    assert ours.last_path == "fused"
    assert ours.last_cuda_path in ("persistent", "cluster", "grid", "step")


@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_step_of_many_rows_as_stored_matches_torch_nn(ref_cls, our_cls, options):
    """A single step of up to 128 rows reads the weights as stored on 'auto'
    (recurrence_cpu.cpp, kUnpackedStepRows), in chunks of rows whose inputs
    stay in L2 (dot_gemm): at input and hidden 300 in float64 the 62 rows
    are two chunks, the last with rows left over from blocks of four (on
    one thread: two would split the rows first)."""
    ref, ours = cell_pair(ref_cls, our_cls, options, C=300, H=300, dtype=torch.float64)
    x = torch.randn(62, 300, dtype=torch.float64).requires_grad_()
    hx = state(ref, 62, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert_steps_match(ref, ours, x, hx, torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(ours(x, hx), ref(x, hx), **TOL[torch.float64])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("batch", [1, 5, 13])
@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_step_of_large_weights_splits_units_between_threads(ref_cls, our_cls, options, batch):
    """Where a cell's weights pass 512 KB and its rows are few (fewer than
    4 a thread, 8 on Intel processors: batch 13 splits its rows elsewhere
    and its units there), two threads each read the rows of the weights
    of their slice of the units (recurrence_cpu.cpp, forward_columns_loop):
    as torch.nn's cell, with its gradients, and one thread's bits. Hidden
    300 leaves a slice that ends inside a vector."""
    ref, ours = cell_pair(ref_cls, our_cls, options, C=211, H=300)
    x = torch.randn(batch, 211).requires_grad_()
    hx = state(ref, batch)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert_steps_match(ref, ours, x, hx, torch.float32)
        with torch.no_grad():
            two = ours(x, hx)
            torch.testing.assert_close(two, ref(x, hx), **TOL[torch.float32])
        torch.set_num_threads(1)
        with torch.no_grad():
            one = ours(x, hx)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (one, two))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_rows_do_not_depend_on_the_rows_beside_them(ref_cls, our_cls, options, threads):
    """A step's products with its weights as stored (up to 128 rows) sum each
    row's products in one order whatever block of rows it falls in (blocks
    of 4, of 2 over more weight rows for 2 and 3 rows, and single rows), and
    the input's gradient likewise (tasks of up to four rows by 64 columns):
    each row's outputs and dx are, bit for bit, those of the row called
    alone, on one thread or two. Input 211 spans four blocks of columns, the
    last one partial; hidden 100 ends inside a vector."""
    _, ours = cell_pair(ref_cls, our_cls, options, C=211, H=100)
    lstm = isinstance(ours, nn.LSTMCell)

    def run(x, hx):
        x = x.detach().requires_grad_()
        out = ours(x, hx)
        outs = out if isinstance(out, tuple) else (out,)
        sum((o * torch.linspace(-1, 2, o.shape[-1])).sum() for o in outs).backward()
        return [o.detach() for o in outs] + [x.grad]

    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for batch in (3, 9):
            x = torch.randn(batch, 211)
            h = torch.randn(batch, 100)
            hx = (h, torch.randn(batch, 100)) if lstm else h
            whole = run(x, hx)
            for r in range(batch):
                hr = tuple(t[r:r + 1] for t in hx) if lstm else hx[r:r + 1]
                for a, b in zip(run(x[r:r + 1], hr), whole):
                    assert torch.equal(a, b[r:r + 1]), (batch, r)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_auto_packing_reads_few_rows_as_stored(cell):
    """On 'auto' a call of at most 32 rows times steps, or a single step of
    at most 128 rows, reads the weights as stored and a larger one packs
    them: each gives the bits of the layout forced."""
    layer = {"rnn": fastrnn.RNN, "lstm": fastrnn.LSTM, "gru": fastrnn.GRU}[cell](
        40, 40, backend="fused")

    def bits(x, h, packing):
        with fastrnn.kernels(cpu_packing=packing), torch.no_grad():
            return layer(x, (h, h) if cell == "lstm" else h)[0]

    for shape, layout in (((1, 4, 40), "never"), ((4, 8, 40), "never"), ((5, 8, 40), "always"),
                          ((1, 128, 40), "never"), ((1, 129, 40), "always")):
        x, h = torch.randn(*shape), torch.randn(1, shape[1], 40)
        other = "always" if layout == "never" else "never"
        assert torch.equal(bits(x, h, "auto"), bits(x, h, layout))
        # The layouts sum products in different orders (a dot product of 40
        # spans several vector lanes, summed across them at its end; a packed
        # panel adds them one by one): the check can tell them apart.
        assert not torch.equal(bits(x, h, "auto"), bits(x, h, other))


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_auto_packing_reads_large_weights_as_stored_for_one_row(cell):
    """Where a step's weights pass 512 KB, a call of one row a direction
    reads them as stored however many steps it has (a row cannot repay the
    packing, and two threads split the weights' rows), and a call of two
    rows packs them from 33 rows times steps as before; each gives the bits
    of the layout forced, and torch.nn's results."""
    cls = {"rnn": (nn.RNN, fastrnn.RNN), "lstm": (nn.LSTM, fastrnn.LSTM),
           "gru": (nn.GRU, fastrnn.GRU)}[cell]
    hidden = {"rnn": 400, "lstm": 200, "gru": 240}[cell]  # weights over 512 KB
    ref = cls[0](5, hidden, bidirectional=True)
    layer = cls[1](5, hidden, bidirectional=True, backend="fused")
    layer.load_state_dict(ref.state_dict())

    def bits(x, packing):
        with fastrnn.kernels(cpu_packing=packing), torch.no_grad():
            return layer(x)[0]

    for shape, layout in (((40, 1, 5), "never"), ((17, 2, 5), "always")):
        x = torch.randn(*shape)
        other = "always" if layout == "never" else "never"
        assert torch.equal(bits(x, "auto"), bits(x, layout))
        assert not torch.equal(bits(x, "auto"), bits(x, other))
        with torch.no_grad():
            torch.testing.assert_close(bits(x, "auto"), ref(x)[0], **TOL[torch.float32])


@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_a_lone_rows_calls_walk_the_weights_both_ways_with_the_same_bits(ref_cls, our_cls,
                                                                         options):
    """A thread's calls of one row and an odd number of steps walk the
    weights as stored from alternate ends (ForwardParams::flip): consecutive
    calls on the same arguments give the same bits, and torch.nn's results.
    39 units: whole blocks of four weight rows and three alone."""
    ref, ours = cell_pair(ref_cls, our_cls, options, C=21, H=39)
    x, hx = torch.randn(1, 21), state(ref, 1)
    with torch.no_grad(), fastrnn.kernels(cpu_packing="never"):
        outs = [ours(x, hx) for _ in range(3)]
        expected = ref(x, hx)
    outs = [o if isinstance(o, tuple) else (o,) for o in outs]
    expected = expected if isinstance(expected, tuple) else (expected,)
    for a, b in zip(outs[0], expected):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    for later in outs[1:]:
        for a, b in zip(later, outs[0]):
            assert torch.equal(a, b)
    # A layer's call of 3 steps, then the next: the second starts the other way.
    layer_cls = {nn.RNNCell: fastrnn.RNN, nn.LSTMCell: fastrnn.LSTM, nn.GRUCell: fastrnn.GRU}
    layer = layer_cls[ref_cls](21, 39, backend="fused", **options)
    xs = torch.randn(3, 1, 21)
    with torch.no_grad(), fastrnn.kernels(cpu_packing="never"):
        first, second = layer(xs)[0], layer(xs)[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dot_form_prefetch_of_weights_past_16_mb(dtype):
    """A step whose weights pass 16 MB prefetches the next block of weight
    rows in the dot form (recurrence_cpu_kernels.h, kDotAheadBytes): a
    layer's call of one row and a cell's step, as torch.nn's."""
    hidden = 1024 if dtype == torch.float32 else 724
    ref = nn.LSTM(32, hidden, dtype=dtype)
    ours = fastrnn.LSTM(32, hidden, dtype=dtype, backend="fused")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 1, 32, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], ref(x)[0], **TOL[dtype])
    cref, cours = cell_pair(nn.LSTMCell, fastrnn.LSTMCell, {}, C=32, H=hidden, dtype=dtype)
    assert_steps_match(cref, cours, torch.randn(2, 32, dtype=dtype).requires_grad_(),
                       state(cref, 2, dtype=dtype), dtype)


@pytest.mark.skipif(not fastrnn.cuda_built(), reason="needs the CUDA build")
@pytest.mark.parametrize("path", ["persistent", "cluster", "grid", "step"])
@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_every_cuda_path_through_the_emulator(ref_cls, our_cls, options, path):
    """A cell's step is a one-step call of the layer's op, so on CUDA every
    path can run it: each, through the CUDA kernels' emulator on CPU
    tensors, forward and backward, against torch.nn's cell."""
    ref, ours = cell_pair(ref_cls, our_cls, options, C=4, H=9, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    hx = state(ref, 3, dtype=torch.float64)
    with fastrnn.kernels(cuda_path=path, emulate_cuda=True):
        assert_steps_match(ref, ours, x, hx, torch.float64)
        assert fastrnn.last_cuda_path() == fastrnn.last_cuda_path(backward=True) == path


@pytest.mark.parametrize("with_hx", [True, False])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_autocast_gives_torch_nns_dtypes(ref_cls, our_cls, options, device, with_hx):
    """Under autocast nn's cells return the autocast dtype (RNNCell) or the
    given state's (LSTMCell, GRUCell, whose last operation meets the state):
    the same dtypes, values to the autocast dtype's precision."""
    ref, ours = cell_pair(ref_cls, our_cls, options, device=device)
    x = torch.randn(3, 5, device=device)
    hx = state(ref, 3, device) if with_hx else None
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        expected, got = ref(x, hx), ours(x, hx)
    assert ours.last_path == "fused"
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, tuple) else (got,)
    for a, b in zip(expected, got):
        assert b.dtype == a.dtype
        torch.testing.assert_close(b.float(), a.float(), **TOL[dtype])


# Random cells, sizes and call forms against torch.nn's (FASTRNN_FUZZ_EXAMPLES
# searches deeper, as for the layers).
_FUZZ = settings(max_examples=int(os.environ.get("FASTRNN_FUZZ_EXAMPLES", "60")),
                 derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(kind=st.sampled_from(["rnn_tanh", "rnn_relu", "lstm", "gru"]), C=st.integers(1, 40),
       H=st.integers(1, 40), N=st.integers(0, 9), bias=st.booleans(),
       form=st.sampled_from(["batched", "unbatched", "no_hx"]),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       packing=st.sampled_from(["auto", "always", "never"]), seed=st.integers(0, 2**16))
def test_random_cells_match_torch_nn(kind, C, H, N, bias, form, dtype, packing, seed):
    ref_cls, our_cls, options = {
        "rnn_tanh": (nn.RNNCell, fastrnn.RNNCell, dict(nonlinearity="tanh")),
        "rnn_relu": (nn.RNNCell, fastrnn.RNNCell, dict(nonlinearity="relu")),
        "lstm": (nn.LSTMCell, fastrnn.LSTMCell, {}),
        "gru": (nn.GRUCell, fastrnn.GRUCell, {}),
    }[kind]
    torch.manual_seed(seed)
    ref, ours = cell_pair(ref_cls, our_cls, options, C=C, H=H, dtype=dtype, bias=bias)
    unbatched = form == "unbatched"
    x = torch.randn(*((C,) if unbatched else (N, C)), dtype=dtype, requires_grad=True)
    hx = None if form == "no_hx" else state(ref, N, dtype=dtype, unbatched=unbatched)
    with fastrnn.kernels(cpu_packing=packing):
        assert_steps_match(ref, ours, x, hx, dtype)


@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_flop_counter_counts_torch_nns_flops(ref_cls, our_cls, options):
    """FlopCounterMode sees the step's op and counts what it counts for
    torch.nn's cell: both products."""
    from torch.utils.flop_counter import FlopCounterMode

    ref, ours = cell_pair(ref_cls, our_cls, options)
    x = torch.randn(3, 5)
    counts = []
    for cell in (ref, ours):
        with FlopCounterMode(display=False) as counter:
            cell(x, state(ref, 3))
        counts.append(counter.get_total_flops())
    assert counts[1] == counts[0] > 0


@pytest.mark.parametrize("ref_cls,our_cls,options", CELL_KINDS)
def test_weight_gradients_in_recycled_memory_stay_apart(ref_cls, our_cls, options):
    """A weight's gradient of 256 KB or more comes in memory that an earlier
    one of the same size gave back: a gradient still alive is never handed
    out again, and each of two taken one after the other holds its own
    values."""
    ref, ours = cell_pair(ref_cls, our_cls, options, C=96, H=260)
    assert ours.weight_hh.numel() * 4 >= 256 << 10
    x = torch.randn(2, 96)

    def grads(cell, scale):
        out = _outs(cell(x * scale))[0]
        return torch.autograd.grad(out.sum(), list(cell.parameters()))

    kept = grads(ours, 1.0)
    copies = [g.clone() for g in kept]
    given_back = grads(ours, 5.0)
    del given_back
    second, third = grads(ours, 2.0), grads(ours, 3.0)
    ptrs = [g.data_ptr() for g in (*kept, *second, *third)]
    assert len(set(ptrs)) == len(ptrs)
    for scale, got in ((2.0, second), (3.0, third)):
        for a, b in zip(grads(ref, scale), got):
            torch.testing.assert_close(b, a)
    for k, c in zip(kept, copies):
        assert torch.equal(k, c)


@pytest.mark.skipif(not hasattr(torch.autograd.graph, "node_creation_hook"),
                    reason="this torch has no node-creation hooks")
def test_node_creation_hooks_see_the_fused_node():
    """torch.autograd.graph.node_creation_hook sees the step's node, with
    its next edges wired, as it sees torch's own."""
    cell = fastrnn.GRUCell(5, 7, backend="fused")
    x = torch.randn(3, 5, requires_grad=True)
    seen = []
    with torch.autograd.graph.node_creation_hook(
            lambda node: seen.append((node.name(), len(node.next_functions)))):
        out = cell(x)
    assert ("fastrnn::FusedBackward", 6) in seen
    assert out.grad_fn.name() == "fastrnn::FusedBackward"
