"""Shared pieces of the tests: devices, tolerances, the three layers side by
side, and a runner that gives every output and gradient of a layer call."""

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrnn


def _cuda_ok():
    return fastrnn.cuda_built() and torch.cuda.is_available()


CUDA = pytest.mark.skipif(not _cuda_ok(), reason="needs a CUDA device and the CUDA build")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]

# float32: within 1e-5 relative (atol for values near zero); float64 tight.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-10, atol=1e-11),
    torch.float16: dict(rtol=1e-2, atol=2e-3),
    torch.bfloat16: dict(rtol=4e-2, atol=1e-2),
}

# The torch.nn layer and the fastrnn layer of each cell.
LAYERS = {"rnn": (nn.RNN, fastrnn.RNN), "lstm": (nn.LSTM, fastrnn.LSTM), "gru": (nn.GRU, fastrnn.GRU)}

# Every cell variant: (cell, constructor options).
CELLS = [
    pytest.param("rnn", dict(nonlinearity="tanh"), id="rnn_tanh"),
    pytest.param("rnn", dict(nonlinearity="relu"), id="rnn_relu"),
    pytest.param("lstm", dict(), id="lstm"),
    pytest.param("lstm", dict(proj_size=2), id="lstm_proj"),
    pytest.param("gru", dict(), id="gru"),
]


def pair(input_size, hidden_size, cell="rnn", device="cpu", dtype=torch.float32, **kw):
    """The torch.nn layer and the fastrnn layer (fused backend) of `cell`,
    holding the same weights."""
    ref_cls, our_cls = LAYERS[cell]
    ref = ref_cls(input_size, hidden_size, device=device, dtype=dtype, **kw)
    ours = our_cls(input_size, hidden_size, device=device, dtype=dtype, backend="fused", **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def initial_state(module, batch, device="cpu", dtype=torch.float32, unbatched=False, scale=1.0):
    """Random leaves for the module's initial state: h0, or (h0, c0) for an LSTM."""
    D = 2 if module.bidirectional else 1
    lead = (module.num_layers * D,) if unbatched else (module.num_layers * D, batch)
    P = module.proj_size if getattr(module, "proj_size", 0) > 0 else module.hidden_size
    h0 = leaf(*lead, P, device=device, dtype=dtype, scale=scale)
    if module.mode == "LSTM":
        return h0, leaf(*lead, module.hidden_size, device=device, dtype=dtype, scale=scale)
    return h0


def states(hx):
    """The tensors of a state: [h] or [h, c]."""
    if hx is None:
        return []
    return list(hx) if isinstance(hx, tuple) else [hx]


def run(module, x, hx=None):
    """Output, the final states ([h_n] or [h_n, c_n]) and the gradients of x,
    every initial state and every parameter, under a loss that weighs every
    element differently."""
    data = x.data if isinstance(x, PackedSequence) else x
    leaves = [data] + states(hx) + list(module.parameters())
    for t in leaves:
        t.grad = None
    out, h = module(x, hx)
    y = out.data if isinstance(out, PackedSequence) else out
    finals = states(h)
    loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)).sum()
    for k, f in enumerate(finals):
        w = torch.linspace(1, -0.5 + k, f.numel(), dtype=f.dtype, device=f.device).view_as(f)
        loss = loss + (f * w).sum()
    loss.backward()
    grads = [t.grad.clone() if t.grad is not None else None for t in leaves]
    return y.detach().clone(), [f.detach().clone() for f in finals], grads


def _flat(result):
    y, finals, grads = result
    return [y, *finals, *grads]


def assert_close_all(a, b, dtype, truth=None):
    """b matches a (each a run() result). float64 is compared tightly. In
    lower precision the bar is the reference's own error: b's largest error
    against `truth` (the same call in float64) may be at most twice a's, or
    1e-5 of the largest magnitude where a happens to be exact."""
    ta, tb = _flat(a), _flat(b)
    names = ["output"] + [f"final state {i}" for i in range(len(a[1]))] + \
        [f"gradient {i}" for i in range(len(a[2]))]
    assert len(ta) == len(tb)
    tt = _flat(truth) if truth is not None else [None] * len(ta)
    for name, p, q, r in zip(names, ta, tb, tt):
        assert (p is None) == (q is None), f"{name}: one side is None"
        if p is None:
            continue
        assert q.shape == p.shape and q.dtype == p.dtype, f"{name}: {q.shape} {q.dtype} vs {p.shape} {p.dtype}"
        if r is None:
            torch.testing.assert_close(q, p, **TOL[dtype], msg=lambda m, name=name: f"{name}: " + m)
            continue
        r = r.to(torch.float64)
        err_ref = (p.to(torch.float64) - r).abs().max().item() if r.numel() else 0.0
        err = (q.to(torch.float64) - r).abs().max().item() if r.numel() else 0.0
        bound = 2 * err_ref + 1e-5 * (r.abs().max().item() if r.numel() else 0.0)
        assert err <= bound, f"{name}: error {err:.3g} against float64, torch.nn's {err_ref:.3g}"


def packed_leaf(x, lengths, enforce_sorted=False, batch_first=False):
    """x packed by `lengths`, its packed data a fresh leaf: the input that
    compare() and run() take gradients of."""
    p = pack_padded_sequence(x.detach(), torch.as_tensor(lengths), batch_first=batch_first,
                             enforce_sorted=enforce_sorted)
    return PackedSequence(p.data.requires_grad_(), p.batch_sizes, p.sorted_indices,
                          p.unsorted_indices)


def double(x):
    """x (a tensor, a state tuple or a PackedSequence) in float64, fresh leaves."""
    if isinstance(x, PackedSequence):
        return PackedSequence(x.data.detach().double().requires_grad_(), x.batch_sizes,
                              x.sorted_indices, x.unsorted_indices)
    if isinstance(x, tuple):
        return tuple(double(t) for t in x)
    return None if x is None else x.detach().double().requires_grad_()


def compare(ref, ours, x, hx=None):
    """Runs the torch.nn layer (ref) and fastrnn (ours) on the same call and
    checks that ours ran its fused kernel and matches; below float64, against
    a float64 run of ref as well."""
    data = x.data if isinstance(x, PackedSequence) else x
    # Both layers run on x: a graph in front of it would be freed by the
    # first backward, and its gradient would not be the one compared.
    assert data.is_leaf, "compare() takes a leaf input (pack a detached tensor, then make its data the leaf)"
    expected = run(ref, x, hx)
    got = run(ours, x, hx)
    assert ours.last_path == "fused"
    truth = None
    if data.dtype != torch.float64:
        ref64 = copy.deepcopy(ref).double()
        truth = run(ref64, double(x), double(hx))
    assert_close_all(expected, got, data.dtype, truth)
    return got


def leaf(*shape, device="cpu", dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=dtype, device=device) * scale).requires_grad_()


def _values_and_id(value):
    """A factor's value as (values, id): a pytest.param gives its values and
    id; a plain value is one value, named as pytest would name it."""
    if isinstance(value, type(pytest.param(None))):
        return tuple(value.values), value.id
    if isinstance(value, torch.dtype):
        return (value,), str(value).replace("torch.", "")
    return (value,), str(value)


def pairwise(names, *factors):
    """pytest parameters for the product of `factors` (lists of values or of
    pytest.param) under the comma-separated `names`: a covering subset, which
    holds every pair of values of every two factors at least once (chosen
    greedily, the same every run), runs in `make test`; the rest of the
    product is marked `deep` and runs in `make test-deep`. A kernel bug that
    shows in one option or where two meet fails both. Keep the cell out of
    the factors (a parametrize of its own), so that every cell meets every
    pair: breaking the reverse direction's h0 in the CPU kernel fails one
    case of every cell this way, and three of five cells with the cell as a
    factor."""
    product = list(itertools.product(*(range(len(f)) for f in factors)))
    pairs = lambda c: {(i, c[i], j, c[j]) for i in range(len(c)) for j in range(i + 1, len(c))}
    uncovered = set().union(*(pairs(c) for c in product))
    chosen = set()
    while uncovered:
        best = max(product, key=lambda c: len(pairs(c) & uncovered))
        chosen.add(best)
        uncovered -= pairs(best)
    params = []
    for combo in product:
        parts = [_values_and_id(factors[k][i]) for k, i in enumerate(combo)]
        values = tuple(v for vs, _ in parts for v in vs)
        params.append(pytest.param(*values, id="-".join(i for _, i in parts),
                                   marks=() if combo in chosen else pytest.mark.deep))
    return pytest.mark.parametrize(names, params)


def assert_backward_twice_needs_retain_graph(loss, leaves):
    """A second backward through loss's graph adds the same gradients again
    where the first kept the graph (retain_graph), and fails as torch's do
    once the saved tensors are freed."""
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in leaves]
    loss.backward()
    for t, g in zip(leaves, first):
        torch.testing.assert_close(t.grad, 2 * g)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
