"""CUDA-only checks: every time-loop path, half precision, autocast, agreement with the
CPU kernel, determinism. Each skips where there is no GPU."""

import pytest
import torch

import fastrnn
from helpers import CUDA, compare, leaf, pair, run

pytestmark = CUDA


@pytest.fixture(params=["persistent", "cluster", "grid", "step"])
def cuda_path(request):
    """Every path; the grid path in groups of three blocks, so that the
    exchange between members runs even where one block would hold W_hh."""
    from fastrnn import _ops

    if request.param == "cluster" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90")
    _ops._C.set_cuda_path(request.param, 3 if request.param == "grid" else 0)
    yield request.param
    _ops._C.set_cuda_path("auto")


@pytest.mark.parametrize("hidden", [5, 64])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("lengths", [None, [9, 4, 9, 1]])
def test_every_path_matches_nn_rnn(cuda_path, hidden, nonlinearity, lengths):
    from fastrnn import _ops
    from torch.nn.utils.rnn import pack_padded_sequence

    ref, ours = pair(7, hidden, device="cuda", dtype=torch.float64, num_layers=2,
                     bidirectional=True, nonlinearity=nonlinearity)
    x = leaf(9, 4, 7, device="cuda", dtype=torch.float64)
    if lengths is not None:
        x = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    compare(ref, ours, x)
    assert _ops._C.last_cuda_path() == cuda_path
    assert ours.last_cuda_path == cuda_path


@pytest.mark.parametrize("hidden,batch,path", [
    (64, 3, "persistent"), (512, 3, "cluster"), (1024, 3, "grid"), (1024, 64, "step"),
])
def test_automatic_path_by_size(hidden, batch, path):
    from fastrnn import _ops

    if path == "cluster" and torch.cuda.get_device_capability()[0] < 9:
        path = "grid"
    ref, ours = pair(16, hidden, device="cuda")
    x = leaf(20, batch, 16, device="cuda")
    compare(ref, ours, x)
    assert _ops._C.last_cuda_path() == path


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [32, 256])
def test_half_precision_within_cudnn_error(dtype, hidden):
    ref, ours = pair(16, hidden, device="cuda", dtype=dtype, num_layers=2)
    x = leaf(64, 8, 16, device="cuda", dtype=dtype)
    compare(ref, ours, x)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_cuda_matches_cpu_kernel_float64(nonlinearity):
    cpu = fastrnn.RNN(5, 24, 3, bidirectional=True, nonlinearity=nonlinearity, backend="fused",
                      dtype=torch.float64)
    gpu = fastrnn.RNN(5, 24, 3, bidirectional=True, nonlinearity=nonlinearity, backend="fused",
                      dtype=torch.float64, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    x = leaf(30, 6, 5, dtype=torch.float64)
    xg = x.detach().cuda().requires_grad_()
    a, b = run(cpu, x), run(gpu, xg)
    torch.testing.assert_close(b[0].cpu(), a[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b[1].cpu(), a[1], rtol=1e-10, atol=1e-12)
    for p, q in zip(a[2], b[2]):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-9, atol=1e-11)


def test_gradcheck_on_cuda():
    ours = fastrnn.RNN(3, 4, 2, bidirectional=True, backend="fused", dtype=torch.float64,
                       device="cuda")
    x = leaf(5, 2, 3, dtype=torch.float64, device="cuda")
    h0 = leaf(4, 2, 4, dtype=torch.float64, device="cuda")
    assert torch.autograd.gradcheck(lambda x, h: ours(x, h), (x, h0))


def test_deterministic_bits(cuda_path):
    ours = fastrnn.RNN(16, 48, 2, bidirectional=True, backend="fused", device="cuda")
    x = leaf(40, 5, 16, device="cuda")
    a, b = run(ours, x), run(ours, x)
    for p, q in zip([a[0], a[1], *a[2]], [b[0], b[1], *b[2]]):
        assert torch.equal(p, q)


def test_auto_backend_uses_fused_on_cuda():
    ours = fastrnn.RNN(3, 4, device="cuda")
    ours(torch.randn(5, 2, 3, device="cuda"))
    assert ours.last_path == "fused"


def test_other_device_index_is_guarded():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    ref, ours = pair(3, 8, device="cuda:1")
    compare(ref, ours, leaf(6, 2, 3, device="cuda:1"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_runs_in_half_like_nn_rnn(dtype):
    ref, ours = pair(8, 32, device="cuda", num_layers=2)
    x = torch.randn(20, 4, 8, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y_ref, h_ref = ref(x)
        y, h = ours(x)
        (y.float().sum() + h.float().sum()).backward()
    assert y.dtype == y_ref.dtype == dtype and h.dtype == h_ref.dtype
    assert ours.weight_hh_l0.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0.05, atol=0.02)


def test_autocast_with_half_input_and_float_weights():
    ref, ours = pair(8, 32, device="cuda")
    x = torch.randn(20, 4, 8, device="cuda", dtype=torch.float16)
    with torch.autocast("cuda", dtype=torch.float16):
        y_ref, _ = ref(x)
        y, _ = ours(x)
    assert y.dtype == y_ref.dtype == torch.float16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0.05, atol=0.02)


def test_no_device_synchronisation(cuda_path):
    """Nothing in forward or backward waits for the device, packed sequences
    included: torch's sync debug mode turns any such wait into an error."""
    from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

    _, ours = pair(7, 33, device="cuda", num_layers=2, bidirectional=True)
    x = leaf(9, 4, 7, device="cuda")
    packed = pack_padded_sequence(x, torch.tensor([9, 4, 9, 1]), enforce_sorted=False)
    ours(x)  # first call: device attributes are queried once and cached
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for inp in (x, packed):
            y, h = ours(inp)
            out = y.data if isinstance(y, PackedSequence) else y
            torch.autograd.backward([out, h], [torch.ones_like(out), torch.ones_like(h)])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert x.grad is not None
