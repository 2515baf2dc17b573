"""The CUDA kernels' own code, run on CPU threads by the emulator (one thread
per CUDA thread, a barrier for __syncthreads, shared memory poisoned with
NaN), against nn.RNN: the indexing, shared-memory layout, synchronisation and
every path of the GPU time loop (distributed shared memory of clusters and
the global exchange of grid groups included) are checked where no GPU is
present. What it
cannot check (launch limits, the hardware itself) the CUDA tests do."""

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrnn
from helpers import compare, leaf, pair

pytestmark = pytest.mark.skipif(not fastrnn.cuda_built(), reason="needs the CUDA build")


@pytest.fixture(params=["persistent", "cluster", "grid", "step"])
def emulated_path(request):
    from fastrnn import _ops

    _ops._C.set_cuda_path(request.param)
    _ops._C.set_cuda_emulation(True)
    yield request.param
    _ops._C.set_cuda_emulation(False)
    _ops._C.set_cuda_path("auto")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hidden", [1, 7, 33])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_emulated_kernels_match_nn_rnn(emulated_path, dtype, hidden, nonlinearity, bidirectional):
    from fastrnn import _ops

    ref, ours = pair(4, hidden, dtype=dtype, num_layers=2, nonlinearity=nonlinearity,
                     bidirectional=bidirectional)
    x = leaf(6, 3, 4, dtype=dtype)
    h0 = leaf(2 * (2 if bidirectional else 1), 3, hidden, dtype=dtype)
    compare(ref, ours, x, h0)
    assert _ops._C.last_cuda_path() == emulated_path


def test_emulated_kernels_with_lengths(emulated_path):
    ref, ours = pair(4, 9, dtype=torch.float64, num_layers=2, bidirectional=True)
    x = torch.randn(7, 5, 4, dtype=torch.float64)
    p = pack_padded_sequence(x, torch.tensor([3, 7, 1, 7, 5]), enforce_sorted=False)
    packed = PackedSequence(p.data.requires_grad_(), p.batch_sizes, p.sorted_indices,
                            p.unsorted_indices)
    compare(ref, ours, packed)


@pytest.mark.parametrize("path,blocks", [("persistent", 0), ("cluster", 2), ("grid", 2)])
def test_emulated_blocks_of_several_rows(emulation, path, blocks):
    """Batch 140 in both directions: three rows a block on the persistent
    path, five (a tile of four and a tile of one) in the clusters and grid
    groups of two, last blocks only partly filled, rows of several lengths."""
    emulation.set_cuda_path(path, blocks)
    ref, ours = pair(3, 8, dtype=torch.float64, bidirectional=True)
    x = torch.randn(4, 140, 3, dtype=torch.float64)
    lengths = torch.randint(1, 5, (140,), generator=torch.Generator().manual_seed(0))
    p = pack_padded_sequence(x, lengths, enforce_sorted=False)
    compare(ref, ours, PackedSequence(p.data.requires_grad_(), p.batch_sizes, p.sorted_indices,
                                      p.unsorted_indices))
    assert emulation.last_cuda_path() == path


@pytest.fixture
def emulation():
    from fastrnn import _ops

    _ops._C.set_cuda_emulation(True)
    yield _ops._C
    _ops._C.set_cuda_emulation(False)
    _ops._C.set_cuda_path("auto")


def test_emulated_cluster_of_eight(emulation):
    """Hidden 480 in float32: W_hh fits neither one block (227 KB) nor a
    cluster of four, so each of eight members holds 60 columns."""
    emulation.set_cuda_path("cluster")
    ref, ours = pair(3, 480)
    compare(ref, ours, leaf(3, 2, 3))
    assert emulation.last_cuda_path() == "cluster"


@pytest.mark.parametrize("blocks,hidden,batch,bidirectional", [
    (3, 7, 5, False),   # members own 3, 3 and 1 columns
    (4, 7, 21, True),   # 2, 2, 2, 1 columns; 11 groups of 2 rows, the last of 1
    (1, 1, 3, True),    # a group of one block, hidden 1
])
def test_emulated_grid_groups(emulation, blocks, hidden, batch, bidirectional):
    """Groups of several blocks exchanging the state through the global
    buffer, uneven column splits, several row groups, lengths."""
    emulation.set_cuda_path("grid", blocks)
    ref, ours = pair(3, hidden, dtype=torch.float64, num_layers=2, bidirectional=bidirectional)
    x = torch.randn(6, batch, 3, dtype=torch.float64)
    lengths = torch.randint(1, 7, (batch,), generator=torch.Generator().manual_seed(batch))
    p = pack_padded_sequence(x, lengths, enforce_sorted=False)
    packed = PackedSequence(p.data.requires_grad_(), p.batch_sizes, p.sorted_indices,
                            p.unsorted_indices)
    compare(ref, ours, packed)
    assert emulation.last_cuda_path() == "grid"


def test_emulated_grid_at_a_size_no_cluster_holds(emulation):
    """Hidden 700 in float32: W_hh fits no block and no cluster of eight, so
    the grid path splits it between nine members of 78 columns."""
    emulation.set_cuda_path("grid")
    ref, ours = pair(3, 700)
    compare(ref, ours, leaf(2, 2, 3))
    assert emulation.last_cuda_path() == "grid"


@pytest.mark.parametrize("path,blocks,message", [
    ("grid", 1, "grid CUDA path was forced, but W_hh of hidden size 300 does not fit in the shared memory of 1 blocks"),
    ("cluster", 3, "to fit in a cluster of 3 blocks"),
])
def test_forced_shape_that_cannot_run(emulation, path, blocks, message):
    emulation.set_cuda_path(path, blocks)
    ref, ours = pair(3, 300)
    with pytest.raises(RuntimeError, match=message):
        ours(leaf(2, 2, 3))


def test_blocks_only_for_cluster_and_grid(emulation):
    with pytest.raises(RuntimeError, match="blocks applies to the cluster and grid paths only"):
        emulation.set_cuda_path("step", 2)
    with pytest.raises(RuntimeError, match="blocks must be 0"):
        emulation.set_cuda_path("grid", -1)


@pytest.mark.parametrize("hidden,batch,dtype,path", [
    (64, 2, torch.float32, "persistent"),
    (240, 2, torch.float32, "cluster"),
    (170, 2, torch.float64, "cluster"),
    (700, 2, torch.float32, "grid"),
    (700, 80, torch.float32, "step"),
])
def test_automatic_path_choice(emulation, hidden, batch, dtype, path):
    """As on an H100/H200: one block where W_hh fits its shared memory, a
    cluster where it fits eight blocks', a grid group where it fits the
    device and the step is small, else the step path."""
    ref, ours = pair(2, hidden, dtype=dtype)
    compare(ref, ours, leaf(2, batch, 2, dtype=dtype))
    assert emulation.last_cuda_path() == path


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_half_precision(emulated_path, dtype):
    """float32 accumulation and state carry, rounding only what is stored:
    within twice nn.RNN's own error against float64."""
    ref, ours = pair(4, 24, dtype=dtype, num_layers=2, bidirectional=True)
    compare(ref, ours, leaf(12, 3, 4, dtype=dtype))
