"""No-grad forward calls of the shapes where cuDNN beat the single-kernel
paths on an H200 (docs/h200), one call each, for a profiler:

    ncu --clock-control none --section WarpStateStats ... \\
        python bench/profile_case.py          # on a GPU
    python bench/profile_case.py --emulate    # no GPU: the same calls
                                              # through the emulator, small

On the GPU, in float32 at 512 steps: the persistent path at hidden 64
(RNN batch 8: 1.6 us a step against cuDNN's 0.4; LSTM: 4.5 against 0.5)
and the cluster path at hidden 256 (RNN batch 8: 3.7 against 2.0).
bench/gpu_check.sh runs it under Nsight Compute, the time-loop kernels
only, so that the stall reasons of one launch of each say where a step's
time goes. Prints the path each call took.
"""

import sys

import torch

import fastrnn
from fastrnn.bench import layer_classes

# (cell, hidden, batch, path); input 32.
CASES = (("rnn", 64, 8, "persistent"), ("lstm", 64, 8, "persistent"), ("rnn", 256, 8, "cluster"))


def main(argv):
    emulate = "--emulate" in argv
    device, steps = ("cpu", 4) if emulate else ("cuda", 512)
    torch.manual_seed(0)
    for cell, hidden, batch, path in CASES:
        if emulate:
            hidden = min(hidden, 16)
        m = layer_classes(cell)[1](32, hidden, backend="fused", device=device)
        x = torch.randn(steps, batch, 32, device=device)
        with torch.no_grad(), fastrnn.kernels(cuda_path=path, emulate_cuda=True if emulate else None):
            y, _ = m(x)
            ran = fastrnn.last_cuda_path()
        if not emulate:
            torch.cuda.synchronize()
        if ran != path or not torch.isfinite(y).all():
            print(f"{cell} hidden {hidden} batch {batch}: ran {ran}, expected {path}  FAIL", flush=True)
            return 1
        print(f"{cell} hidden {hidden} batch {batch} steps {steps}: ran {ran}  ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
