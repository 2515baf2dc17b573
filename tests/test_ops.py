"""The ops called directly: against the reference loops (with lengths and
dropout masks, which torch.nn's layers cannot be handed), gradcheck,
gradgradcheck, opcheck, and clear errors for malformed arguments."""

import pytest
import torch

import fastrnn
from fastrnn import gru_reference, lstm_reference, rnn_reference
from helpers import DEVICES

ops = torch.ops.fastrnn

# Per cell: gates, whether it has the state c, the reference.
OPS = {
    "rnn": (1, False, rnn_reference),
    "lstm": (4, True, lstm_reference),
    "lstm_proj": (4, True, lstm_reference),
    "gru": (3, False, gru_reference),
}


class Call:
    """The arguments of one forward op call, the op, its backward and the
    reference, for a cell ("rnn", "lstm", "lstm_proj", "gru")."""

    def __init__(self, cell, T=5, N=3, C=4, H=5, L=2, bidirectional=True, bias=True, relu=False,
                 lengths=None, dropout=False, dtype=torch.float64, device="cpu", grad=True):
        G, has_cx, self.reference = OPS[cell]
        self.cell = cell
        proj = cell == "lstm_proj"
        P = min(3, H - 1) if proj else H
        D = 2 if bidirectional else 1
        g = torch.Generator().manual_seed(1)

        def rnd(*shape, scale=1.0):
            t = (torch.randn(*shape, generator=g, dtype=dtype) * scale).to(device)
            return t.requires_grad_(grad)

        self.x = rnd(T, N, C)
        self.hx = rnd(L * D, N, P)
        self.cx = rnd(L * D, N, H) if has_cx else None
        self.weights = []
        for layer in range(L):
            for _ in range(D):
                self.weights += [rnd(G * H, C if layer == 0 else D * P, scale=0.5),
                                 rnd(G * H, P, scale=0.5)]
                if bias:
                    self.weights += [rnd(G * H, scale=0.5), rnd(G * H, scale=0.5)]
                if proj:
                    self.weights.append(rnd(P, H, scale=0.5))
        self.lengths = torch.tensor(lengths, device=device) if lengths is not None else None
        self.mask = None
        if dropout and L > 1:
            keep = (torch.rand(L - 1, T, N, D * P, generator=g) > 0.3).to(dtype) / 0.7
            self.mask = keep.to(device)
        self.L, self.bidirectional, self.bias, self.relu, self.proj = L, bidirectional, bias, relu, proj

    @property
    def name(self):
        """The ops' name of the cell."""
        return {"rnn": "rnn_relu" if self.relu else "rnn_tanh", "gru": "gru"}.get(self.cell, "lstm")

    forward_op = ops.forward
    backward_op = ops.backward

    def states(self):
        return [self.hx] if self.cx is None else [self.hx, self.cx]

    def args(self):
        return (self.name, self.x, self.states(), self.weights, self.lengths, self.mask, self.L,
                self.bidirectional, self.bias, self.proj)

    def forward(self):
        """The op's output and final states."""
        output, state_n, _, _ = ops.forward(*self.args())
        return (output, *state_n)

    def expected(self):
        common = (self.lengths, self.mask, self.L, self.bidirectional, self.bias)
        if self.cell == "rnn":
            return self.reference(self.x, self.hx, self.weights, *common, self.relu)
        if self.cell == "gru":
            return self.reference(self.x, self.hx, self.weights, *common)
        return self.reference(self.x, self.hx, self.cx, self.weights, *common, self.proj)

    def leaves(self):
        return [self.x, self.hx] + ([self.cx] if self.cx is not None else []) + self.weights

    @staticmethod
    def gradients(outputs):
        """Random gradients for a forward's output and final states."""
        output, state_n = outputs[0], outputs[1]
        return [torch.randn_like(output), [torch.randn_like(h) for h in state_n]]

    def backward_args(self, outputs, grads, input_grad=True, state_grad=True):
        """The backward op's arguments, from a forward's outputs and gradients
        for its output and final states."""
        y, _, hs, ws = outputs
        return (self.name, self.x, self.states(), self.weights, self.lengths, self.mask, y, hs, ws,
                grads[0], grads[1], self.L, self.bidirectional, self.bias, self.proj, input_grad,
                state_grad)


CELLS = list(OPS)

CASES = {
    "one_layer": dict(L=1, bidirectional=False),
    "stack_bidir": dict(L=2, bidirectional=True),
    "no_bias": dict(L=2, bidirectional=False, bias=False),
    "lengths": dict(L=2, bidirectional=True, lengths=[3, 2, 1]),
    "dropout": dict(L=3, bidirectional=True, dropout=True),
    "dropout_lengths": dict(L=2, bidirectional=True, dropout=True, lengths=[3, 5, 1]),
}

# Elman's relu, where the other cells have no option.
RELU_CASES = {
    "relu_no_bias": dict(L=2, bidirectional=False, bias=False, relu=True),
    "lengths_relu": dict(L=1, bidirectional=True, lengths=[1, 5, 3], relu=True),
}

ALL = [(c, k) for c in CELLS for k in CASES] + [("rnn", k) for k in RELU_CASES]


def call_of(cell, case, **kw):
    return Call(cell, **{**CASES.get(case, {}), **RELU_CASES.get(case, {}), **kw})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell,case", ALL)
def test_matches_reference(cell, case, device):
    c = call_of(cell, case, device=device)
    got, want = c.forward(), c.expected()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    gs = [torch.randn_like(t) for t in got]
    loss = lambda outs: sum((o * g).sum() for o, g in zip(outs, gs))  # noqa: E731
    g_got = torch.autograd.grad(loss(got), c.leaves())
    g_want = torch.autograd.grad(loss(want), c.leaves())
    for i, (a, b) in enumerate(zip(g_got, g_want)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, i=i: f"grad {i}: {m}")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("lengths", [None, [1, 0, 1]])
def test_one_step_with_a_gradient_for_h_n_alone(cell, lengths):
    """One step of one layer and direction, a loss on h_n alone (what a
    cell's caller gives): the backward takes that gradient as the output's;
    with lengths it may not, as a row of length 0 passes it to h0."""
    c = Call(cell, T=1, N=3, L=1, bidirectional=False, lengths=lengths)
    got, want = c.forward(), c.expected()
    g = torch.randn_like(got[1])
    g_got = torch.autograd.grad((got[1] * g).sum(), c.leaves())
    g_want = torch.autograd.grad((want[1] * g).sum(), c.leaves())
    for i, (a, b) in enumerate(zip(g_got, g_want)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, i=i: f"grad {i}: {m}")


@pytest.mark.parametrize("cell", CELLS)
def test_references_are_torch_nn(cell):
    """The oracles themselves agree with torch.nn where both apply."""
    from torch import nn

    kw = dict(proj_size=3) if cell == "lstm_proj" else {}
    cls = {"rnn": nn.RNN, "gru": nn.GRU}.get(cell, nn.LSTM)
    layer = cls(4, 5, 2, bidirectional=True, dtype=torch.float64, **kw)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    P = 3 if kw else 5
    h0 = torch.randn(4, 3, P, dtype=torch.float64)
    w = layer._flat_weights
    if cls is nn.LSTM:
        c0 = torch.randn(4, 3, 5, dtype=torch.float64)
        y, (h, c) = layer(x, (h0, c0))
        got = lstm_reference(x, h0, c0, w, None, None, 2, True, True, bool(kw))
        want = (y, h, c)
    else:
        y, h = layer(x, h0)
        ref = rnn_reference if cls is nn.RNN else gru_reference
        got = ref(x, h0, w, None, None, 2, True, True)
        want = (y, h)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def differentiable(c):
    """(f, inputs): the op as a function of its differentiable arguments."""
    n_state = 2 if c.cx is not None else 1

    def f(x, *rest):
        states, weights = rest[:n_state], list(rest[n_state:])
        saved = (c.x, c.hx, c.cx, c.weights)
        c.x, c.hx = x, states[0]
        if c.cx is not None:
            c.cx = states[1]
        c.weights = weights
        try:
            return tuple(c.forward())
        finally:
            c.x, c.hx, c.cx, c.weights = saved

    return f, tuple(c.leaves())


@pytest.mark.parametrize("packing", ["always", "never"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell,case", ALL)
def test_gradcheck(cell, case, device, packing):
    """Both weight layouts of the CPU kernels (packed panels, and as stored,
    which 'auto' picks at this size)."""
    f, inputs = differentiable(call_of(cell, case, T=4, N=3, C=3, H=3, device=device))
    with fastrnn.kernels(cpu_packing=packing):
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("case", ["one_layer", "lengths", "dropout", "no_bias", "cell_step"])
def test_opcheck(cell, case, device):
    if case == "cell_step":
        # What fastrnn's cells call: one layer, one direction, one step.
        c = Call(cell, T=1, N=2, C=3, H=3, L=1, bidirectional=False, device=device)
        torch.library.opcheck(c.forward_op, c.args())
        return
    c = call_of(cell, case, T=4, N=3, C=3, H=3, device=device)
    torch.library.opcheck(c.forward_op, c.args())
    c = call_of(cell, case, T=4, N=3, C=3, H=3, device=device, grad=False)
    outputs = c.forward_op(*c.args())
    grads = c.gradients(outputs)
    for input_grad, state_grad in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(c.backward_op,
                              c.backward_args(outputs, grads, input_grad, state_grad))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("case", ["stack_bidir", "lengths"])
def test_backward_without_input_grad(cell, case, device):
    """input_grad=False skips layer 0's input GEMM: grad_input comes back as
    zeros, every other gradient bit for bit as with it."""
    c = call_of(cell, case, device=device, grad=False)
    outputs = c.forward_op(*c.args())
    grads = c.gradients(outputs)
    with_input = c.backward_op(*c.backward_args(outputs, grads, True))
    without = c.backward_op(*c.backward_args(outputs, grads, False))
    assert with_input[0].abs().sum() > 0
    assert torch.equal(without[0], torch.zeros_like(with_input[0]))
    for listed in (1, 2):  # the states' gradients, the weights'
        assert len(without[listed]) == len(with_input[listed])
        for a, b in zip(without[listed], with_input[listed]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("case", ["stack_bidir", "lengths", "step"])
def test_backward_without_state_grad(cell, case, device):
    """state_grad=False skips the initial states' gradients (the last
    step's product with W_hh on the CPU): they come back as zeros, every
    other gradient bit for bit as with them."""
    if case == "step":
        c = Call(cell, T=1, N=2, C=3, H=3, L=1, bidirectional=False, device=device, grad=False)
    else:
        c = call_of(cell, case, device=device, grad=False)
    outputs = c.forward_op(*c.args())
    grads = c.gradients(outputs)
    with_states = c.backward_op(*c.backward_args(outputs, grads, True, True))
    without = c.backward_op(*c.backward_args(outputs, grads, True, False))
    assert len(without[1]) == len(with_states[1])
    for a, b in zip(without[1], with_states[1]):
        assert b.abs().sum() > 0
        assert torch.equal(a, torch.zeros_like(b))
    assert torch.equal(without[0], with_states[0])
    assert len(without[2]) == len(with_states[2])
    for a, b in zip(without[2], with_states[2]):
        assert torch.equal(a, b)


def bad(**changes):
    c = Call("rnn", grad=False)
    args = list(c.args())
    names = ["cell", "input", "hx", "weights", "lengths", "dropout_mask", "num_layers",
             "bidirectional", "has_biases", "has_projections"]
    for k, v in changes.items():
        args[names.index(k)] = v(args) if callable(v) else v
    return args


MALFORMED = {
    "input_2d": (bad(input=torch.randn(5, 4, dtype=torch.float64)), r"input must have shape \(T, N, C\)"),
    "too_few_weights": (bad(weights=lambda a: a[3][:-1]), r"weights must hold 16 tensors"),
    "weight_shape": (bad(weights=lambda a: [torch.randn(5, 3, dtype=torch.float64)] + a[3][1:]),
                     r"weight_ih_l0 must have shape \(G\*H, C\) = \(5, 4\), got \(5, 3\)"),
    "w_hh_shape": (bad(weights=lambda a: a[3][:1] + [torch.randn(5, 4, dtype=torch.float64)] + a[3][2:]),
                   r"weight_hh_l0 must have shape \(G\*H, P\) = \(5, 5\), got \(5, 4\)"),
    "upper_layer_shape": (bad(weights=lambda a: a[3][:8] + [torch.randn(5, 5, dtype=torch.float64)] + a[3][9:]),
                          r"weight_ih_l1 must have shape \(G\*H, D\*P\) = \(5, 10\), got \(5, 5\)"),
    "bias_shape": (bad(weights=lambda a: a[3][:2] + [torch.randn(4, dtype=torch.float64)] + a[3][3:]),
                   r"bias_ih_l0 must have shape \(G\*H,\) = \(5,\), got \(4,\)"),
    "mixed_dtype": (bad(weights=lambda a: [a[3][0].float()] + a[3][1:]),
                    r"weight_ih_l0 must have the input's dtype Double, got Float"),
    "hx_shape": (bad(hx=[torch.randn(4, 2, 5, dtype=torch.float64)]),
                 r"hx must have shape \(L\*D, N, H\) = \(4, 3, 5\), got \(4, 2, 5\)"),
    "hx_dtype": (bad(hx=[torch.randn(4, 3, 5)]), r"hx must have the input's dtype Double, got Float"),
    "two_states": (bad(hx=lambda a: a[2] * 2), r"hx must hold 1 state \(h\) for rnn_tanh, got 2"),
    "no_state": (bad(hx=[]), r"hx must hold 1 state \(h\) for rnn_tanh, got 0"),
    "unknown_cell": (bad(cell="rnn"), r"unknown cell 'rnn': expected rnn_tanh, rnn_relu, lstm or gru"),
    "projected_rnn": (bad(has_projections=True), r"projections apply to LSTM only"),
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
        ops.forward(*args)


def test_malformed_lstm_and_gru_arguments_raise():
    c = Call("lstm", grad=False)
    args = list(c.args())
    h0, c0 = args[2]
    with pytest.raises(RuntimeError, match=r"cx must have shape \(L\*D, N, H\) = \(4, 3, 5\), got \(4, 3, 4\)"):
        ops.forward(*args[:2], [h0, torch.randn(4, 3, 4, dtype=torch.float64)], *args[3:])
    with pytest.raises(RuntimeError, match=r"hx must hold 2 states \(h, c\) for lstm, got 1"):
        ops.forward(*args[:2], [h0], *args[3:])
    w = list(args[3])
    w[1] = torch.randn(20, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"weight_hh_l0 must have shape \(G\*H, P\) = \(20, 5\), got \(20, 4\)"):
        ops.forward(*args[:3], w, *args[4:])
    with pytest.raises(RuntimeError, match=r"weights must hold 20 tensors .* with projections"):
        ops.forward(*args[:-1], True)
    p = Call("lstm_proj", grad=False)
    pargs = list(p.args())
    w = list(pargs[3])
    w[4] = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"weight_hr_l0 must have shape \(P, H\) = \(3, 5\), got \(3, 4\)"):
        ops.forward(*pargs[:3], w, *pargs[4:])
    g = Call("gru", grad=False)
    gargs = list(g.args())
    w = list(gargs[3])
    w[0] = torch.randn(14, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"weight_ih_l0 must have shape \(G\*H, C\) = \(15, 4\), got \(14, 4\)"):
        ops.forward(*gargs[:3], w, *gargs[4:])
    with pytest.raises(RuntimeError, match=r"hx must hold 1 state \(h\) for gru, got 2"):
        ops.forward(*gargs[:2], gargs[2] * 2, *gargs[3:])


@pytest.mark.parametrize("cell", CELLS)
def test_backward_op_checks_its_own_tensors(cell):
    c = Call(cell, grad=False)
    outputs = list(c.forward_op(*c.args()))
    grads = c.gradients(outputs)
    with pytest.raises(RuntimeError, match=r"grad_output must have shape \(T, N, D\*P\)"):
        c.backward_op(*c.backward_args(outputs, [grads[0][:-1], grads[1]]))
    with pytest.raises(RuntimeError, match=r"grad_hn must have shape \(L\*D, N, P\)"):
        c.backward_op(*c.backward_args(outputs, [grads[0], [grads[1][0][:1]] + grads[1][1:]]))
    with pytest.raises(RuntimeError, match=r"grad_state_n must hold one gradient \(or None\) per state"):
        c.backward_op(*c.backward_args(outputs, [grads[0], grads[1] + [None]]))
    hs = outputs[2]
    outputs[2] = hs[:, :2]
    with pytest.raises(RuntimeError, match=r"hidden_states must have shape \(L-1, T, N, D\*P\)"):
        c.backward_op(*c.backward_args(outputs, grads))
    outputs[2] = hs
    ws = outputs[3]
    outputs[3] = ws[..., :-1] if ws.shape[-1] else ws.new_zeros((*ws.shape[:-1], 1))
    with pytest.raises(RuntimeError, match=r"workspace must have shape \(L, D, T, N, Ws\)"):
        c.backward_op(*c.backward_args(outputs, grads))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("lengths", [[0, 5, 2], [9, 5, 2], [-3, 5, 2]])
def test_out_of_range_lengths_are_safe(cell, lengths):
    """A length past T means the whole sequence, zero or below means none:
    never a read outside the tensors."""
    c = Call(cell, grad=False, lengths=lengths)
    for a, b in zip(c.forward(), c.expected()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("case", ["one_layer", "stack_bidir", "lengths", "dropout", "no_bias"])
def test_gradgradcheck(cell, case, device):
    f, inputs = differentiable(call_of(cell, case, T=3, N=3, C=2, H=3, device=device))
    # The gated cells have three to four times the parameters: their full
    # second-order Jacobians take minutes, a random projection of them
    # (fast_mode) a second, and a wrong second derivative fails either.
    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-5, fast_mode=cell != "rnn")


@pytest.mark.parametrize("cell", CELLS)
def test_first_backward_with_graph_equals_fused_backward(cell):
    """create_graph=True takes the differentiable route; its first-order
    gradients equal the fused backward's."""
    c = Call(cell, L=2, bidirectional=True, lengths=[5, 2, 4], dropout=True)
    outs = c.forward()
    gs = [torch.randn_like(t) for t in outs]
    loss = sum((o * g).sum() for o, g in zip(outs, gs))
    plain = torch.autograd.grad(loss, c.leaves(), retain_graph=True)
    graphed = torch.autograd.grad(loss, c.leaves(), create_graph=True)
    assert all(g.grad_fn is not None for g in graphed[:2])
    for a, b in zip(plain, graphed):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cell", CELLS)
def test_zero_steps_through_the_op(cell):
    """T = 0 (which the layers reject as torch.nn's do) is still well defined
    for the ops: the final states are the initial ones, and the gradients
    follow."""
    c = Call(cell, T=0, L=2, bidirectional=True)
    outs = c.forward()
    P = 3 if cell == "lstm_proj" else 5
    assert outs[0].shape == (0, 3, 2 * P)
    torch.testing.assert_close(outs[1], c.hx)
    leaves = c.leaves()
    g = torch.autograd.grad(sum(t.sum() for t in outs[1:]), leaves)
    n_state = 2 if c.cx is not None else 1
    for k in range(n_state):
        torch.testing.assert_close(g[1 + k], torch.ones_like(leaves[1 + k]))
    assert all(torch.count_nonzero(t) == 0 for t in g[1 + n_state:])
