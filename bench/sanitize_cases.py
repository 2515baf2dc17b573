"""Small forward+backward calls of every CUDA path and cell, for
compute-sanitizer:

    compute-sanitizer --tool memcheck python bench/sanitize_cases.py [--full-smem]
    python bench/sanitize_cases.py --emulate [--full-smem[=persistent]]   # no GPU: the emulator
    --quick: float32 only (the dry run of bench/gpu_check.sh)
    --no-step: without the step path, whose own kernels use no shared
    memory (racecheck: on an H200 its cuBLAS calls took most of 90 s)

--full-smem adds, per cell, the largest hidden size the persistent path
holds in one block's shared memory, and a cluster of 8 at its own limit, so
that the tools see the kernels at the edge of shared memory.
"""

import sys

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn

# --full-smem: both paths; --full-smem=persistent: that path only.
full_smem = next((a.partition("=")[2] or "persistent,cluster" for a in sys.argv
                  if a.startswith("--full-smem")), "")
emulate = "--emulate" in sys.argv
dtypes = (torch.float32,) if "--quick" in sys.argv else (torch.float32, torch.float64, torch.bfloat16)
if emulate:
    # The CUDA kernels' code on CPU threads, for CPU tensors, with the
    # emulated device's limits (an H100's: clusters, 227 KB of shared memory).
    device, cluster_ok = "cpu", True
    emulation = fastrnn.kernels(emulate_cuda=True)  # kept: its exit would end emulation
    emulation.__enter__()
else:
    device, cluster_ok = "cuda", torch.cuda.get_device_capability()[0] >= 9
# (path, blocks per cluster or grid group); the grid in groups of three, so
# that its members exchange state through global memory, and last: should a
# tool hold back some of its blocks, its barrier would wait for them, and the
# other paths' results are printed by then.
paths = [("persistent", 0)] + ([] if "--no-step" in sys.argv else [("step", 0)])
if cluster_ok:
    paths.append(("cluster", 2))
paths.append(("grid", 3))
layers = {"rnn": fastrnn.RNN, "lstm": fastrnn.LSTM, "gru": fastrnn.GRU}


def outputs(cell, out):
    y, h = out
    y = y.data if hasattr(y, "batch_sizes") else y
    return [y, *h] if cell == "lstm" else [y, h]


def run(cell, hidden, dtype, layers_n=2, bidirectional=True, **kw):
    m = layers[cell](5, hidden, layers_n, bidirectional=bidirectional, backend="fused", device=device,
                     dtype=dtype, **kw)
    x = torch.randn(7, 3, 5, device=device, dtype=dtype, requires_grad=True)
    sum(t.float().sum() for t in outputs(cell, m(x))).backward()
    packed = pack_padded_sequence(x, torch.tensor([7, 2, 5]), enforce_sorted=False)
    sum(t.float().sum() for t in outputs(cell, m(packed))).backward()


for path, blocks in paths:
    with fastrnn.kernels(cuda_path=path, blocks=blocks):
        for cell in layers:
            # Every dtype's kernels once; the activation does not change any access.
            for dtype in dtypes:
                run(cell, 33, dtype, **({"nonlinearity": "relu"} if cell == "rnn" and dtype == torch.float64
                                        else {}))
            print(path, cell, "ok:", fastrnn.last_cuda_path(), flush=True)


def edge(cell, dtype, path, blocks):
    """The largest hidden size (a multiple of 8) that the path takes for one
    layer, forward and backward, as the chooser sees an H100/H200 (227 KB of
    shared memory a block, 132 multiprocessors): a bisection."""
    kind = {"rnn": "rnn_tanh"}.get(cell, cell)
    size = torch.tensor([], dtype=dtype).element_size()

    def takes(hidden):
        return all(fastrnn._ops._C.choose_emulated_launch(kind, forward, 7, 3, hidden, hidden, 1, size,
                                                          False, path, blocks)[2] == ""
                   for forward in (True, False))

    lo, hi = 0, 8192  # lo is taken (or 0), hi is not
    while hi - lo > 8:
        mid = (lo + hi) // 16 * 8
        lo, hi = (mid, hi) if takes(mid) else (lo, mid)
    return lo


if full_smem:
    # The persistent path and a cluster of 8 at the largest hidden size each
    # takes, per cell, float32 and bfloat16: shared memory nearly full.
    for path, blocks in (("persistent", 0), ("cluster", 8)):
        if path not in full_smem.split(",") or (path == "cluster" and not cluster_ok):
            continue
        with fastrnn.kernels(cuda_path=path, blocks=blocks):
            for cell in layers:
                for dtype in [d for d in (torch.float32, torch.bfloat16) if d in dtypes]:
                    hidden = edge(cell, dtype, path, blocks)
                    for _ in range(4):  # this device may hold a little less than the model
                        try:
                            run(cell, hidden, dtype, layers_n=1, bidirectional=False)
                            break
                        except RuntimeError as e:
                            if "path was forced" not in str(e):
                                raise
                            hidden -= 8
                    else:
                        raise RuntimeError(f"{path} {cell} {dtype}: no hidden size near the edge ran")
                    print(f"{path} {cell} {dtype}: hidden {hidden} ok: {fastrnn.last_cuda_path()}",
                          flush=True)
if not emulate:
    torch.cuda.synchronize()
print("sanitize cases done")
