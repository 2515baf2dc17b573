"""What people do to a torch.nn recurrent layer, done to fastrnn's fused
layers: function transforms, forward-mode AD, vmap (which torch.nn's layers
lack), the FLOP counter, ONNX export, TorchScript, float16/bfloat16 and
autocast on the CPU."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap
from torch.utils.flop_counter import FlopCounterMode

import fastrnn
from helpers import CELLS, LAYERS, compare, initial_state, leaf, packed_leaf, pair

F64 = torch.float64


def layers(cell, options, **kw):
    ref, ours = pair(3, 4, cell, dtype=F64, num_layers=2, bidirectional=True, **options, **kw)
    return ref, ours


def call(module, params, x, states=()):
    """module(x, state) with params, the state given as its tensors (h0, or
    h0 and c0; none for zeros)."""
    args = (x,) if not states else (x, tuple(states) if len(states) > 1 else states[0])
    return functional_call(module, params, args)


def loss_fn(module):
    def f(params, x, *s):
        y, h = call(module, params, x, s)
        finals = h if isinstance(h, tuple) else (h,)
        return y.pow(2).sum() + sum(t.sin().sum() for t in finals)
    return f


def params_of(m):
    return {k: v.detach() for k, v in m.named_parameters()}


def assert_trees_close(a, b):
    fa, fb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    assert len(fa) == len(fb)
    for p, q in zip(fa, fb):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


TRANSFORMS = {
    "grad": lambda f, p, x: grad(f)(p, x),
    "grad_input": lambda f, p, x: grad(f, argnums=1)(p, x),
    "vjp": lambda f, p, x: vjp(lambda x: f(p, x), x)[1](torch.tensor(1.0, dtype=F64)),
    "jacrev": lambda f, p, x: jacrev(f, argnums=1)(p, x),
    "jacfwd": lambda f, p, x: jacfwd(f, argnums=1)(p, x),
    "jvp": lambda f, p, x: jvp(lambda x: f(p, x), (x,), (torch.ones_like(x),)),
    "hessian": lambda f, p, x: hessian(lambda x: f(p, x))(x),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("cell,options", CELLS)
def test_function_transforms_agree_with_torch_nn(cell, options, transform):
    ref, ours = layers(cell, options)
    x = torch.randn(5, 2, 3, dtype=F64)
    got = TRANSFORMS[transform](loss_fn(ours), params_of(ours), x)
    assert ours.last_path == "fused"
    want = TRANSFORMS[transform](loss_fn(ref), params_of(ref), x)
    assert_trees_close(got, want)


@pytest.mark.parametrize("cell,options", CELLS)
def test_forward_mode_ad_agrees_with_torch_nn(cell, options):
    import torch.autograd.forward_ad as fwAD

    ref, ours = layers(cell, options)
    x = torch.randn(5, 2, 3, dtype=F64)
    tangent = torch.randn_like(x)
    results = []
    for m in (ours, ref):
        with fwAD.dual_level():
            y, h = m(fwAD.make_dual(x, tangent))
            finals = h if isinstance(h, tuple) else (h,)
            results.append([fwAD.unpack_dual(t).tangent for t in (y, *finals)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cell,options", CELLS)
def test_gradcheck_with_forward_ad(cell, options):
    _, ours = layers(cell, options)
    x = leaf(4, 2, 3, dtype=F64)
    state = initial_state(ours, 2, dtype=F64)
    states = state if isinstance(state, tuple) else (state,)

    def f(x, *s):
        y, h = ours(x, s if len(s) == 2 else s[0])
        return (y, *h) if isinstance(h, tuple) else (y, h)

    assert torch.autograd.gradcheck(f, (x, *states), check_forward_ad=True, check_backward_ad=True,
                                    check_batched_grad=True)


def profiled_op_inputs(fn):
    """The input shapes of every fastrnn forward op fn() runs."""
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    return [e.input_shapes[1] for e in prof.events() if e.name == "fastrnn::forward"]


@pytest.mark.parametrize("in_dims", ["input", "input_and_state"])
@pytest.mark.parametrize("cell,options", CELLS)
def test_vmap_folds_the_batch_into_one_call(cell, options, in_dims):
    """vmap over the input (and the initial state) runs the fused kernel once
    with B*N rows and agrees with a loop over B."""
    _, ours = layers(cell, options)
    B, x = 3, torch.randn(3, 5, 2, 3, dtype=F64)
    params = params_of(ours)
    state = initial_state(ours, 2, dtype=F64)
    states = tuple(s.detach().unsqueeze(0).repeat(B, 1, 1, 1) + torch.randn(B, *s.shape, dtype=F64)
                   for s in (state if isinstance(state, tuple) else (state,)))

    def f(x, *s):
        y, h = call(ours, params, x, s)
        return (y, *h) if isinstance(h, tuple) else (y, h)

    args = (x,) if in_dims == "input" else (x, *states)
    shapes = profiled_op_inputs(lambda: vmap(f)(*args))
    # The vmapped call as the profiler records it, then the one kernel call.
    assert shapes.count([5, 2, 3]) <= 1 and [5, B * 2, 3] in shapes
    got = vmap(f)(*args)
    for b in range(B):
        want = f(*(a[b] for a in args))
        for g, w in zip(got, want):
            torch.testing.assert_close(g[b], w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cell,options", CELLS)
def test_vmap_over_weights_runs_an_ensemble(cell, options):
    """vmap over stacked parameters (a model ensemble) runs one stack per
    member and agrees with each model on its own."""
    members = [layers(cell, options)[1] for _ in range(3)]
    stacked = {k: torch.stack([params_of(m)[k] for m in members]) for k in params_of(members[0])}
    x = torch.randn(5, 2, 3, dtype=F64)

    def f(p, x):
        return functional_call(members[0], p, (x,))[0]

    got = vmap(f, in_dims=(0, None))(stacked, x)
    for b, m in enumerate(members):
        torch.testing.assert_close(got[b], m(x)[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cell,options", CELLS)
def test_vmap_of_grad_per_example(cell, options):
    """Per-example gradients, vmap(grad(...)): what torch.nn's layers fail at."""
    _, ours = layers(cell, options)
    xs = torch.randn(3, 5, 2, 3, dtype=F64)
    f = loss_fn(ours)
    got = vmap(grad(f), in_dims=(None, 0))(params_of(ours), xs)
    for b in range(3):
        want = grad(f)(params_of(ours), xs[b])
        for k in want:
            torch.testing.assert_close(got[k][b], want[k], rtol=1e-9, atol=1e-12)


def flops(m, x, state, backward):
    with FlopCounterMode(display=False) as counter:
        y, h = m(x, state)
        if backward:
            finals = h if isinstance(h, tuple) else (h,)
            (y.sum() + sum(t.sum() for t in finals)).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("state_grad", [True, False], ids=["state_grad", "no_state_grad"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("cell,options", CELLS)
def test_flop_counter_counts_what_torch_nn_counts(cell, options, bidirectional, state_grad):
    """The same FLOPs as torch.nn's native step-by-step implementation for the
    same work: with every input needing a gradient both compute every GEMM;
    with an initial state that needs none, neither computes its product
    with W_hh."""
    ref, ours = pair(9, 16, cell, num_layers=2, bidirectional=bidirectional, **options)
    x = leaf(5, 2, 9)
    state = initial_state(ref, 2)
    if not state_grad:
        state = tuple(t.detach() for t in state) if isinstance(state, tuple) else state.detach()
    with torch.backends.mkldnn.flags(enabled=False):
        for backward in (False, True):
            want = flops(ref, x, state, backward)
            assert want > 0
            assert flops(ours, x, state, backward) == want


class Head(nn.Module):
    def __init__(self, cell, **options):
        super().__init__()
        self.rnn = LAYERS[cell][1](3, 8, 2, bidirectional=True, batch_first=True, backend="fused",
                                   **options)
        self.out = nn.Linear(2 * options.get("proj_size", 8), 2)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.out(y)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript_exporter", "dynamo_exporter"])
@pytest.mark.parametrize("cell,options", CELLS)
def test_onnx_export_runs_in_onnxruntime(cell, options, dynamo):
    """Both exporters write torch.nn's graph (the standard ONNX RNN, LSTM and
    GRU operators with the TorchScript exporter), which onnxruntime runs to
    the eager output's precision. LSTM projections export no better than
    nn.LSTM's, which neither exporter supports."""
    ort = pytest.importorskip("onnxruntime")
    model = Head(cell, **options).eval()
    x = torch.randn(4, 6, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if options.get("proj_size"):
            with pytest.raises(Exception):
                _onnx_run(ort, model, x, dynamo)
            return
        out = _onnx_run(ort, model, x, dynamo)
    torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), rtol=1e-5, atol=1e-6)


def _onnx_run(ort, model, x, dynamo):
    if dynamo:
        data = torch.onnx.export(model, (x,), dynamo=True).model_proto.SerializeToString()
    else:
        f = io.BytesIO()
        torch.onnx.export(model, (x,), f, dynamo=False)
        data = f.getvalue()
    session = ort.InferenceSession(data)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("cell", list(LAYERS))
def test_jit_script_takes_the_torch_layer_with_the_same_parameters(cell):
    model = Head(cell).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    x = torch.randn(4, 6, 3)
    torch.testing.assert_close(scripted(x), model(x))
    # The parameters are shared, not copied: training one trains the other.
    with torch.no_grad():
        model.rnn.weight_hh_l0.add_(0.5)
    torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cell,options", CELLS)
def test_cpu_half_types_within_twice_torch_nn_error(cell, options, dtype, lengths):
    """float32 arithmetic and state carry on the CPU (bfloat16's products in
    bfloat16 where the processor can, h rounded for them as torch.nn
    rounds it), rounding what is stored: within twice torch.nn's own error
    against float64, padded or packed (rows past their lengths). For relu the outputs only: a
    pre-activation within rounding of zero takes either side of the kink in
    either implementation, and its gradient with it."""
    ref, ours = pair(4, 16, cell, dtype=dtype, num_layers=2, bidirectional=True, **options)
    x = leaf(12, 3, 4, dtype=dtype)
    if lengths:
        x = packed_leaf(x, [12, 7, 3])
    if options.get("nonlinearity") == "relu":
        truth = copy.deepcopy(ref).double()
        with torch.no_grad():
            want, got, exact = ref(x), ours(x), truth(x.double())
        for a, b, r in zip(want, got, exact):
            a, b, r = (t.data if isinstance(t, nn.utils.rnn.PackedSequence) else t
                       for t in (a, b, r))
            assert b.dtype == dtype
            err_ref = (a.double() - r).abs().max().item()
            assert (b.double() - r).abs().max().item() <= 2 * err_ref + 1e-5 * r.abs().max().item()
        return
    y, _, _ = compare(ref, ours, x)
    assert y.dtype == dtype


@pytest.mark.parametrize("cell,options", CELLS)
def test_cpu_autocast_returns_what_torch_nn_returns(cell, options):
    ref, ours = pair(4, 16, cell, num_layers=2, **options)
    x = torch.randn(6, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = ours(x)
        try:
            y_ref, h_ref = ref(x)
        except RuntimeError as e:
            # nn.LSTM runs through oneDNN here, which has no bfloat16 LSTM
            # for a processor without AVX-512 and says so. Its result where
            # it has one is that of the layer cast to bfloat16 (every
            # output in bfloat16), which torch's own kernels give.
            if cell != "lstm" or "primitive descriptor" not in str(e):
                raise
            with torch.autocast("cpu", enabled=False), torch.backends.mkldnn.flags(enabled=False):
                y_ref, h_ref = copy.deepcopy(ref).bfloat16()(x.bfloat16())
    assert ours.last_path == "fused"
    assert y.dtype == y_ref.dtype
    for a, b in zip(h if isinstance(h, tuple) else (h,), h_ref if isinstance(h_ref, tuple) else (h_ref,)):
        assert a.dtype == b.dtype
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0.05, atol=0.02)
