"""One CUDA path forced at the largest shape it takes, checked against torch.nn:

    python bench/gpu_smoke.py PATH            # persistent, cluster, grid or step
    python bench/gpu_smoke.py PATH --emulate  # no GPU: the emulator, on CPU tensors

For each cell (RNN, LSTM, GRU), float32, the GPU run's shape is the largest
hidden size (at most 1024) that the path chooser, on its H100/H200 model,
launches the forced path for, forward and backward, at 64 steps and batch 8
(a cluster of 8 for the cluster path): the same search for every path and
cell, since each has limits of its own (the LSTM's grid backward stops short
of 1024). Forward and backward run once each; the output, final states and
every gradient are compared with the torch.nn layer in float64 on the same
weights, by ||fastrnn - torch|| / ||torch||, and the paths that ran, forward
and backward, must be the one forced. A cell that fails, or raises, is a
FAIL line, and the next cell still runs.

Under the emulator the same GPU shapes are found and their launches checked
(forward and backward), then the numbers are checked at shapes the emulator
runs in seconds (3 steps, batch 2; the grid and step paths at hidden 256, a
cluster of 2). Prints one line per cell and check; exits 1 on any failure.
bench/gpu_check.sh runs each path in its own process under a timeout, so
that a hang in one path costs only its own step.
"""

import sys
import time

import torch

import fastrnn
from fastrnn.bench import layer_classes
from fastrnn.kernels import CUDA_PATHS

PATHS = CUDA_PATHS[1:]  # every path but "auto"
CELLS = ("rnn", "lstm", "gru")
TOLERANCE = 1e-4  # float32 sums of 1024 products, over the steps
GPU_STEPS, GPU_BATCH = 64, 8
# A cluster of 8 on the GPU; of 2 under the emulator, whose cluster of 8 at
# hidden 664 takes most of a minute on two cores. 0: the chooser picks.
GPU_BLOCKS = {"cluster": 8}
EMULATOR_BLOCKS = {"cluster": 2}


def refusal(cell, path, blocks, hidden, steps, batch):
    """Why the path chooser (H100/H200 model) does not launch `path` for
    this shape, forward or backward; "" when it does, both ways."""
    kind = {"rnn": "rnn_tanh"}.get(cell, cell)
    for forward in (True, False):
        why = fastrnn._ops._C.choose_emulated_launch(kind, forward, steps, batch, hidden, hidden, 1,
                                                     4, False, path, blocks)[2]
        if why:
            return f"{'forward' if forward else 'backward'}: {why}"
    return ""


def largest_hidden(cell, path, blocks, steps, batch, limit=1024):
    """The largest hidden size (a multiple of 8, at most `limit`) whose
    launch the chooser makes for the forced path, both ways; 0 for none."""
    lo, hi = 0, limit + 8
    while hi - lo > 8:
        mid = (lo + hi) // 16 * 8
        lo, hi = (mid, hi) if not refusal(cell, path, blocks, mid, steps, batch) else (lo, mid)
    return lo


def gpu_hidden(cell, path):
    return largest_hidden(cell, path, GPU_BLOCKS.get(path, 0), GPU_STEPS, GPU_BATCH)


def outputs(cell, out):
    y, h = out
    return [y, *h] if cell == "lstm" else [y, h]


def check(cell, path, hidden, device, steps, batch):
    torch.manual_seed(0)
    ref_cls, fused_cls = layer_classes(cell)
    ref = ref_cls(64, hidden, device=device, dtype=torch.float64)
    ours = fused_cls(64, hidden, device=device, backend="fused")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(steps, batch, 64, device=device, dtype=torch.float64)
    results = []
    for m, dtype in ((ref, torch.float64), (ours, torch.float32)):
        xi = x.detach().to(dtype).requires_grad_()
        outs = outputs(cell, m(xi))
        grads = [torch.ones_like(t) * 0.01 for t in outs]
        torch.autograd.backward(outs, grads)
        results.append([t.detach().double() for t in outs] + [xi.grad.double()]
                       + [p.grad.double() for p in m.parameters()])
    # The forward's path on this thread; the backward's wherever autograd ran it.
    ran, ran_backward = fastrnn.last_cuda_path(), fastrnn.last_cuda_path(backward=True)
    worst = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(*results))
    finite = all(torch.isfinite(a).all().item() for a in results[1])
    ok = finite and worst < TOLERANCE and ran == ran_backward == path
    ran = ran if ran == ran_backward else f"{ran}/{ran_backward}"
    return ok, f"{cell:<5} hidden {hidden:>4}  ran {ran:<10} worst relative error {worst:.2e}  " \
               f"{'ok' if ok else 'FAIL'}"


def main(argv):
    if not argv or argv[0] not in PATHS:
        sys.exit(f"usage: python bench/gpu_smoke.py {{{','.join(PATHS)}}} [--emulate]")
    path, emulate = argv[0], "--emulate" in argv
    blocks = (EMULATOR_BLOCKS if emulate else GPU_BLOCKS).get(path, 0)
    device, steps, batch = ("cpu", 3, 2) if emulate else ("cuda", GPU_STEPS, GPU_BATCH)
    failed = False
    with fastrnn.kernels(cuda_path=path, blocks=blocks, emulate_cuda=True if emulate else None):
        for cell in CELLS:
            start = time.perf_counter()
            hidden = gpu_hidden(cell, path)
            if hidden == 0:
                why = refusal(cell, path, GPU_BLOCKS.get(path, 0), 8, GPU_STEPS, GPU_BATCH)
                print(f"{path:<10} {cell:<5} no GPU shape: the chooser refuses even hidden 8 ({why})  FAIL",
                      flush=True)
                failed = True
                continue
            if emulate:
                # The GPU run's very shape, as far as the chooser goes.
                print(f"{path:<10} {cell:<5} GPU shape hidden {hidden} (T {GPU_STEPS}, N {GPU_BATCH}): "
                      "launched forward and backward  ok", flush=True)
                limit = 256 if path in ("grid", "step") else 1024
                hidden = largest_hidden(cell, path, blocks, 8, 8, limit)
            try:
                ok, line = check(cell, path, hidden, device, steps, batch)
            except Exception as exc:  # a raise is this cell's failure, not the run's end
                ok, line = False, f"{cell:<5} hidden {hidden:>4}  raised {type(exc).__name__}: " \
                                  f"{str(exc).splitlines()[0]}  FAIL"
            print(f"{path:<10} {line}  {time.perf_counter() - start:.1f} s", flush=True)
            failed |= not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
