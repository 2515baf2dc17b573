"""Shared pieces of the tests: devices, tolerances, and a runner that gives
every output and gradient of a module call."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

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


def pair(input_size, hidden_size, device="cpu", dtype=torch.float32, **kw):
    """nn.RNN and fastrnn.RNN (fused) holding the same weights."""
    ref = nn.RNN(input_size, hidden_size, device=device, dtype=dtype, **kw)
    ours = fastrnn.RNN(input_size, hidden_size, device=device, dtype=dtype, backend="fused", **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def run(module, x, hx=None):
    """Output, h_n and the gradients of x, hx and every parameter under a
    loss that weighs every element differently."""
    data = x.data if isinstance(x, PackedSequence) else x
    leaves = [data] + ([hx] if hx is not None else []) + list(module.parameters())
    for t in leaves:
        t.grad = None
    out, h_n = module(x, hx)
    y = out.data if isinstance(out, PackedSequence) else out
    wy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)
    wh = torch.linspace(1, -0.5, h_n.numel(), dtype=h_n.dtype, device=h_n.device).view_as(h_n)
    ((y * wy).sum() + (h_n * wh).sum()).backward()
    grads = [t.grad.clone() if t.grad is not None else None for t in leaves]
    return y.detach().clone(), h_n.detach().clone(), grads


def assert_close_all(a, b, dtype, truth=None):
    """b matches a (each a run() result). float64 is compared tightly. In
    lower precision the bar is the reference's own error: b's largest error
    against `truth` (the same call in float64) may be at most twice a's, or
    1e-5 of the largest magnitude where a happens to be exact."""
    names = ["output", "h_n"] + [f"gradient {i}" for i in range(len(a[2]))]
    ta = [a[0], a[1], *a[2]]
    tb = [b[0], b[1], *b[2]]
    assert len(ta) == len(tb)
    tt = [truth[0], truth[1], *truth[2]] if truth is not None else [None] * len(ta)
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
        assert err <= bound, f"{name}: error {err:.3g} against float64, nn.RNN's {err_ref:.3g}"


def double(x):
    """x (a tensor or a PackedSequence) in float64, a fresh leaf."""
    if isinstance(x, PackedSequence):
        return PackedSequence(x.data.detach().double().requires_grad_(), x.batch_sizes,
                              x.sorted_indices, x.unsorted_indices)
    return None if x is None else x.detach().double().requires_grad_()


def compare(ref, ours, x, hx=None):
    """Runs nn.RNN (ref) and fastrnn (ours) on the same call and checks that
    ours ran its fused kernel and matches; below float64, against a float64
    run of ref as well."""
    data = x.data if isinstance(x, PackedSequence) else x
    expected = run(ref, x, hx)
    got = run(ours, x, hx)
    assert ours.last_path == "fused"
    truth = None
    if data.dtype != torch.float64:
        import copy

        ref64 = copy.deepcopy(ref).double()
        truth = run(ref64, double(x), double(hx))
    assert_close_all(expected, got, data.dtype, truth)
    return got


def leaf(*shape, device="cpu", dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=dtype, device=device) * scale).requires_grad_()
