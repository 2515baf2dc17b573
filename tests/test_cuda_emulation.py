"""The CUDA kernels' own code, run on CPU threads by the emulator (one thread
per CUDA thread, a barrier for __syncthreads, shared memory poisoned with
NaN), against nn.RNN: the indexing, shared-memory layout, synchronisation and
both paths of the GPU time loop are checked where no GPU is present. What it
cannot check (launch limits, the hardware itself) the CUDA tests do."""

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrnn
from helpers import compare, leaf, pair

pytestmark = pytest.mark.skipif(not fastrnn.cuda_built(), reason="needs the CUDA build")


@pytest.fixture(params=["persistent", "step"])
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


def test_emulated_persistent_blocks_of_several_rows():
    """Batch 140 in both directions: three rows a block, a last block that is
    only partly filled."""
    from fastrnn import _ops

    _ops._C.set_cuda_path("persistent")
    _ops._C.set_cuda_emulation(True)
    try:
        ref, ours = pair(3, 8, dtype=torch.float64, bidirectional=True)
        compare(ref, ours, leaf(4, 140, 3, dtype=torch.float64))
    finally:
        _ops._C.set_cuda_emulation(False)
        _ops._C.set_cuda_path("auto")
