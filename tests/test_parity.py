"""fastrnn's layers (fused kernels) against torch.nn's with the same weights:
outputs, final states and every gradient, over the options each takes."""

import contextlib
import copy
import gc

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrnn
from helpers import (CELLS, DEVICES, TOL, assert_backward_twice_needs_retain_graph, compare, double,
                     initial_state, leaf, packed_leaf, pair, pairwise, run, states)

T, N, C, H = 7, 3, 5, 6

# Every cell, and of the options a set that holds every pair of values.
# The CPU kernels read the weights packed into panels, or as stored where a
# call's rows times steps are few (these tests' shapes, on 'auto'): both.
PACKINGS = ["always", "never"]


@pytest.mark.parametrize("device", DEVICES)
@pairwise("bias,num_layers,bidirectional,batch_first,with_h0,dtype,packing",
          [True, False], [1, 2, 3], [False, True], [False, True],
          [pytest.param(True, id="h0"), pytest.param(False, id="no_h0")],
          [torch.float32, torch.float64], PACKINGS)
@pytest.mark.parametrize("cell,options", CELLS)
def test_batched(cell, options, device, dtype, with_h0, bias, num_layers, bidirectional,
                 batch_first, packing):
    with fastrnn.kernels(cpu_packing=packing):
        _batched(cell, options, device, dtype, with_h0, bias, num_layers, bidirectional,
                 batch_first)


def _batched(cell, options, device, dtype, with_h0, bias, num_layers, bidirectional, batch_first):
    ref, ours = pair(C, H, cell, device=device, dtype=dtype, num_layers=num_layers, bias=bias,
                     bidirectional=bidirectional, batch_first=batch_first, **options)
    x = leaf(*((N, T, C) if batch_first else (T, N, C)), device=device, dtype=dtype)
    h0 = initial_state(ref, N, device, dtype) if with_h0 else None
    compare(ref, ours, x, h0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no_h0"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("cell,options", CELLS)
def test_unbatched(cell, options, device, with_h0, batch_first, bidirectional):
    dtype = torch.float64
    ref, ours = pair(C, H, cell, device=device, dtype=dtype, num_layers=2,
                     bidirectional=bidirectional, batch_first=batch_first, **options)
    D = 2 if bidirectional else 1
    x = leaf(T, C, device=device, dtype=dtype)
    h0 = initial_state(ref, 1, device, dtype, unbatched=True) if with_h0 else None
    y, finals, _ = compare(ref, ours, x, h0)
    P = options.get("proj_size", H)
    assert y.shape == (T, D * P) and finals[0].shape == (2 * D, P)


@pytest.fixture
def packing(request):
    with fastrnn.kernels(cpu_packing=request.param):
        yield request.param


@pytest.mark.parametrize("packing", PACKINGS, indirect=True)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no_h0"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("cell,options", CELLS)
def test_packed(cell, options, device, dtype, enforce_sorted, with_h0, bidirectional, packing):
    ref, ours = pair(C, H, cell, device=device, dtype=dtype, num_layers=2,
                     bidirectional=bidirectional, **options)
    lengths = [7, 7, 4, 2, 1] if enforce_sorted else [3, 7, 1, 7, 5]
    x = torch.randn(T, len(lengths), C, device=device, dtype=dtype)
    packed = packed_leaf(x, lengths, enforce_sorted=enforce_sorted)
    h0 = initial_state(ref, len(lengths), device, dtype) if with_h0 else None
    compare(ref, ours, packed, h0)
    out, _ = ours(packed, h0)
    assert torch.equal(out.batch_sizes, packed.batch_sizes)
    if not enforce_sorted:
        assert torch.equal(out.sorted_indices, packed.sorted_indices)
        assert torch.equal(out.unsorted_indices, packed.unsorted_indices)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("cell,options", CELLS)
def test_input_that_needs_no_gradient(cell, options, device, packed):
    """Data that needs no gradient, the usual first layer: the backward then
    skips the input's GEMM, and every other gradient still matches."""
    ref, ours = pair(C, H, cell, device=device, dtype=torch.float64, num_layers=2,
                     bidirectional=True, **options)
    x = torch.randn(T, N, C, dtype=torch.float64, device=device)
    if packed:
        x = pack_padded_sequence(x, torch.tensor([7, 2, 5]), enforce_sorted=False)
    h0 = initial_state(ref, N, device, torch.float64)
    got = compare(ref, ours, x, h0)
    assert got[2][0] is None and all(g is not None for g in got[2][1:])


def _grads_of_part(module, x, hx, part, create_graph):
    """Gradients of x, the initial states and the parameters under a loss on
    one of the layer's results only: 0 the output, 1 h_n, 2 c_n."""
    out, h = module(x, hx)
    y = out.data if isinstance(out, PackedSequence) else out
    results = [y, *states(h)]
    target = results[part]
    loss = (target * torch.linspace(-1, 1, target.numel(), dtype=target.dtype,
                                    device=target.device).view_as(target)).sum()
    data = x.data if isinstance(x, PackedSequence) else x
    leaves = [data, *states(hx), *module.parameters()]
    return torch.autograd.grad(loss, leaves, create_graph=create_graph, allow_unused=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("cell,options", CELLS)
def test_loss_on_one_result_only(cell, options, device, packed, create_graph):
    """A loss that reaches only the output, only h_n or only c_n leaves the
    other results without a gradient: the backward must take them as zero."""
    ref, ours = pair(C, H, cell, device=device, dtype=torch.float64, num_layers=2,
                     bidirectional=True, **options)
    x = leaf(T, N, C, device=device, dtype=torch.float64)
    if packed:
        x = pack_padded_sequence(x, torch.tensor([7, 2, 5]), enforce_sorted=False)
    hx = initial_state(ref, N, device, torch.float64)
    for part in range(3 if cell == "lstm" else 2):
        expected = _grads_of_part(ref, x, hx, part, create_graph)
        got = _grads_of_part(ours, x, hx, part, create_graph)
        assert ours.last_path == "fused"
        for e, g in zip(expected, got):
            assert (e is None) == (g is None)
            if e is not None:
                torch.testing.assert_close(g, e, **TOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell,options", CELLS)
def test_zero_batch(cell, options, device):
    ref, ours = pair(C, H, cell, device=device, dtype=torch.float64, num_layers=2,
                     bidirectional=True, **options)
    x = torch.randn(T, 0, C, dtype=torch.float64, device=device)
    y_ref, h_ref = ref(x)
    y, h = ours(x)
    assert y.shape == y_ref.shape
    for a, b in zip(h if isinstance(h, tuple) else (h,), h_ref if isinstance(h_ref, tuple) else (h_ref,)):
        assert a.shape == b.shape


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
    with fastrnn.kernels(cpu_isa=request.param):
        yield request.param


@pytest.mark.parametrize("packing", PACKINGS, indirect=True)
@pytest.mark.parametrize("cpu_isa", _isa_params(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hidden", [1, 5, 16, 40, 70])
@pytest.mark.parametrize("cell,options", CELLS)
def test_cpu_kernel_variants(cpu_isa, cell, options, dtype, hidden, packing):
    """Every instruction set's kernel, packed weights and as stored, at
    hidden sizes that exercise every panel width and vector remainder and a
    batch that exercises every row block and remainder."""
    if options.get("proj_size", 0) >= hidden:
        options = dict(options, proj_size=hidden - 1) if hidden > 1 else {}
    ref, ours = pair(4, hidden, cell, dtype=dtype, num_layers=2, bidirectional=True, **options)
    x = leaf(23, 11, 4, dtype=dtype)
    compare(ref, ours, x, initial_state(ref, 11, dtype=dtype))


@pytest.mark.parametrize("cpu_isa", _isa_params(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 2, 3, 7])
@pytest.mark.parametrize("packing", ["always", "never"])
@pytest.mark.parametrize("cell,options", CELLS)
def test_cpu_kernel_few_rows(cpu_isa, cell, options, packing, dtype, batch):
    """Fewer rows than a register block, on one thread so that the rows are
    not split. Packed weights: all the rows run in one block over groups of
    panels (few_rows_panels), in chunks, at a hidden size whose panels leave
    every group size and a last panel outside the groups. Weights as
    stored: 2 and 3 rows run over blocks of eight weight rows
    (dot_column<8, 2>), then of four, then one (303 = 37 * 8 + 4 + 3)."""
    ref, ours = pair(6, 303, cell, dtype=dtype, bidirectional=True, **options)
    x = leaf(9, batch, 6, dtype=dtype)
    with fastrnn.kernels(cpu_packing=packing), num_threads(1):
        compare(ref, ours, x, initial_state(ref, batch, dtype=dtype))


@pytest.mark.parametrize("hidden", [70, 13])
@pytest.mark.parametrize("cpu_isa", _isa_params(), indirect=True)
@pytest.mark.parametrize("cell,options", CELLS)
def test_layer_rows_do_not_depend_on_the_rows_beside_them(cpu_isa, cell, options, hidden):
    """Packed steps run the rows in whole register blocks (8 rows with
    AVX-512, 4 below it), the rest in one block (one more than a whole
    block where a single row would be left), and fewer rows than a block
    over groups of panels, in chunks that walk backwards every other step;
    each sum runs in one order whatever block and direction it falls in.
    Rows of at most one vector of units (hidden 13) take the cell's step
    four or two rows at a time with AVX-512, one alone where one is left.
    So each row's output, final states and initial states' gradients are,
    bit for bit, those of the row run alone, at every batch from 2 to 17
    (packed, one thread)."""
    ref, ours = pair(6, hidden, cell, **options)
    x = torch.randn(6, 17, 6)
    hx = initial_state(ref, 17)

    def rows(n0, n1):
        h = tuple(t[:, n0:n1].detach().requires_grad_() for t in states(hx))
        out, finals = ours(x[:, n0:n1], h if len(h) == 2 else h[0])
        loss = (out * torch.linspace(-1, 2, out.shape[-1])).sum()
        for f in states(finals):
            loss = loss + (f * torch.linspace(2, -1, f.shape[-1])).sum()
        loss.backward()
        return [out.detach()] + [f.detach() for f in states(finals)] + [t.grad for t in h]

    with fastrnn.kernels(cpu_packing="always"), num_threads(1):
        alone = [rows(n, n + 1) for n in range(17)]
        for batch in range(2, 18):
            whole = rows(0, batch)
            for n in range(batch):
                for a, b in zip(alone[n], whole):
                    assert torch.equal(a, b[:, n:n + 1]), (batch, n)


def _mean_relative_error(got, truth):
    """The mean over elements of |got - truth| / |truth|, where truth is not 0."""
    got, truth = got.double().flatten(), truth.double().flatten()
    keep = truth != 0
    return ((got[keep] - truth[keep]).abs() / truth[keep].abs()).mean().item()


@pytest.mark.parametrize("cpu_isa", _isa_params(), indirect=True)
@pytest.mark.parametrize("cell,options", CELLS)
def test_saturating_units_gradients_as_accurate_as_torch_nn(cpu_isa, cell, options):
    """Where the activations saturate, the backward's derivatives, 1 - y^2
    and s (1 - s), rest on what float32 keeps of y's distance from 1 (and
    of s itself near 0): a tanh or sigmoid a few ulp off there, where
    torch's is within one, gives gradients several times less accurate.
    One step of one row, every gate's pre-activation spread over [-9, 9]
    by the biases (the weights zero): each bias gradient is then one unit's
    gate gradient, a product without sums, and its mean relative error
    against float64 may be at most 1.5 times torch.nn's."""
    H = 256
    ref, ours = pair(3, H, cell, **options)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.linspace(-9, 9, H).repeat(p.shape[0] // H) if name == "bias_ih_l0"
                    else torch.zeros_like(p))
    ours.load_state_dict(ref.state_dict())
    x = leaf(1, 1, 3)
    hx = initial_state(ref, 1)
    expected, got = run(ref, x, hx), run(ours, x, hx)
    truth = run(copy.deepcopy(ref).double(), double(x), double(hx))
    assert ours.last_path == "fused"
    names = [n for n, _ in ref.named_parameters()]
    first = 1 + len(states(hx))  # the gradients of x and the states come first
    for name in ("bias_ih_l0", "bias_hh_l0"):
        k = first + names.index(name)
        ours_err = _mean_relative_error(got[2][k], truth[2][k])
        nn_err = _mean_relative_error(expected[2][k], truth[2][k])
        assert ours_err <= 1.5 * nn_err, f"{name}: {ours_err:.3g} against torch.nn's {nn_err:.3g}"


@contextlib.contextmanager
def num_threads(n):
    """torch's intra-op threads set to n inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def on_threads(n, module, x):
    """run() with n threads."""
    with num_threads(n):
        return run(module, x)


def assert_same_bits(one, other):
    """Two run() results equal bit for bit: output, final states, gradients."""
    for a, b in zip([one[0], *one[1], *one[2]], [other[0], *other[1], *other[2]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("packing", PACKINGS, indirect=True)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cell,options", CELLS)
def test_threads_give_identical_bits(cell, options, threads, packing):
    """Rows never interact, so splitting them between threads changes nothing."""
    _, ours = pair(8, 32, cell, num_layers=2, bidirectional=True, **options)
    x = leaf(50, 9, 8)
    assert_same_bits(on_threads(1, ours, x), on_threads(threads, ours, x))


@pytest.mark.parametrize(
    "cell,C,H,N,T,dtype",
    [
        pytest.param("lstm", 5, 200, 17, 3, torch.float64, id="dx_few_rows"),
        pytest.param("rnn", 300, 64, 64, 40, torch.float64, id="dw_ih_many_rows"),
        pytest.param("gru", 32, 512, 1, 3, torch.float32, id="inner_dx_wide"),
    ],
)
def test_threads_give_identical_bits_through_atens_products(cell, C, H, N, T, dtype):
    """The backward's products that go to ATen's GEMM (dx of few columns,
    dW of many in float64, a second layer's dx of 1024 columns) at shapes
    where MKL, left to itself, splits the sums between threads on some
    processors (Xeons): cut into tiles by shape, each on one thread
    (product_cpu), they keep the same bits on one thread and two."""
    _, ours = pair(C, H, cell, dtype=dtype, num_layers=2, bidirectional=True)
    x = leaf(T, N, C, dtype=dtype)
    assert_same_bits(on_threads(1, ours, x), on_threads(2, ours, x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell,options", CELLS)
def test_long_sequence_float32(cell, options, device):
    """A longer, wider float32 case, where summation order matters most."""
    ref, ours = pair(32, 64, cell, device=device, num_layers=2, bidirectional=True, **options)
    x = leaf(200, 8, 32, device=device)
    compare(ref, ours, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layers,steps,batch,bias,lengths", [
    (1, 1, 1, True, False), (2, 3, 2, True, False), (2, 5, 3, False, False),
    (1, 4, 4, True, True), (3, 2, 8, True, False), (1, 16, 1, False, True)])
@pytest.mark.parametrize("cell,options", [c for c in CELLS if "proj_size" not in c.values[1]])
def test_small_calls_one_pass_weight_gradients(cell, options, layers, steps, batch, bias,
                                               lengths, dtype):
    """Calls of one direction with at most 16 rows (steps times batch) take
    the CPU kernels' one pass for the weight and input gradients
    (rnn_stack.cpp, kFewRows): states before each row from h0 and the
    output, every layer's input gradient, with and without biases and
    lengths, as torch.nn's."""
    ref, ours = pair(5, 6, cell, dtype=dtype, num_layers=layers, bias=bias, **options)
    hx = initial_state(ref, batch, dtype=dtype)
    if not lengths:
        compare(ref, ours, leaf(steps, batch, 5, dtype=dtype), hx)
        return
    lens = torch.randint(1, steps + 1, (batch,))
    lens[0] = steps
    packed = packed_leaf(torch.randn(steps, batch, 5, dtype=dtype), lens)
    compare(ref, ours, packed, hx)


@pytest.mark.parametrize("cpu_isa", _isa_params(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("input_size,hidden,bidirectional,lengths", [
    (3, 7, False, False), (17, 7, True, False), (40, 130, False, True), (100, 9, True, True),
    (130, 33, True, False)])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_narrow_products_of_long_calls(cpu_isa, cell, input_size, hidden, bidirectional, lengths,
                                       dtype):
    """A call of 585 rows (steps times batch) takes the CPU kernels' narrow
    tiles (recurrence_cpu_kernels.h, narrow_sums) for dW_ih, dW_hh and dx
    where they beat ATen's GEMMs (not float32 with the AVX2 kernels, which
    takes ATen's, tiles cut by shape): inputs of one to nine vectors, units and
    rows that leave partial tiles, sums over two runs of 512 rows or units,
    the states before each step of both directions, with and without
    lengths, and the second direction's term added to dx. As torch.nn's,
    and the same bits on two threads as on one."""
    ref, ours = pair(input_size, hidden, cell, dtype=dtype, bidirectional=bidirectional)
    steps, batch = 45, 13
    hx = initial_state(ref, batch, dtype=dtype)
    x = torch.randn(steps, batch, input_size, dtype=dtype)
    if lengths:
        lens = torch.randint(1, steps + 1, (batch,))
        lens[0] = steps
        data = packed_leaf(x, lens, enforce_sorted=False)
    else:
        data = x.clone().requires_grad_()
    compare(ref, ours, data, hx)
    assert_same_bits(on_threads(1, ours, data), on_threads(2, ours, data))


@pytest.mark.parametrize("cell,options", CELLS)
def test_nonfinite_propagates_like_torch(cell, options):
    ref, ours = pair(3, 4, cell, dtype=torch.float64, num_layers=2, **options)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    x[2, 0, 1] = float("nan")
    x[4, 1, 0] = float("inf")
    y_ref, _ = ref(x)
    y, _ = ours(x)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    finite = ~torch.isnan(y_ref)
    torch.testing.assert_close(y[finite], y_ref[finite], **TOL[torch.float64])


# Sizes where the weights of a direction pass 512 KB in float32, so that two
# threads split units rather than rows at these small batches
# (recurrence_cpu.cpp): each thread packs its slice of the weights at 6
# steps, and reads its rows of them as stored at 3 steps and 1.
COLUMN_SPLIT = [
    pytest.param("rnn", 400, dict(nonlinearity="tanh"), id="rnn_tanh"),
    pytest.param("lstm", 200, dict(), id="lstm"),
    pytest.param("lstm", 300, dict(proj_size=150), id="lstm_proj"),
    pytest.param("gru", 240, dict(), id="gru"),
]


@pytest.mark.parametrize("steps", [6, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cell,hidden,options", COLUMN_SPLIT)
def test_column_split_loops_match_torch_nn(cell, hidden, options, dtype, steps):
    ref, ours = pair(5, hidden, cell, dtype=dtype, num_layers=2, bidirectional=True, **options)
    # Rows of both directions: 6 at 6 steps (packed slices: fewer than
    # two threads' 4 rows each, from which packed weights that fit in L2
    # split rows), 6 at 3 steps (fewer than two threads' blocks of 4 rows:
    # rows of the weights as stored).
    lengths = [6, 2, 5] if steps == 6 else [3, 1, 2]
    x = torch.randn(steps, len(lengths), 5, dtype=dtype)
    packed = packed_leaf(x, lengths)
    with num_threads(2):
        compare(ref, ours, packed, initial_state(ref, len(lengths), dtype=dtype))


@pytest.mark.parametrize("steps", [6, 3, 1])
@pytest.mark.parametrize("cell,hidden,options", COLUMN_SPLIT)
def test_column_split_gives_the_row_loops_bits(cell, hidden, options, steps):
    """Every element's sums run in the same order whichever way the threads
    split the work: two threads (units split) give one thread's bits. (At
    fewer steps one layer: a second's input of 2 x hidden columns sends the
    backward's products to ATen's GEMMs, whose bits MKL may change with the
    thread count.)"""
    layers = 2 if steps == 6 else 1
    ref, ours = pair(5, hidden, cell, num_layers=layers, bidirectional=True, **options)
    x = leaf(steps, 3, 5)
    assert_same_bits(on_threads(1, ours, x), on_threads(2, ours, x))
    if steps == 1:
        with num_threads(2):
            compare(ref, ours, x, initial_state(ref, 3))


@pytest.mark.parametrize("cell,hidden,options", COLUMN_SPLIT)
def test_large_weights_at_a_large_batch_split_rows(cell, hidden, options):
    """The same weights at a batch that gives each of two threads 16 rows or
    more: the threads split rows again (recurrence_cpu.cpp), and match
    torch.nn and one thread's bits."""
    ref, ours = pair(5, hidden, cell, dtype=torch.float64, bidirectional=True, **options)
    x = leaf(3, 17, 5, dtype=torch.float64)
    with num_threads(2):
        compare(ref, ours, x, initial_state(ref, 17, dtype=torch.float64))
    assert_same_bits(on_threads(1, ours, x), on_threads(2, ours, x))


@pytest.mark.parametrize("cell,hidden,options", COLUMN_SPLIT)
def test_large_weights_at_a_middle_batch(cell, hidden, options):
    """4 to 15 rows a thread, weights past an AMD core's L2 (1 MB) in
    float64: split by rows on an AMD processor, whose L3 streams them fast
    enough (recurrence_cpu.cpp, rows_stream_weights), the backward by units
    elsewhere; either way torch.nn's results and one thread's bits."""
    ref, ours = pair(5, hidden, cell, dtype=torch.float64, **options)
    x = leaf(7, 9, 5, dtype=torch.float64)
    with num_threads(2):
        compare(ref, ours, x, initial_state(ref, 9, dtype=torch.float64))
    assert_same_bits(on_threads(1, ours, x), on_threads(2, ours, x))


# Shapes (hidden, steps, batch, lengths, threads) that take each of the CPU
# backward's routes: one step on the weights as stored and, past 128 rows,
# packed, a few rows (the one pass for the weights' gradients), the row loop
# on packed weights and on the weights as stored (lengths), and the column
# split on two threads.
BACKWARD_ROUTES = {
    "step": (32, 1, 64, None, 1),
    "step_packed": (32, 1, 130, None, 1),
    "few_rows": (6, 2, 4, None, 1),
    "packed_weights": (6, 7, 9, None, 1),
    "as_stored": (6, 6, 3, [6, 2, 5], 1),
    "wide": (256, 3, 3, None, 2),
}


@pytest.mark.parametrize("route", BACKWARD_ROUTES)
@pytest.mark.parametrize("cell,options", CELLS)
def test_initial_state_without_grad_changes_no_other_gradient(cell, options, route):
    """Where no initial state needs a gradient, the backward skips what
    makes it (the last step's product with W_hh: all of a single step's
    backward but the gates' and weights' gradients). The output, the final
    states and the input's and weights' gradients keep their bits; where
    the state needs one, its gradients are torch.nn's (for an LSTM, also
    where c0 alone needs one)."""
    hidden, steps, batch, lengths, threads = BACKWARD_ROUTES[route]
    one_step = route.startswith("step")
    ref, ours = pair(5, hidden, cell, dtype=torch.float64, bidirectional=not one_step,
                     num_layers=1 if one_step else 2, **options)
    x = leaf(steps, batch, 5, dtype=torch.float64)
    if lengths is not None:
        x = packed_leaf(x, lengths)
    hx = initial_state(ref, batch, dtype=torch.float64)
    detached = tuple(t.detach() for t in hx) if isinstance(hx, tuple) else hx.detach()
    wanting = [hx]
    if isinstance(hx, tuple):
        wanting.append((hx[0].detach(), hx[1]))  # c0 alone
    params = len(list(ours.parameters()))

    def kept(result):  # all but the initial states' gradients
        y, finals, grads = result
        return [y, *finals, grads[0], *grads[len(grads) - params:]]

    with num_threads(threads):
        without = run(ours, x, detached)
        for state in wanting:
            with_grad = run(ours, x, state)
            for a, b in zip(kept(without), kept(with_grad)):
                assert torch.equal(a, b)
            want = run(ref, x, state)
            for k, t in enumerate(states(state)):
                if t.requires_grad:
                    torch.testing.assert_close(with_grad[2][1 + k], want[2][1 + k],
                                               **TOL[torch.float64])
    assert all(g is None for g in without[2][1:1 + len(states(detached))])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_buffers_of_32_mb_and_more(cell):
    """A long batch whose workspace and gate gradients pass 32 MB (42 and
    34 MB for the LSTM), taken afresh or out of the freed blocks
    (recurrence_cpu.cpp, recycled()), and whose packed weights (1 MB) are
    packed by both threads, a range of panels each: results as torch.nn's."""
    ref, ours = pair(32, 256, cell)
    x = leaf(128, 64, 32, scale=0.5)
    compare(ref, ours, x)


@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_buffers_in_recycled_memory_stay_apart(cell, num_layers, bidirectional):
    """A CPU call's buffers of 256 KB or more (output, workspace, gate
    gradients, packed weights) come from memory that earlier ones gave back
    (recurrence_cpu.cpp, recycled()): two graphs alive at once, their
    backwards run in the other order, give torch.nn's values; an output
    still held is not handed out again; an output resizes as one of
    empty() does."""
    dtype = torch.float64
    ref, ours = pair(32, 256, cell, num_layers=num_layers, bidirectional=bidirectional,
                     dtype=dtype)
    xs = [leaf(40, 8, 32, dtype=dtype) for _ in range(3)]
    params = [list(m.parameters()) for m in (ref, ours)]

    def grads(module, weights):
        ys = [module(x)[0] for x in xs[:2]]
        kept = [y.detach().clone() for y in ys]
        got = []
        for x, y in zip(xs[1::-1], ys[::-1]):
            w = torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)
            got.append(torch.autograd.grad((y * w).sum(), [x] + weights))
        # Both outputs as written, though the other call and both backwards
        # ran since.
        for y, k in zip(ys, kept):
            assert torch.equal(y.detach(), k)
        return ys, got

    with fastrnn.kernels(cpu_packing="always"):
        expected = grads(ref, params[0])
        got = grads(ours, params[1])
        assert ours.last_path == "fused"
    assert got[0][0].untyped_storage().nbytes() >= 256 << 10
    assert got[0][0].data_ptr() != got[0][1].data_ptr()
    for a, b in zip(expected[0], got[0]):
        torch.testing.assert_close(b, a, **TOL[dtype])
    for ga, gb in zip(expected[1], got[1]):
        for a, b in zip(ga, gb):
            torch.testing.assert_close(b, a, **TOL[dtype])
    # A third call while the first two outputs are alive: memory of its own.
    with torch.no_grad():
        y3 = ours(xs[2])[0]
    assert y3.data_ptr() not in {y.data_ptr() for y in got[0]}
    values = y3.clone()
    y3.resize_(2 * y3.numel())
    assert torch.equal(y3[:values.numel()], values.view(-1))


def test_freed_buffers_kept_at_most_twice_the_most_ever_live():
    """The cache of freed CPU buffers (recurrence_cpu.cpp, recycled()) lets
    go of the sizes calls no longer ask for: over calls of falling lengths,
    each of new sizes, the blocks it keeps and the live ones together stay
    within twice the most ever live at once (without the release they
    would pile up, a set of blocks per length); and a call repeated at the
    same sizes takes every block from it (its figures do not move).
    fastrnn.empty_cpu_cache() empties it. (Without the cyclic garbage
    collector while it runs: buffers of earlier tests' graphs that it
    collected would change the figures.)"""
    ref, ours = pair(16, 96, "lstm")
    gc.collect()
    collecting = gc.isenabled()
    gc.disable()
    try:
        fastrnn.empty_cpu_cache()
        assert fastrnn.cpu_cache_bytes()[0] == 0
        for T in (60, 50, 40, 30, 20):
            x = leaf(T, 32, 16)
            compare(ref, ours, x)
            cached, live, peak = fastrnn.cpu_cache_bytes()
            assert 0 < cached and cached + live <= 2 * peak
            assert cached <= 1 << 30
        x = leaf(20, 32, 16)
        ours(x)[0].sum().backward()
        before = fastrnn.cpu_cache_bytes()
        for _ in range(2):
            ours(x)[0].sum().backward()
            assert fastrnn.cpu_cache_bytes() == before
    finally:
        if collecting:
            gc.enable()


# The layers' cells without projections: a plain call of one of them (one
# layer and direction, plain CPU tensors) records fastrnn's own node.
PLAIN_CELLS = [p for p in CELLS if "proj_size" not in p.values[1]]


@pytest.mark.parametrize("grad_form", ["expanded", "transposed"])
@pytest.mark.parametrize("batch_first,n", [(False, 3), (True, 1)])
@pytest.mark.parametrize("cell,options", PLAIN_CELLS)
def test_plain_call_node_matches_torch_nn(cell, options, batch_first, n, grad_form):
    """A layer's plainest call with a graph records fastrnn::FusedBackward
    (batch_first with one row is such a call too); its gradients are nn's
    for gradients of the output and final states that are not contiguous
    (a sum's, expanded from one value; a transposed one)."""
    dtype = torch.float64
    ref, ours = pair(C, H, cell, dtype=dtype, batch_first=batch_first, **options)
    x = leaf(*((n, T, C) if batch_first else (T, n, C)), dtype=dtype)
    hx = initial_state(ref, n, dtype=dtype)
    leaves = [x, *states(hx)]
    y, finals = ours(x, hx)
    assert all(f.grad_fn.name() == "fastrnn::FusedBackward" for f in states(finals))
    outs = [y, *states(finals)]
    if grad_form == "expanded":
        grads = [torch.tensor(0.3 + k, dtype=dtype).expand(o.shape) for k, o in enumerate(outs)]
    else:
        grads = [torch.randn(*reversed(o.shape), dtype=dtype).permute(*reversed(range(o.dim())))
                 for o in outs]
    assert not grads[0].is_contiguous()
    got = torch.autograd.grad(outs, leaves + list(ours.parameters()), grads)
    y_ref, finals_ref = ref(x, hx)
    expected = torch.autograd.grad([y_ref, *states(finals_ref)], leaves + list(ref.parameters()),
                                   grads)
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, **TOL[dtype])


@pytest.mark.parametrize("cell,options", PLAIN_CELLS)
def test_plain_call_node_keeps_autograds_rules(cell, options):
    """The node of a plain call: saved tensors freed after a backward unless
    retain_graph, checked against writes in place; batched gradients and a
    gradient of gradients (gradgradcheck) through it."""
    ref, ours = pair(C, H, cell, dtype=torch.float64, **options)
    x = leaf(T, N, C, dtype=torch.float64)
    assert_backward_twice_needs_retain_graph(ours(x)[0].sum(), [x, *ours.parameters()])
    y = ours(x)[0]
    with torch.no_grad():
        ours.weight_ih_l0.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    ours.load_state_dict(ref.state_dict())
    y = ours(x)[0]
    y[0].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()

    grads = torch.randn(3, T, N, H, dtype=torch.float64)
    (got,) = torch.autograd.grad(ours(x)[0], x, grads, is_grads_batched=True)
    for g, b in zip(grads, got):
        (one,) = torch.autograd.grad(ref(x)[0], x, g)
        torch.testing.assert_close(b, one, **TOL[torch.float64])

    small = leaf(3, 2, C, dtype=torch.float64)
    assert ours(small)[0].grad_fn.name() == "fastrnn::FusedBackward"
    assert torch.autograd.gradgradcheck(lambda v: ours(v)[0], (small,))


@pytest.mark.parametrize("frozen", ["all", "weight_hh", "biases", "input_only"])
@pytest.mark.parametrize("cell,options", PLAIN_CELLS)
def test_plain_call_with_frozen_weights(cell, options, frozen):
    """Where no weight needs a gradient (frozen, or only the input's asked
    for) the node computes none, as torch.nn's autograd; where some do,
    each is torch.nn's."""
    ref, ours = pair(C, H, cell, dtype=torch.float64, **options)
    x = leaf(T, N, C, dtype=torch.float64)
    hx = initial_state(ref, N, dtype=torch.float64)
    for m in (ref, ours):
        for name, p in m.named_parameters():
            if frozen == "all" or (frozen == "weight_hh" and name.startswith("weight_hh")) or \
                    (frozen == "biases" and name.startswith("bias")):
                p.requires_grad_(False)
    grads = []
    for m in (ref, ours):
        y, finals = m(x, hx)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + \
            sum((f * 0.5).sum() for f in states(finals))
        wanted = [x, *states(hx)]
        if frozen != "input_only":
            wanted += [p for p in m.parameters() if p.requires_grad]
        grads.append(torch.autograd.grad(loss, wanted))
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, **TOL[torch.float64])
