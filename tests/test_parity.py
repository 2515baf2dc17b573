"""fastrnn.RNN (fused kernel) against nn.RNN with the same weights: outputs,
h_n and every gradient, over the options nn.RNN takes."""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrnn
from helpers import DEVICES, TOL, compare, leaf, pair, run

T, N, C, H = 7, 3, 5, 6

GRID = list(itertools.product(
    ["tanh", "relu"],       # nonlinearity
    [True, False],          # bias
    [1, 2, 3],              # num_layers
    [False, True],          # bidirectional
    [False, True],          # batch_first
))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no_h0"])
@pytest.mark.parametrize("nonlinearity,bias,num_layers,bidirectional,batch_first", GRID)
def test_batched(device, dtype, with_h0, nonlinearity, bias, num_layers, bidirectional, batch_first):
    ref, ours = pair(C, H, device=device, dtype=dtype, num_layers=num_layers,
                     nonlinearity=nonlinearity, bias=bias, bidirectional=bidirectional,
                     batch_first=batch_first)
    D = 2 if bidirectional else 1
    x = leaf(*((N, T, C) if batch_first else (T, N, C)), device=device, dtype=dtype)
    h0 = leaf(num_layers * D, N, H, device=device, dtype=dtype) if with_h0 else None
    compare(ref, ours, x, h0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no_h0"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_unbatched(device, with_h0, batch_first, bidirectional):
    dtype = torch.float64
    ref, ours = pair(C, H, device=device, dtype=dtype, num_layers=2,
                     bidirectional=bidirectional, batch_first=batch_first)
    D = 2 if bidirectional else 1
    x = leaf(T, C, device=device, dtype=dtype)
    h0 = leaf(2 * D, H, device=device, dtype=dtype) if with_h0 else None
    got = compare(ref, ours, x, h0)
    assert got[0].shape == (T, D * H) and got[1].shape == (2 * D, H)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no_h0"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_packed(device, dtype, enforce_sorted, with_h0, bidirectional, nonlinearity):
    ref, ours = pair(C, H, device=device, dtype=dtype, num_layers=2, nonlinearity=nonlinearity,
                     bidirectional=bidirectional)
    D = 2 if bidirectional else 1
    lengths = [7, 7, 4, 2, 1] if enforce_sorted else [3, 7, 1, 7, 5]
    x = torch.randn(T, len(lengths), C, device=device, dtype=dtype)
    p = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=enforce_sorted)
    packed = PackedSequence(p.data.requires_grad_(), p.batch_sizes, p.sorted_indices,
                            p.unsorted_indices)
    h0 = leaf(2 * D, len(lengths), H, device=device, dtype=dtype) if with_h0 else None
    compare(ref, ours, packed, h0)
    out, _ = ours(packed, h0)
    assert torch.equal(out.batch_sizes, packed.batch_sizes)
    if not enforce_sorted:
        assert torch.equal(out.sorted_indices, packed.sorted_indices)
        assert torch.equal(out.unsorted_indices, packed.unsorted_indices)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [False, True])
def test_input_that_needs_no_gradient(device, packed):
    """Data that needs no gradient, the usual first layer: the backward then
    skips the input's GEMM, and every other gradient still matches."""
    ref, ours = pair(C, H, device=device, dtype=torch.float64, num_layers=2, bidirectional=True)
    x = torch.randn(T, N, C, dtype=torch.float64, device=device)
    if packed:
        x = pack_padded_sequence(x, torch.tensor([7, 2, 5]), enforce_sorted=False)
    h0 = leaf(4, N, H, device=device, dtype=torch.float64)
    got = compare(ref, ours, x, h0)
    assert got[2][0] is None and all(g is not None for g in got[2][1:])


@pytest.mark.parametrize("device", DEVICES)
def test_zero_batch(device):
    ref, ours = pair(C, H, device=device, dtype=torch.float64, num_layers=2, bidirectional=True)
    x = torch.randn(T, 0, C, dtype=torch.float64, device=device)
    y_ref, h_ref = ref(x)
    y, h = ours(x)
    assert y.shape == y_ref.shape == (T, 0, 2 * H)
    assert h.shape == h_ref.shape == (4, 0, H)


def _isa_params():
    from fastrnn import _ops

    isas = ["avx512", "avx2", "base"]
    current = _ops._C.cpu_isa()
    out = []
    for isa in isas:
        ok = _ops._C.set_cpu_isa(isa)
        out.append(pytest.param(isa, marks=pytest.mark.skipif(not ok, reason=f"this CPU lacks {isa}")))
    _ops._C.set_cpu_isa(current)
    return out


@pytest.fixture
def cpu_isa(request):
    from fastrnn import _ops

    before = _ops._C.cpu_isa()
    assert _ops._C.set_cpu_isa(request.param)
    yield request.param
    _ops._C.set_cpu_isa(before)


@pytest.mark.parametrize("cpu_isa", _isa_params(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hidden", [1, 5, 16, 40, 70])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_cpu_kernel_variants(cpu_isa, dtype, hidden, nonlinearity):
    """Every instruction set's kernel, at hidden sizes that exercise every
    panel width and a batch that exercises every row block and remainder."""
    ref, ours = pair(4, hidden, dtype=dtype, num_layers=2, bidirectional=True,
                     nonlinearity=nonlinearity)
    x = leaf(23, 11, 4, dtype=dtype)
    h0 = leaf(4, 11, hidden, dtype=dtype)
    compare(ref, ours, x, h0)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_give_identical_bits(threads):
    """Rows never interact, so splitting them between threads changes nothing."""
    ours = fastrnn.RNN(8, 32, 2, bidirectional=True, backend="fused")
    x = leaf(50, 9, 8)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(ours, x)
        torch.set_num_threads(threads)
        many = run(ours, x)
    finally:
        torch.set_num_threads(before)
    for a, b in zip([one[0], one[1], *one[2]], [many[0], many[1], *many[2]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_long_sequence_float32(device):
    """A longer, wider float32 case, where summation order matters most."""
    ref, ours = pair(32, 64, device=device, num_layers=2, bidirectional=True)
    x = leaf(200, 8, 32, device=device)
    compare(ref, ours, x)


def test_nonfinite_propagates_like_nn_rnn():
    ref, ours = pair(3, 4, dtype=torch.float64, num_layers=2)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    x[2, 0, 1] = float("nan")
    x[4, 1, 0] = float("inf")
    y_ref, h_ref = ref(x)
    y, h = ours(x)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    assert torch.equal(torch.isnan(h), torch.isnan(h_ref))
    finite = ~torch.isnan(y_ref)
    torch.testing.assert_close(y[finite], y_ref[finite], **TOL[torch.float64])
