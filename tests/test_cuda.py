"""CUDA-only checks: every time-loop path for every cell, half precision,
autocast, agreement with the CPU kernel, determinism, no device waits. Each
skips where there is no GPU; the grid path's cases come last in the file, so
that a grid launch that misbehaves on hardware cannot hide the others."""

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrnn
from helpers import CELLS, CUDA, LAYERS, compare, initial_state, leaf, packed_leaf, pair, run

pytestmark = CUDA

KERNEL_CELLS = [p for p in CELLS if p.id != "lstm_proj"]


def _sm90():
    return torch.cuda.get_device_capability()[0] >= 9


@pytest.fixture(params=["persistent", "cluster", "step"])
def cuda_path(request):
    if request.param == "cluster" and not _sm90():
        pytest.skip("thread-block clusters need sm_90")
    with fastrnn.kernels(cuda_path=request.param):
        yield request.param


@pytest.mark.parametrize("hidden", [5, 64])
@pytest.mark.parametrize("lengths", [None, [9, 4, 9, 1]])
@pytest.mark.parametrize("cell,options", KERNEL_CELLS)
def test_every_path_matches_torch_nn(cuda_path, cell, options, hidden, lengths):
    check_path(cuda_path, cell, options, hidden, lengths)


def check_path(path, cell, options, hidden, lengths):
    ref, ours = pair(7, hidden, cell, device="cuda", dtype=torch.float64, num_layers=2,
                     bidirectional=True, **options)
    x = leaf(9, 4, 7, device="cuda", dtype=torch.float64)
    if lengths is not None:
        # The packed data is the leaf: compare() runs both layers on the same
        # input, and a graph from x through the packing would be freed by
        # the first one's backward.
        x = packed_leaf(x, lengths)
    compare(ref, ours, x)
    assert fastrnn.last_cuda_path() == path
    assert fastrnn.last_cuda_path(backward=True) == path  # on autograd's thread
    assert ours.last_cuda_path == path


def test_projections_on_the_step_path():
    ref, ours = pair(7, 16, "lstm", device="cuda", num_layers=2, bidirectional=True, proj_size=5)
    compare(ref, ours, leaf(9, 4, 7, device="cuda"))
    assert ours.last_cuda_path == "step"


@pytest.mark.parametrize("cell,hidden,batch,path", [
    ("rnn", 64, 3, "persistent"), ("rnn", 512, 3, "cluster"), ("rnn", 1024, 64, "step"),
    ("lstm", 64, 3, "persistent"), ("lstm", 200, 3, "cluster"),
    ("gru", 64, 3, "persistent"), ("gru", 256, 3, "cluster"),
])
def test_automatic_path_by_size(cell, hidden, batch, path):
    if path == "cluster" and not _sm90():
        path = "grid"
    ref, ours = pair(16, hidden, cell, device="cuda")
    compare(ref, ours, leaf(20, batch, 16, device="cuda"))
    assert fastrnn.last_cuda_path() == path


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [32, 256])
@pytest.mark.parametrize("cell,options", KERNEL_CELLS)
def test_half_precision_within_cudnn_error(cell, options, dtype, hidden):
    ref, ours = pair(16, hidden, cell, device="cuda", dtype=dtype, num_layers=2, **options)
    compare(ref, ours, leaf(64, 8, 16, device="cuda", dtype=dtype))


@pytest.mark.parametrize("cell,options", CELLS)
def test_cuda_matches_cpu_kernel_float64(cell, options):
    cls = LAYERS[cell][1]
    cpu = cls(5, 24, 3, bidirectional=True, backend="fused", dtype=torch.float64, **options)
    gpu = cls(5, 24, 3, bidirectional=True, backend="fused", dtype=torch.float64, device="cuda",
              **options)
    gpu.load_state_dict(cpu.state_dict())
    x = leaf(30, 6, 5, dtype=torch.float64)
    xg = x.detach().cuda().requires_grad_()
    a, b = run(cpu, x), run(gpu, xg)
    for p, q in zip([a[0], *a[1]], [b[0], *b[1]]):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-10, atol=1e-12)
    for p, q in zip(a[2], b[2]):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cell", list(LAYERS))
def test_gradcheck_on_cuda(cell):
    ours = LAYERS[cell][1](3, 4, 2, bidirectional=True, backend="fused", dtype=torch.float64,
                           device="cuda")
    x = leaf(5, 2, 3, dtype=torch.float64, device="cuda")
    state = initial_state(ours, 2, "cuda", torch.float64)
    states = state if isinstance(state, tuple) else (state,)

    def f(x, *s):
        y, h = ours(x, s if len(s) == 2 else s[0])
        return (y, *h) if isinstance(h, tuple) else (y, h)

    assert torch.autograd.gradcheck(f, (x, *states))


def check_same_bits(cell, options):
    """Two calls give the same output, final states and gradients, bit for bit."""
    _, ours = pair(16, 48, cell, device="cuda", num_layers=2, bidirectional=True, **options)
    x = leaf(40, 5, 16, device="cuda")
    a, b = run(ours, x), run(ours, x)
    for p, q in zip([a[0], *a[1], *a[2]], [b[0], *b[1], *b[2]]):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cell,options", KERNEL_CELLS)
def test_deterministic_bits(cuda_path, cell, options):
    check_same_bits(cell, options)


@pytest.mark.parametrize("cell", list(LAYERS))
def test_auto_backend_uses_fused_on_cuda(cell):
    ours = LAYERS[cell][1](3, 4, device="cuda")
    ours(torch.randn(5, 2, 3, device="cuda"))
    assert ours.last_path == "fused"


def test_other_device_index_is_guarded():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    ref, ours = pair(3, 8, "lstm", device="cuda:1")
    compare(ref, ours, leaf(6, 2, 3, device="cuda:1"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cell", list(LAYERS))
def test_autocast_runs_in_half_like_torch_nn(cell, dtype):
    ref, ours = pair(8, 32, cell, device="cuda", num_layers=2)
    x = torch.randn(20, 4, 8, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y_ref, _ = ref(x)
        y, h = ours(x)
        finals = h if isinstance(h, tuple) else (h,)
        (y.float().sum() + sum(f.float().sum() for f in finals)).backward()
    assert y.dtype == y_ref.dtype == dtype
    assert ours.weight_hh_l0.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0.05, atol=0.02)


@pytest.mark.parametrize("cell", list(LAYERS))
def test_autocast_with_half_input_and_float_weights(cell):
    ref, ours = pair(8, 32, cell, device="cuda")
    x = torch.randn(20, 4, 8, device="cuda", dtype=torch.float16)
    with torch.autocast("cuda", dtype=torch.float16):
        y_ref, _ = ref(x)
        y, _ = ours(x)
    assert y.dtype == y_ref.dtype == torch.float16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0.05, atol=0.02)


@pytest.mark.parametrize("cell", list(LAYERS))
def test_no_device_synchronisation(cuda_path, cell):
    """Nothing in forward or backward waits for the device, packed sequences
    included: torch's sync debug mode turns any such wait into an error."""
    _, ours = pair(7, 33, cell, device="cuda", num_layers=2, bidirectional=True)
    x = leaf(9, 4, 7, device="cuda")
    packed = pack_padded_sequence(x, torch.tensor([9, 4, 9, 1]), enforce_sorted=False)
    ours(x)  # first call: device attributes and launches are worked out once and cached
    ours(packed)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for inp in (x, packed):
            y, h = ours(inp)
            out = y.data if isinstance(y, PackedSequence) else y
            finals = list(h) if isinstance(h, tuple) else [h]
            torch.autograd.backward([out, *finals], [torch.ones_like(out)] + [torch.ones_like(f) for f in finals])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert x.grad is not None


# The grid path last: groups of three blocks, so that the exchange between
# members runs even where one block would hold W_hh.
@pytest.fixture
def grid_path():
    with fastrnn.kernels(cuda_path="grid", blocks=3):
        yield "grid"


@pytest.mark.parametrize("hidden", [5, 64])
@pytest.mark.parametrize("lengths", [None, [9, 4, 9, 1]])
@pytest.mark.parametrize("cell,options", KERNEL_CELLS)
def test_zz_grid_path_matches_torch_nn(grid_path, cell, options, hidden, lengths):
    check_path(grid_path, cell, options, hidden, lengths)


def test_zz_grid_path_at_hidden_1024():
    ref, ours = pair(16, 1024, device="cuda")
    with fastrnn.kernels(cuda_path="grid"):
        compare(ref, ours, leaf(20, 3, 16, device="cuda"))
        assert fastrnn.last_cuda_path() == fastrnn.last_cuda_path(backward=True) == "grid"


@pytest.mark.parametrize("cell,options", KERNEL_CELLS)
def test_zz_grid_path_deterministic(grid_path, cell, options):
    """The same bits on every call. (Unlike the other paths, the grid path
    waits for the device after each launch: it reads its barrier's abort
    flag there, to raise on a timeout instead of returning garbage.)"""
    check_same_bits(cell, options)
