"""The CUDA kernels' own code, run on CPU threads by the emulator (one thread
per CUDA thread, every block of a cluster or grid group at once, shared
memory poisoned with NaN, shuffles through a per-warp exchange, the grid
barrier's own atomics), against torch.nn, for every cell and path: the
indexing, shared-memory layout, synchronisation and the launch geometry the
device would get are checked where no GPU is present. What it cannot check
(the hardware itself) the CUDA tests and bench/gpu_check.sh do. Also the
path choice itself, a pure function of a model of the device."""

import pytest
import torch

import fastrnn
from helpers import CELLS, compare, initial_state, leaf, packed_leaf, pair, pairwise

pytestmark = pytest.mark.skipif(not fastrnn.cuda_built(), reason="needs the CUDA build")

PATHS = ["persistent", "cluster", "grid", "step"]
# The cells without LSTM projections, which take the step path only.
KERNEL_CELLS = [p for p in CELLS if p.id != "lstm_proj"]


def emulated(path=None, blocks=0):
    return fastrnn.kernels(cuda_path=path, blocks=blocks, emulate_cuda=True)


def packed_input(T, lengths, C, dtype=torch.float64):
    return packed_leaf(torch.randn(T, len(lengths), C, dtype=dtype), lengths)


@pairwise("bidirectional,hidden,dtype,path", [False, True], [1, 7, 33],
          [torch.float64, torch.float32], PATHS)
@pytest.mark.parametrize("cell,options", KERNEL_CELLS)
def test_every_path_matches_torch_nn(cell, options, path, dtype, hidden, bidirectional):
    ref, ours = pair(4, hidden, cell, dtype=dtype, num_layers=2, bidirectional=bidirectional,
                     **options)
    with emulated(path):
        compare(ref, ours, leaf(6, 3, 4, dtype=dtype), initial_state(ref, 3, dtype=dtype))
        assert fastrnn.last_cuda_path() == fastrnn.last_cuda_path(backward=True) == path


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell,options", CELLS)
def test_every_path_with_lengths(cell, options, path):
    ref, ours = pair(4, 9, cell, dtype=torch.float64, num_layers=2, bidirectional=True, **options)
    if options.get("proj_size") and path != "step":
        pytest.skip("projections take the step path only")
    with emulated(path):
        compare(ref, ours, packed_input(7, [3, 7, 1, 7, 5], 4))


@pytest.mark.parametrize("path,blocks", [("persistent", 0), ("cluster", 2), ("grid", 2)])
@pytest.mark.parametrize("cell,options", KERNEL_CELLS)
def test_blocks_of_several_rows(cell, options, path, blocks):
    """Batch 140 in both directions: several rows a block (row tiles of four
    and the remainder), last blocks only partly filled, rows of several
    lengths."""
    ref, ours = pair(3, 8, cell, dtype=torch.float64, bidirectional=True, **options)
    lengths = torch.randint(1, 5, (140,), generator=torch.Generator().manual_seed(0))
    with emulated(path, blocks):
        compare(ref, ours, packed_input(4, lengths, 3))
        assert fastrnn.last_cuda_path() == path


# (The cluster code is the same for every cell; the emulator takes 10-15 s for
# each of these, so make test runs the Elman one, make test-deep all three.)
@pytest.mark.parametrize("cell,hidden", [("rnn", 480), pytest.param("lstm", 300, marks=pytest.mark.deep),
                                         pytest.param("gru", 300, marks=pytest.mark.deep)])
def test_cluster_of_eight(cell, hidden):
    """W_hh fits neither one block (227 KB) nor a cluster of four, so eight
    members each hold an eighth of the units; their dot products are split
    across lanes and added by shuffles."""
    ref, ours = pair(3, hidden, cell)
    assert fastrnn._ops._C.choose_emulated_launch(
        {"rnn": "rnn_tanh"}.get(cell, cell), True, 3, 2, hidden, hidden, 1, 4, False, "cluster", 0
    )[1][5] == 8
    with emulated("cluster"):
        compare(ref, ours, leaf(3, 2, 3))
        assert fastrnn.last_cuda_path() == "cluster"


@pytest.mark.parametrize("blocks,hidden,batch,bidirectional", [
    (3, 7, 5, False),   # members own 3, 3 and 1 units
    (4, 7, 21, True),   # 2, 2, 2, 1 units; several groups of rows, the last partly filled
    (1, 1, 3, True),    # a group of one block, hidden 1
])
@pytest.mark.parametrize("cell,options", KERNEL_CELLS)
def test_grid_groups(cell, options, blocks, hidden, batch, bidirectional):
    """Groups of several blocks exchanging the state (forward) or dz
    (backward) through the global buffer and meeting at the flag barrier,
    uneven unit splits, several row groups, lengths."""
    ref, ours = pair(3, hidden, cell, dtype=torch.float64, num_layers=2,
                     bidirectional=bidirectional, **options)
    lengths = torch.randint(1, 7, (batch,), generator=torch.Generator().manual_seed(batch))
    with emulated("grid", blocks):
        compare(ref, ours, packed_input(6, lengths, 3))
        assert fastrnn.last_cuda_path() == "grid"


def test_grid_at_a_size_no_cluster_holds():
    """Hidden 700 in float32: W_hh fits no block and no cluster of eight, so
    the grid path splits it between the members of a group."""
    ref, ours = pair(3, 700)
    with emulated("grid"):
        compare(ref, ours, leaf(2, 2, 3))
        assert fastrnn.last_cuda_path() == "grid"


def test_grid_barrier_times_out_instead_of_hanging():
    """A group whose blocks are not all resident never completes its
    barrier: the emulator runs a group of three in waves of two blocks. The
    barrier's own timeout raises the launch's abort flag, every block leaves
    the kernel (the third, in the next wave, at its first barrier), and the
    host raises on reading the flag; the next launch runs as usual."""
    ref, ours = pair(3, 7, dtype=torch.float64)
    x = leaf(4, 2, 3, dtype=torch.float64)
    try:
        fastrnn._ops._C.set_grid_timeout_ms(200)
        fastrnn._ops._C.set_emulator_blocks(2)
        with emulated("grid", 3), pytest.raises(RuntimeError, match="grid-path barrier timed out"):
            ours(x)
    finally:
        fastrnn._ops._C.set_emulator_blocks(0)
        fastrnn._ops._C.set_grid_timeout_ms(10000)
    with emulated("grid", 3):
        compare(ref, ours, x)
        assert fastrnn.last_cuda_path() == "grid"


@pytest.mark.parametrize("path,blocks,message", [
    ("grid", 1, "grid CUDA path was forced, but W_hh of hidden size 300 does not fit in the shared memory of 1 blocks"),
    ("cluster", 3, "to fit in a cluster of 3 blocks"),
    ("persistent", 0, "does not fit in one block's shared memory"),
])
def test_forced_shape_that_cannot_run(path, blocks, message):
    _, ours = pair(3, 300)
    with emulated(path, blocks), pytest.raises(RuntimeError, match=message):
        ours(leaf(2, 2, 3))


def test_projections_take_the_step_path_only():
    _, ours = pair(3, 8, "lstm", proj_size=4)
    with emulated("grid"), pytest.raises(RuntimeError, match="LSTM projections take the step path only"):
        ours(leaf(2, 2, 3))
    with emulated():
        ours(leaf(2, 2, 3))
        assert fastrnn.last_cuda_path() == "step"


def test_blocks_only_for_cluster_and_grid():
    with pytest.raises(RuntimeError, match="blocks applies to the cluster and grid paths only"):
        fastrnn.set_cuda_path("step", 2)
    with pytest.raises(RuntimeError, match="blocks must be 0"):
        fastrnn.set_cuda_path("grid", -1)
    with pytest.raises(RuntimeError, match="unknown CUDA path 'fast'"):
        fastrnn.set_cuda_path("fast")


def test_path_names_come_from_the_extensions_table():
    """fastrnn.kernels.CUDA_PATHS (the bench's choices, the smoke's paths)
    repeats the extension's one table of names: every name round-trips and
    an unknown one is refused with exactly that list."""
    from fastrnn.kernels import CUDA_PATHS

    try:
        for name in CUDA_PATHS:
            fastrnn.set_cuda_path(name)
            assert fastrnn.cuda_path() == (name, 0)
    finally:
        fastrnn.set_cuda_path("auto")
    listed = ", ".join(CUDA_PATHS[:-1]) + " or " + CUDA_PATHS[-1]
    with pytest.raises(RuntimeError, match=f"unknown CUDA path 'fast': expected {listed}"):
        fastrnn.set_cuda_path("fast")


@pytest.mark.parametrize("cell,hidden,batch,dtype,path", [
    ("rnn", 64, 2, torch.float32, "persistent"),
    ("rnn", 240, 2, torch.float32, "cluster"),
    ("rnn", 170, 2, torch.float64, "cluster"),
    ("rnn", 700, 2, torch.float32, "grid"),
    ("rnn", 700, 80, torch.float32, "step"),
    ("lstm", 64, 2, torch.float32, "persistent"),
    ("lstm", 160, 2, torch.float32, "cluster"),
    ("gru", 100, 2, torch.float32, "persistent"),
    ("gru", 200, 2, torch.float32, "cluster"),
])
def test_automatic_path_choice(cell, hidden, batch, dtype, path):
    """As on an H100/H200: one block where W_hh fits its shared memory, a
    cluster where it fits eight blocks', a grid group where it fits the
    device and the step is small, else the step path."""
    ref, ours = pair(2, hidden, cell, dtype=dtype)
    with emulated():
        compare(ref, ours, leaf(2, batch, 2, dtype=dtype))
        assert fastrnn.last_cuda_path() == path


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell,options", KERNEL_CELLS)
def test_half_precision(cell, options, path, dtype):
    """float32 arithmetic and state carry, W_hh in 16 bits in shared memory,
    rounding only what is stored: within twice torch.nn's own error against
    float64."""
    ref, ours = pair(4, 24, cell, dtype=dtype, num_layers=2, bidirectional=True, **options)
    with emulated(path):
        compare(ref, ours, leaf(12, 3, 4, dtype=dtype))


# The path choice itself, on the emulated H100/H200: (path, [grid_x, grid_y,
# threads, smem, rows, size, split], error).
choose = None if not fastrnn.cuda_built() else fastrnn._ops._C.choose_emulated_launch
SMS, SMEM_OPTIN = 132, 227 * 1024


def _blocks_per_sm(threads, smem, bound):
    registers = min(256, 65536 // bound)  # a thread's, as __launch_bounds__(bound, 1) leaves them
    return min(228 * 1024 // (smem + 1024), 2048 // threads, 65536 // (threads * registers), 32)


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
@pytest.mark.parametrize("forward", [True, False])
@pytest.mark.parametrize("hidden", [16, 64, 128, 256, 512, 700, 1024])
@pytest.mark.parametrize("batch", [1, 8, 64, 512])
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("elem_bytes", [2, 4, 8])
def test_every_single_kernel_launch_fits_one_wave(cell, forward, hidden, batch, D, elem_bytes):
    """Every persistent, cluster or grid launch the chooser makes fits the
    device at once, within the shared memory a block may have; the grid
    with an eighth to spare."""
    path, (gx, gy, threads, smem, rows, size, split, bound), error = choose(
        cell, forward, 64, batch, hidden, hidden, D, elem_bytes, False, "auto", 0)
    assert error == ""
    if path == "step":
        return
    assert smem <= SMEM_OPTIN and 32 <= threads <= bound <= 512 and threads % 32 == 0
    assert gx == size * -(-batch // rows) and gy == D
    assert 1 <= split <= 32 and 32 % split == 0
    per_sm = _blocks_per_sm(threads, smem, bound)
    if path == "persistent":
        assert size == 1 and gx * gy <= per_sm * SMS
    elif path == "cluster":
        assert size in (2, 4, 8) and (gx // size) * gy <= 8 * (16 * per_sm // size)
    else:
        assert gx * gy <= per_sm * SMS * 7 // 8


def test_choice_follows_the_problem():
    # Small W_hh: one block per few rows, every multiprocessor busy.
    path, geo, _ = choose("rnn_tanh", True, 64, 264, 64, 64, 1, 4, False, "auto", 0)
    assert path == "persistent" and geo[4] == 2
    # float16 keeps W_hh in 16 bits: twice the hidden size fits one block.
    assert choose("rnn_tanh", True, 64, 1, 320, 320, 1, 2, False, "auto", 0)[0] == "persistent"
    assert choose("rnn_tanh", True, 64, 1, 320, 320, 1, 4, False, "auto", 0)[0] == "cluster"
    # Beyond one wave of clusters at this size, the grid or the step path.
    assert choose("rnn_tanh", True, 64, 4096, 512, 512, 2, 4, False, "auto", 0)[0] == "step"
    # Projections: the step path.
    assert choose("lstm", True, 64, 8, 64, 32, 1, 4, True, "auto", 0)[0] == "step"


@pytest.mark.parametrize("cell,hidden,batch,path", [
    ("rnn_tanh", 1024, 8, "grid"),    # 2^23 multiply-adds a step
    ("rnn_tanh", 1024, 16, "grid"),   # 2^24
    ("rnn_tanh", 1024, 20, "grid"),   # 5 * 2^22, the bound
    ("rnn_tanh", 1024, 21, "step"),
    ("lstm", 512, 8, "grid"),         # 2^23
    ("gru", 1024, 8, "step"),         # 3 * 2^23
    ("lstm", 1024, 8, "step"),        # 2^25
])
def test_grid_path_up_to_its_measured_bound(cell, hidden, batch, path):
    """Automatic mode takes the grid path, where W_hh fits the device, up to
    5 * 2^22 multiply-adds a step: on an H200 the step path's GEMM was
    faster from about 2^24.4 on (docs/h200/paths.json)."""
    assert choose(cell, True, 512, batch, hidden, hidden, 1, 4, False, "auto", 0)[0] == path


def test_backward_path_is_seen_from_any_thread():
    """autograd runs a CUDA backward on a thread of its own: the backward's
    path is recorded for every thread to read, the forward's per thread."""
    import threading

    ref, ours = pair(4, 8, "gru", dtype=torch.float64)
    done = []

    def train_step():
        with emulated("grid"):
            compare(ref, ours, leaf(5, 2, 4, dtype=torch.float64))
            done.append(fastrnn.last_cuda_path())

    with emulated("step"):
        compare(ref, ours, leaf(5, 2, 4, dtype=torch.float64))
    worker = threading.Thread(target=train_step)
    worker.start()
    worker.join()
    assert done == ["grid"]
    assert fastrnn.last_cuda_path() == "step"  # this thread's forward
    assert fastrnn.last_cuda_path(backward=True) == "grid"  # the worker's backward
