"""One CUDA path forced at the largest shape it takes, checked against torch.nn:

    python bench/gpu_smoke.py PATH            # persistent, cluster, grid or step
    python bench/gpu_smoke.py PATH --emulate  # no GPU: the emulator, on CPU tensors

For each cell (RNN, LSTM, GRU), float32: the persistent path at the largest
hidden size one block holds, a cluster of 8 at its own limit (2 under the emulator), the grid and
the step paths at hidden 1024 (the grid's group size chosen; under the
emulator hidden 256 and small steps and batch). Forward and backward run once each; the
output, final states and every gradient are compared with the torch.nn layer
in float64 on the same weights, by ||fastrnn - torch|| / ||torch||, and the
path that ran must be the one forced. Prints one line per cell; exits 1 on
any mismatch. bench/gpu_check.sh runs each path in its own process under a
timeout, so that a hang in one path costs only its own step.
"""

import sys
import time

import torch

import fastrnn
from fastrnn.bench import layer_classes

PATHS = ("persistent", "cluster", "grid", "step")
TOLERANCE = 1e-4  # float32 sums of 1024 products, over the steps


def largest_hidden(cell, path, blocks, emulate):
    """The largest hidden size (a multiple of 8, at most 1024) the chooser
    gives this path on an H100/H200, forward and backward; the grid and step
    paths at 1024 (256 under the emulator, whose grid at 1024 takes minutes)."""
    if path in ("grid", "step"):
        return 256 if emulate else 1024
    kind = {"rnn": 0, "lstm": 2, "gru": 3}[cell]

    def takes(hidden):
        return all(fastrnn._ops._C.choose_emulated_launch(kind, forward, 8, 8, hidden, hidden, 1, 4, False,
                                                          path, blocks)[2] == ""
                   for forward in (True, False))

    lo, hi = 0, 1032
    while hi - lo > 8:
        mid = (lo + hi) // 16 * 8
        lo, hi = (mid, hi) if takes(mid) else (lo, mid)
    return lo


def outputs(cell, out):
    y, h = out
    return [y, *h] if cell == "lstm" else [y, h]


def check(cell, path, blocks, device, steps, batch):
    hidden = largest_hidden(cell, path, blocks, device == "cpu")
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
    ran = fastrnn.last_cuda_path()
    worst = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(*results))
    finite = all(torch.isfinite(a).all().item() for a in results[1])
    ok = finite and worst < TOLERANCE and ran == path
    return ok, f"{cell:<5} hidden {hidden:>4}  ran {ran:<10} worst relative error {worst:.2e}  " \
               f"{'ok' if ok else 'FAIL'}"


def main(argv):
    if not argv or argv[0] not in PATHS:
        sys.exit(f"usage: python bench/gpu_smoke.py {{{','.join(PATHS)}}} [--emulate]")
    path, emulate = argv[0], "--emulate" in argv
    # A cluster of 8 on the GPU; of 2 under the emulator, whose cluster of 8
    # at hidden 664 takes most of a minute on two cores.
    blocks = (2 if emulate else 8) if path == "cluster" else 0
    device, steps, batch = ("cpu", 3, 2) if emulate else ("cuda", 64, 8)
    failed = False
    with fastrnn.kernels(cuda_path=path, blocks=blocks, emulate_cuda=True if emulate else None):
        for cell in ("rnn", "lstm", "gru"):
            start = time.perf_counter()
            ok, line = check(cell, path, blocks, device, steps, batch)
            print(f"{path:<10} {line}  {time.perf_counter() - start:.1f} s", flush=True)
            failed |= not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
