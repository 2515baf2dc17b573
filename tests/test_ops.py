"""The ops called directly: against the reference loop (with lengths and
dropout masks, which nn.RNN cannot be handed), gradcheck, opcheck, and clear
errors for malformed arguments."""

import pytest
import torch

from fastrnn import rnn_reference
from helpers import DEVICES

fwd = torch.ops.fastrnn.rnn_forward
bwd = torch.ops.fastrnn.rnn_backward


def make_args(T=5, N=3, C=4, H=5, L=2, bidirectional=True, bias=True, relu=False,
              lengths=None, dropout=False, dtype=torch.float64, device="cpu", grad=True):
    D = 2 if bidirectional else 1
    g = torch.Generator().manual_seed(1)

    def rnd(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g, dtype=dtype) * scale).to(device)
        return t.requires_grad_(grad)

    x = rnd(T, N, C)
    hx = rnd(L * D, N, H)
    weights = []
    for layer in range(L):
        for _ in range(D):
            weights += [rnd(H, C if layer == 0 else D * H, scale=0.5), rnd(H, H, scale=0.5)]
            if bias:
                weights += [rnd(H, scale=0.5), rnd(H, scale=0.5)]
    lens = torch.tensor(lengths, device=device) if lengths is not None else None
    mask = None
    if dropout and L > 1:
        keep = (torch.rand(L - 1, T, N, D * H, generator=g) > 0.3).to(dtype) / 0.7
        mask = keep.to(device)
    return x, hx, weights, lens, mask, L, bidirectional, bias, relu


CASES = {
    "one_layer": dict(L=1, bidirectional=False),
    "stack_bidir": dict(L=2, bidirectional=True),
    "relu_no_bias": dict(L=2, bidirectional=False, bias=False, relu=True),
    "lengths": dict(L=2, bidirectional=True, lengths=[3, 2, 1]),
    "lengths_relu": dict(L=1, bidirectional=True, lengths=[1, 5, 3], relu=True),
    "dropout": dict(L=3, bidirectional=True, dropout=True),
    "dropout_lengths": dict(L=2, bidirectional=True, dropout=True, lengths=[3, 5, 1]),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(device, case):
    args = make_args(device=device, **CASES[case])
    x, hx, weights, lens, mask, L, bidir, bias, relu = args
    y, h_n, _ = fwd(*args)
    y_ref, h_ref = rnn_reference(x, hx, weights, lens, mask, L, bidir, bias, relu)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h_n, h_ref, rtol=1e-10, atol=1e-12)
    gy = torch.randn_like(y)
    gh = torch.randn_like(h_n)
    leaves = [x, hx, *weights]
    got = torch.autograd.grad((y * gy).sum() + (h_n * gh).sum(), leaves)
    want = torch.autograd.grad((y_ref * gy).sum() + (h_ref * gh).sum(), leaves)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, i=i: f"grad {i}: {m}")


def differentiable(args):
    """(f, inputs): the op as a function of its differentiable arguments."""
    x, hx, weights, lens, mask, L, bidir, bias, relu = args

    def f(x, hx, *weights):
        y, h_n, _ = fwd(x, hx, list(weights), lens, mask, L, bidir, bias, relu)
        return y, h_n

    return f, (x, hx, *weights)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck(device, case):
    f, inputs = differentiable(make_args(T=4, N=3, C=3, H=3, device=device, **CASES[case]))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_reference_is_nn_rnn():
    """The oracle itself agrees with nn.RNN where both apply."""
    rnn = torch.nn.RNN(4, 5, 2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    hx = torch.randn(4, 3, 5, dtype=torch.float64)
    y, h = rnn(x, hx)
    y_ref, h_ref = rnn_reference(x, hx, rnn._flat_weights, None, None, 2, True, True, False)
    torch.testing.assert_close(y_ref, y)
    torch.testing.assert_close(h_ref, h)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["one_layer", "lengths", "dropout", "relu_no_bias"])
def test_opcheck(device, case):
    args = make_args(T=4, N=3, C=3, H=3, device=device, **CASES[case])
    torch.library.opcheck(fwd, args)
    x, hx, weights, lens, mask, L, bidir, bias, relu = make_args(
        T=4, N=3, C=3, H=3, device=device, grad=False, **CASES[case])
    y, h_n, hs = fwd(x, hx, weights, lens, mask, L, bidir, bias, relu)
    for input_grad in (True, False):
        torch.library.opcheck(bwd, (x, hx, weights, lens, mask, y, hs, torch.randn_like(y),
                                    torch.randn_like(h_n), L, bidir, bias, relu, input_grad))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["stack_bidir", "lengths"])
def test_backward_without_input_grad(device, case):
    """input_grad=False skips layer 0's input GEMM: grad_input comes back as
    zeros, every other gradient bit for bit as with it."""
    x, hx, weights, lens, mask, L, bidir, bias, relu = make_args(device=device, grad=False,
                                                                  **CASES[case])
    y, h_n, hs = fwd(x, hx, weights, lens, mask, L, bidir, bias, relu)
    common = (x, hx, weights, lens, mask, y, hs, torch.randn_like(y), torch.randn_like(h_n), L,
              bidir, bias, relu)
    gx, ghx, gw = bwd(*common)
    gx0, ghx0, gw0 = bwd(*common, input_grad=False)
    assert gx.abs().sum() > 0
    assert torch.equal(gx0, torch.zeros_like(gx))
    assert torch.equal(ghx0, ghx)
    for a, b in zip(gw0, gw):
        assert torch.equal(a, b)


def bad(**changes):
    args = list(make_args(grad=False))
    names = ["input", "hx", "weights", "lengths", "dropout_mask", "num_layers", "bidirectional",
             "has_biases", "relu"]
    for k, v in changes.items():
        args[names.index(k)] = v(args) if callable(v) else v
    return args


MALFORMED = {
    "input_2d": (bad(input=torch.randn(5, 4, dtype=torch.float64)), r"input must have shape \(T, N, C\)"),
    "too_few_weights": (bad(weights=lambda a: a[2][:-1]), r"weights must hold 16 tensors"),
    "weight_shape": (bad(weights=lambda a: [torch.randn(5, 3, dtype=torch.float64)] + a[2][1:]),
                     r"weight_ih_l0 must have shape \(G\*H, C\) = \(5, 4\), got \(5, 3\)"),
    "w_hh_shape": (bad(weights=lambda a: a[2][:1] + [torch.randn(5, 4, dtype=torch.float64)] + a[2][2:]),
                   r"weight_hh_l0 must have shape \(G\*H, P\) = \(5, 5\), got \(5, 4\)"),
    "upper_layer_shape": (bad(weights=lambda a: a[2][:8] + [torch.randn(5, 5, dtype=torch.float64)] + a[2][9:]),
                          r"weight_ih_l1 must have shape \(G\*H, D\*P\) = \(5, 10\), got \(5, 5\)"),
    "bias_shape": (bad(weights=lambda a: a[2][:2] + [torch.randn(4, dtype=torch.float64)] + a[2][3:]),
                   r"bias_ih_l0 must have shape \(G\*H,\) = \(5,\), got \(4,\)"),
    "mixed_dtype": (bad(weights=lambda a: [a[2][0].float()] + a[2][1:]),
                    r"weight_ih_l0 must have the input's dtype Double, got Float"),
    "hx_shape": (bad(hx=torch.randn(4, 2, 5, dtype=torch.float64)),
                 r"hx must have shape \(L\*D, N, H\) = \(4, 3, 5\), got \(4, 2, 5\)"),
    "hx_dtype": (bad(hx=torch.randn(4, 3, 5)), r"hx must have the input's dtype Double, got Float"),
    "lengths_dtype": (bad(lengths=torch.tensor([1, 2, 3], dtype=torch.int32)), r"lengths must be int64"),
    "lengths_shape": (bad(lengths=torch.tensor([1, 2])), r"lengths must have shape \(N,\) = \(3,\)"),
    "mask_shape": (bad(dropout_mask=torch.ones(1, 5, 3, 5, dtype=torch.float64)),
                   r"dropout_mask must have shape \(L-1, T, N, D\*P\) = \(1, 5, 3, 10\)"),
    "zero_layers": (bad(num_layers=0), r"num_layers must be at least 1"),
    "int_input": (bad(input=torch.ones(5, 3, 4, dtype=torch.int64)),
                  r"fastrnn supports float32, float64, float16 and bfloat16 input, got Long"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_arguments_raise(case):
    args, pattern = MALFORMED[case]
    with pytest.raises(RuntimeError, match=pattern):
        fwd(*args)


def test_backward_op_checks_its_own_tensors():
    x, hx, weights, lens, mask, L, bidir, bias, relu = make_args(grad=False)
    y, h_n, hs = fwd(x, hx, weights, lens, mask, L, bidir, bias, relu)
    with pytest.raises(RuntimeError, match=r"grad_output must have shape \(T, N, D\*P\)"):
        bwd(x, hx, weights, lens, mask, y, hs, y[:-1], h_n, L, bidir, bias, relu)
    with pytest.raises(RuntimeError, match=r"hidden_states must have shape \(L-1, T, N, D\*P\)"):
        bwd(x, hx, weights, lens, mask, y, hs[:, :2], y, h_n, L, bidir, bias, relu)


@pytest.mark.parametrize("lengths", [[0, 5, 2], [9, 5, 2], [-3, 5, 2]])
def test_out_of_range_lengths_are_safe(lengths):
    """A length past T means the whole sequence, zero or below means none:
    never a read outside the tensors."""
    x, hx, weights, _, mask, L, bidir, bias, relu = make_args(grad=False)
    lens = torch.tensor(lengths)
    y, h_n, _ = fwd(x, hx, weights, lens, mask, L, bidir, bias, relu)
    y_ref, h_ref = rnn_reference(x, hx, weights, lens, mask, L, bidir, bias, relu)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h_n, h_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["one_layer", "stack_bidir", "lengths", "dropout", "relu_no_bias"])
def test_gradgradcheck(device, case):
    f, inputs = differentiable(make_args(T=3, N=3, C=2, H=3, device=device, **CASES[case]))
    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-5)


def test_first_backward_with_graph_equals_fused_backward():
    """create_graph=True takes the differentiable route; its first-order
    gradients equal the fused backward's."""
    x, hx, weights, lens, mask, L, bidir, bias, relu = make_args(L=2, bidirectional=True,
                                                                 lengths=[5, 2, 4], dropout=True)
    y, h_n, _ = fwd(x, hx, weights, lens, mask, L, bidir, bias, relu)
    gy, gh = torch.randn_like(y), torch.randn_like(h_n)
    leaves = [x, hx, *weights]
    plain = torch.autograd.grad((y * gy).sum() + (h_n * gh).sum(), leaves, retain_graph=True)
    graphed = torch.autograd.grad((y * gy).sum() + (h_n * gh).sum(), leaves, create_graph=True)
    assert all(g.grad_fn is not None for g in graphed[:2])
    for a, b in zip(plain, graphed):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_zero_steps_through_the_op():
    """T = 0 (which the module rejects as nn.RNN does) is still well defined
    for the op: h_n is h0, and the gradients follow."""
    x, hx, weights, _, _, L, bidir, bias, relu = make_args(T=0, L=2, bidirectional=True)
    y, h_n, _ = fwd(x, hx, weights, None, None, L, bidir, bias, relu)
    assert y.shape == (0, 3, 10)
    torch.testing.assert_close(h_n, hx)
    g = torch.autograd.grad(h_n.sum(), [hx, *weights])
    torch.testing.assert_close(g[0], torch.ones_like(hx))
    assert all(torch.count_nonzero(t) == 0 for t in g[1:])
