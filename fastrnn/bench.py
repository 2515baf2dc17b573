"""Is fastrnn correct and faster than torch.nn here? `python -m fastrnn.bench`.

For every cell (RNN, LSTM, GRU) and shape it builds the torch.nn layer and
the fastrnn layer (fused backend) with the same weights and reports
  - correctness: the largest absolute difference of output, final states and
    every gradient between the two;
  - time of a no-grad forward and of a forward+backward: medians over
    repeated calls with the interquartile range, the two sides interleaved
    call by call so that drift of the machine falls on both, after a
    warm-up, with CUDA synchronised around every call;
  - the speed ratio (torch.nn's median over fastrnn's) and its range (the
    ratio of the quartiles, worst case to best case);
  - memory: the bytes each side keeps for backward (every saved storage
    once) and, on CUDA, the peak of allocated memory over one forward+backward.
A row whose interquartile range exceeds --noise of its median on either side
is measured again (--retries times), the least noisy measurement kept, and
one that stays noisy is marked in the table and named in a warning.
It writes a table, a JSON file with every figure, the environment, the
fastrnn version, the git commit and the arguments, and a plot of the ratios
against hidden size (needs matplotlib: `pip install fastrnn[bench]`).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from .kernels import CUDA_PATHS

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
CELLS = ("rnn", "lstm", "gru")

# The named shapes, (input, hidden, layers, batch, steps), also the shapes of
# the pytest-benchmark suite (bench/test_speed.py). The first is the seed
# notebook's; the others are the sizes the project's speed goals name.
NAMED_SHAPES = {
    "cpu": [(9, 16, 1, 2, 5), (9, 16, 3, 2, 100), (32, 64, 1, 8, 256), (64, 256, 2, 32, 128),
            (256, 1024, 1, 16, 64)],
    "cuda": [(9, 16, 1, 2, 5), (64, 64, 1, 8, 512), (64, 256, 1, 64, 512), (512, 1024, 1, 64, 512)],
}
GRIDS = {
    "cpu": dict(hidden=[16, 64, 256, 1024], batch=[1, 8, 64], steps=[128], layers=[1]),
    "cuda": dict(hidden=[64, 256, 512, 1024], batch=[1, 8, 64], steps=[512], layers=[1]),
    "quick": dict(hidden=[16, 64, 256], batch=[1, 8], steps=[32], layers=[1]),
}


def named_shapes(device):
    """The named shapes for 'cpu' or 'cuda'."""
    return list(NAMED_SHAPES["cuda" if device == "cuda" else "cpu"])


def layer_classes(cell):
    """(torch.nn class, fastrnn class) of a cell name."""
    import fastrnn

    return {"rnn": (nn.RNN, fastrnn.RNN), "lstm": (nn.LSTM, fastrnn.LSTM),
            "gru": (nn.GRU, fastrnn.GRU)}[cell]


def _ints(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _cells(text):
    values = [v.strip().lower() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in CELLS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"expected cells among {','.join(CELLS)}, got {text!r}")
    return list(dict.fromkeys(values))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m fastrnn.bench", description=__doc__.split("\n")[0])
    p.add_argument("--cell", type=_cells, default=list(CELLS),
                   help="cells to compare, comma-separated (default: rnn,lstm,gru)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="default: cuda when a GPU is present, else cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--cuda-path", choices=list(CUDA_PATHS),
                   default="auto", help="force the CUDA time loop's path (default: chosen per call); "
                   "shapes the forced path cannot run are skipped")
    p.add_argument("--hidden", type=_ints, help="hidden sizes, e.g. 16,64,256")
    p.add_argument("--batch", type=_ints, help="batch sizes")
    p.add_argument("--steps", type=_ints, help="sequence lengths")
    p.add_argument("--layers", type=_ints, help="numbers of layers")
    p.add_argument("--input-size", type=_ints, default=[32], help="input features (one value)")
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--no-named", action="store_true", help="skip the named shapes, run the grid only")
    p.add_argument("--quick", action="store_true",
                   help="a small grid, shorter timing (--seconds 0.2, --retries 1 unless given): "
                   "about a minute on a quiet 2-core CPU")
    p.add_argument("--min-reps", type=int, default=5, help="timed calls per side at least")
    p.add_argument("--seconds", type=float, default=None,
                   help="timing budget per side and mode (default 1.0, 0.2 with --quick)")
    p.add_argument("--noise", type=float, default=0.2,
                   help="interquartile range over median above which a row is measured again "
                   "(default 0.2)")
    p.add_argument("--retries", type=int, default=None,
                   help="re-measurements of a noisy row (default 2, 1 with --quick)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads before timing")
    p.add_argument("--no-tf32", action="store_true",
                   help="CUDA: float32 products in float32 on both sides (torch.backends.cudnn."
                        "allow_tf32 and cuda.matmul.allow_tf32 off; cuDNN may use TF32 by default)")
    p.add_argument("--roofline", action="store_true",
                   help="CPU: measure this machine's float32 multiply-add peak with a probe of "
                   "twelve FMA chains before and after the rows, and report each side's "
                   "multiply-adds a second as a percentage of it (CPU runs only; make bench "
                   "passes it)")
    p.add_argument("--calls", action="store_true",
                   help="CPU: after the rows, what one small call costs: torch.nn's cells against "
                   "fastrnn's, and the layers called one step at a time with ONNX Runtime as a "
                   "third column (make bench passes it; see fastrnn/bench_calls.py)")
    p.add_argument("--json", default="bench-results/bench.json", help="path of the JSON report ('' for none)")
    p.add_argument("--plot", default="bench-results/speedup.png",
                   help="path of the PNG plot ('' for none; needs matplotlib)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--emulate-cuda", action="store_true",
                   help="the CUDA kernels through their CPU emulator, on CPU tensors: checks the "
                   "benchmark's and bench/gpu_check.sh's logic without a GPU (the times mean nothing)")
    args = p.parse_args(argv)
    args.argv = list(argv)
    if args.seconds is None:
        args.seconds = 0.2 if args.quick else 1.0
    if args.retries is None:
        args.retries = 1 if args.quick else 2
    if args.emulate_cuda:
        if args.device == "cuda":
            p.error("--emulate-cuda: runs on CPU tensors, not with --device cuda")
        args.device = "cpu"
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here")
    if args.device == "cpu" and args.cuda_path != "auto" and not args.emulate_cuda:
        p.error("--cuda-path: applies to --device cuda (or --emulate-cuda) only")
    if len(args.input_size) != 1:
        p.error("--input-size takes one value")
    if args.min_reps < 1:
        p.error("--min-reps must be at least 1")
    if args.seconds <= 0:
        p.error("--seconds must be positive")
    if args.noise <= 0:
        p.error("--noise must be positive")
    if args.retries < 0:
        p.error("--retries must be at least 0")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    # The roofline is the CPU's: on CUDA (or the emulator) it is left out.
    args.roofline = args.roofline and args.device == "cpu" and not args.emulate_cuda
    from . import _ops

    if not _ops.available():
        p.error(f"fastrnn's extension is not available ({_ops.extension_error()}); "
                "build it with `make build` or `pip install --no-build-isolation .`")
    if (args.device == "cuda" or args.emulate_cuda) and not _ops.cuda_built():
        p.error("--device cuda, --emulate-cuda: fastrnn was built without CUDA (rebuild with FASTRNN_CUDA=1)")
    return args


def shapes(args):
    """(input, hidden, layers, batch, steps, in_grid) for every case."""
    grid = dict(GRIDS["quick" if args.quick else args.device])
    explicit = False
    for key in ("hidden", "batch", "steps", "layers"):
        if getattr(args, key):
            grid[key] = getattr(args, key)
            explicit = True
    out = []
    if not (args.no_named or args.quick or explicit):
        out += [(*s, False) for s in named_shapes(args.device)]
    elif args.quick and not args.no_named:
        out.append((*named_shapes(args.device)[0], False))
    for layers in grid["layers"]:
        for steps in grid["steps"]:
            for hidden in grid["hidden"]:
                for batch in grid["batch"]:
                    out.append((args.input_size[0], hidden, layers, batch, steps, True))
    return out


class Timer:
    def __init__(self, device):
        self.cuda = device == "cuda"

    def __call__(self, fn):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def saved_bytes(fn):
    """Bytes that autograd keeps alive for backward after fn(): the storages of
    every tensor it saves, each storage counted once (weights included)."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def summary(samples):
    """Median and quartiles (ms) of timings in seconds, and the interquartile
    range relative to the median."""
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    median = statistics.median(samples)
    return {"median_ms": median * 1e3, "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3,
            "spread": (q[2] - q[0]) / median if median > 0 else 0.0, "reps": len(samples)}


def compare(torch_samples, fused_samples):
    """The statistics of one mode: each side's summary, the ratio of medians
    and its range from the quartiles (torch's Q1 over fastrnn's Q3 to
    torch's Q3 over fastrnn's Q1)."""
    t, f = summary(torch_samples), summary(fused_samples)
    return {"torch": t, "fastrnn": f, "speedup": t["median_ms"] / f["median_ms"],
            "speedup_low": t["q1_ms"] / f["q3_ms"], "speedup_high": t["q3_ms"] / f["q1_ms"]}


BLOCK_S = 0.005


def _repeat(fn, number):
    if number == 1:
        return fn

    def run():
        for _ in range(number):
            fn()
    return run


def _spread(row):
    return max(row[mode][side]["spread"] for mode in ("forward", "forward_backward")
               for side in ("torch", "fastrnn"))


def _outputs(cell, out):
    """[output, final state(s)] of a layer's return value."""
    y, h = out
    return [y, *h] if cell == "lstm" else [y, h]


def measure(args, cell, shape):
    import fastrnn

    C, H, L, N, T, _ = shape
    device, dtype = args.device, DTYPES[args.dtype]
    torch.manual_seed(0)
    ref_cls, fused_cls = layer_classes(cell)
    ref = ref_cls(C, H, L, bidirectional=args.bidirectional, device=device, dtype=dtype)
    ours = fused_cls(C, H, L, bidirectional=args.bidirectional, device=device, dtype=dtype,
                     backend="fused")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, N, C, device=device, dtype=dtype, requires_grad=True)
    probe = _outputs(cell, ref(x))
    grads = [torch.randn_like(t) for t in probe]

    def fwd(m):
        def run():
            with torch.no_grad():
                m(x)
        return run

    def fwd_bwd(m):
        def run():
            torch.autograd.backward(_outputs(cell, m(x)), grads)
        return run

    # Correctness first: the same call on both sides, every gradient.
    results = {}
    names = ["output", "h_n", "c_n"] if cell == "lstm" else ["output", "h_n"]
    for side, m in (("torch", ref), ("fastrnn", ours)):
        x.grad = None
        m.zero_grad(set_to_none=True)
        outs = _outputs(cell, m(x))
        torch.autograd.backward(outs, grads)
        results[side] = [(n, t.detach()) for n, t in zip(names, outs)] + [("grad_input", x.grad.clone())]
        results[side] += [(f"grad_{n}", p.grad.clone()) for n, p in m.named_parameters()]
    if ours.last_path != "fused":
        raise RuntimeError(f"fastrnn.{cell.upper()} ran {ours.last_path!r}, not the fused kernel")
    cuda_path = fastrnn.last_cuda_path() if device == "cuda" or args.emulate_cuda else None
    errors = {k: (a.double() - b.double()).abs().max().item()
              for (k, a), (_, b) in zip(results["torch"], results["fastrnn"])}

    row = {"cell": cell, "input": C, "hidden": H, "layers": L, "batch": N, "steps": T, "grid": shape[5],
           "bidirectional": args.bidirectional, "dtype": args.dtype, "max_abs_error": errors,
           "cuda_path": cuda_path}
    timer = Timer(device)
    best = None
    for attempt in range(args.retries + 1):
        timed = {}
        for mode, make in (("forward", fwd), ("forward_backward", fwd_bwd)):
            sides = {"torch": make(ref), "fastrnn": make(ours)}
            for fn in sides.values():  # warm-up
                fn()
                fn()
            # Calls shorter than BLOCK_S are timed in blocks of several, a
            # sample being a block's time over its calls (as
            # torch.utils.benchmark's blocked_autorange does): a timer's and
            # the scheduler's jitter then weigh on no sample alone.
            number = {side: max(1, min(1000, int(BLOCK_S / max(timer(fn), 1e-7))))
                      for side, fn in sides.items()}
            sides = {side: _repeat(fn, number[side]) for side, fn in sides.items()}
            samples = {"torch": [], "fastrnn": []}
            start = time.perf_counter()
            i = 0
            while i < args.min_reps or time.perf_counter() - start < 2 * args.seconds:
                order = ("torch", "fastrnn") if i % 2 == 0 else ("fastrnn", "torch")
                for side in order:
                    samples[side].append(timer(sides[side]) / number[side])
                i += 1
                if i >= 1000:
                    break
            timed[mode] = compare(samples["torch"], samples["fastrnn"])
        if best is None or _spread(timed) < _spread(best):
            best = timed
        if _spread(best) <= args.noise:
            break
    row.update(best)
    row["measurements"] = attempt + 1
    row["noisy"] = _spread(best) > args.noise
    row["saved_bytes"] = {"torch": saved_bytes(lambda: ref(x)), "fastrnn": saved_bytes(lambda: ours(x))}
    if args.emulate_cuda:
        row["peak_bytes"] = {"torch": 0, "fastrnn": 0}  # no device memory to count
    if device == "cuda":
        peaks = {}
        for side, m in (("torch", ref), ("fastrnn", ours)):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fwd_bwd(m)()
            torch.cuda.synchronize()
            peaks[side] = torch.cuda.max_memory_allocated() - base
        row["peak_bytes"] = peaks
    return row


def git_commit():
    """The commit of the checkout this package runs from ('+dirty' with
    uncommitted changes to tracked files), or None outside one."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def environment(args):
    import fastrnn

    env = {"fastrnn": fastrnn.__version__, "git_commit": git_commit(),
           "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "processor": _cpu_name(),
           "threads": torch.get_num_threads(), "device": args.device, "dtype": args.dtype,
           "cpu_isa": fastrnn.cpu_isa(), "cuda": torch.version.cuda,
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if args.device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
        env["cudnn"] = torch.backends.cudnn.version()
        # Whether torch.nn's float32 layers (cuDNN) may use TF32 tensor
        # cores, and whether fastrnn's GEMMs (cuBLAS through ATen) may.
        env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        env["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return env


def wait_policy_warning(env):
    """A warning where OpenMP's threads sleep between parallel regions on a
    CPU run of more than one thread, or None. torch.nn's CPU layers enter a
    parallel region for every op, fastrnn's kernels one a call, so a
    sleeping team costs torch.nn's side several times what it costs ours:
    on an AMD EPYC of AVX2 alone, two threads, input 32, batch 64, 128
    steps, nn.RNN 64's forward ran 7.5x as long with OMP_WAIT_POLICY=PASSIVE
    (25.5 ms against 3.4) and fastrnn's 1.8x (1.70 against 0.94)."""
    policy = (env.get("omp_wait_policy") or "").strip().lower()
    if env["device"] != "cpu" or env["threads"] < 2 or policy != "passive":
        return None
    return (f"warning: OMP_WAIT_POLICY={env['omp_wait_policy']}: OpenMP's threads sleep between "
            "parallel regions, which slows torch.nn's CPU layers (a region for every op) several "
            "times more than fastrnn's (one a call); unset it for ratios that mean something")


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


GATES = {"rnn": 1, "lstm": 4, "gru": 3}


def forward_macs(cell, C, H, L, N, T, D):
    """The multiply-adds of a forward: per layer, direction, step and row,
    G*H outputs of the input and hidden-state products (C or D*H inputs,
    and H)."""
    return sum(D * T * N * GATES[cell] * H * ((C if layer == 0 else D * H) + H)
               for layer in range(L))


def fma_peak(threads):
    """This machine's float32 multiply-add rate now, lane FMAs a second, on
    `threads` threads with the kernels' instruction set (best of three)."""
    from . import _ops

    return _ops._C.cpu_fma_rate(0.1, threads, 3)


def add_roofline(rows, peak):
    """Each row's multiply-adds a second on each side, and the percentage of
    `peak` (lane FMAs a second): a forward+backward counts three times the
    forward's multiply-adds (the backward's products are twice the
    forward's), the usual count."""
    for r in rows:
        D = 2 if r.get("bidirectional") else 1
        macs = forward_macs(r["cell"], r["input"], r["hidden"], r["layers"], r["batch"],
                            r["steps"], D)
        r["roofline"] = {"forward_macs": macs, "peak_gmacs": peak / 1e9}
        for mode, count in (("forward", macs), ("forward_backward", 3 * macs)):
            rates = {side: count / (r[mode][side]["median_ms"] * 1e-3) for side in ("torch", "fastrnn")}
            r["roofline"][mode] = {side: {"gmacs": rate / 1e9, "percent_of_peak": 100 * rate / peak}
                                   for side, rate in rates.items()}


def table(rows, noise=0.2):
    """The report's table. `spread`: the largest interquartile range over
    median of the row's four timings; `~` marks a row above `noise` after
    its re-measurements. On CUDA it adds the fused forward's time per step
    (per layer), the peak memory of a forward+backward and the path taken."""
    cuda = any(r.get("cuda_path") for r in rows)
    roof = bool(rows) and all("roofline" in r for r in rows)
    head = (f"{'cell (C,H,L,N,T)':<26}{'max err':>9}  {'fwd torch ms':>13}{'fwd fused ms':>13}{'x':>8}"
            f"  {'f+b torch ms':>13}{'f+b fused ms':>13}{'x':>8}{'spread':>8}  {'saved MB t/f':>14}"
            + (f"  {'us/step':>8}  {'peak MB t/f':>14}  {'path':<10}" if cuda else "")
            + (f"  {'fwd %pk t/f':>12}  {'f+b %pk t/f':>12}" if roof else ""))
    lines = [head, "-" * len(head)]

    def cell(s):
        return f"{s['median_ms']:.3f}"

    def megabytes(pair):
        return f"{pair['torch'] / 2**20:.1f}/{pair['fastrnn'] / 2**20:.1f}"

    for r in rows:
        shape = f"{r.get('cell', 'rnn')} ({r['input']},{r['hidden']},{r['layers']},{r['batch']},{r['steps']})"
        err = max(r["max_abs_error"].values())
        f, fb = r["forward"], r["forward_backward"]
        spread = _spread(r)
        mark = "~" if spread > noise else " "
        line = (f"{shape:<26}{err:>9.1e}  {cell(f['torch']):>13}{cell(f['fastrnn']):>13}"
                f"{f['speedup']:>6.1f}x{mark}  {cell(fb['torch']):>13}{cell(fb['fastrnn']):>13}"
                f"{fb['speedup']:>6.1f}x{mark}{spread:>7.0%}  {megabytes(r['saved_bytes']):>14}")
        if cuda:
            per_step = f["fastrnn"]["median_ms"] * 1e3 / (r["steps"] * r["layers"])
            line += f"  {per_step:>8.2f}  {megabytes(r['peak_bytes']):>14}  {r['cuda_path']:<10}"
        if roof:
            pct = [f"{r['roofline'][m]['torch']['percent_of_peak']:.0f}/"
                   f"{r['roofline'][m]['fastrnn']['percent_of_peak']:.0f}"
                   for m in ("forward", "forward_backward")]
            line += f"  {pct[0]:>12}  {pct[1]:>12}"
        lines.append(line)
    return "\n".join(lines)


def noise_warning(rows, noise):
    """A warning naming the rows whose spread stayed above `noise`, or None."""
    noisy = [r for r in rows if _spread(r) > noise]
    if not noisy:
        return None
    names = ", ".join(f"{r.get('cell', 'rnn')} ({r['input']},{r['hidden']},{r['layers']},{r['batch']},"
                      f"{r['steps']}) {_spread(r):.0%}" for r in noisy)
    return (f"warning: {len(noisy)} of {len(rows)} rows (marked ~) kept an interquartile range above "
            f"{noise:.0%} of the median after re-measuring: {names}. The machine was busy; their "
            "ratios are uncertain (the JSON has each ratio's range). Re-run them alone, e.g. with "
            "--hidden/--batch/--steps.")


def plot(rows, path, env, noise=0.2):
    """Writes the plot of :func:`figure` to ``path``; False when there is no
    grid row to plot."""
    fig = figure(rows, env, noise)
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def figure(rows, env, noise=0.2):
    """Speed-up against hidden size, one panel per cell and mode, a line per
    batch size, error bars from the quartiles, noisy rows ringed and marked
    ~ as in the table; None when there is no grid row to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter

    grid = [r for r in rows if r["grid"]]
    if not grid:
        return None
    cells = [c for c in CELLS if any(r.get("cell", "rnn") == c for r in grid)]
    fig, axes = plt.subplots(2, len(cells), figsize=(4.6 * len(cells) + 1, 7.6), squeeze=False,
                             sharey=True)
    hidden = sorted({r["hidden"] for r in grid})
    # 1-2-5 ticks over every ratio's range, the highest included: no point
    # sits past the last labelled tick.
    lows = [r[m]["speedup_low"] for r in grid for m in ("forward", "forward_backward")]
    highs = [r[m]["speedup_high"] for r in grid for m in ("forward", "forward_backward")]
    yticks = [k * 10.0 ** e for e in range(-3, 6) for k in (1, 2, 5)]
    yticks = [t for t in yticks if min(lows + [1.0]) / 2.5 <= t <= max(highs + [1.0]) * 2.5]
    flagged = [[False] * len(cells) for _ in range(2)]
    multi = len({(r["steps"], r["layers"]) for r in grid}) > 1
    for col, cell in enumerate(cells):
        for row_i, (mode, title) in enumerate((("forward", "forward (no grad)"),
                                               ("forward_backward", "forward + backward"))):
            ax = axes[row_i][col]
            series = sorted({(r["batch"], r["steps"], r["layers"]) for r in grid if r.get("cell", "rnn") == cell})
            for batch, steps, layers in series:
                pts = sorted((r["hidden"], r[mode], r.get("noisy", False)) for r in grid
                             if r.get("cell", "rnn") == cell
                             and (r["batch"], r["steps"], r["layers"]) == (batch, steps, layers))
                xs = [p[0] for p in pts]
                ys = [p[1]["speedup"] for p in pts]
                err = [[y - p[1]["speedup_low"] for y, p in zip(ys, pts)],
                       [p[1]["speedup_high"] - y for y, p in zip(ys, pts)]]
                label = f"batch {batch}" + (f", T {steps}, L {layers}" if multi else "")
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
                noisy = [(x, y) for x, y, p in zip(xs, ys, pts) if p[2]]
                if noisy:
                    # Marked as the table marks them: their ratios are uncertain.
                    ax.scatter([p[0] for p in noisy], [p[1] for p in noisy], s=160,
                               facecolors="none", edgecolors="red", linewidths=1.5, zorder=5,
                               label=None if flagged[row_i][col] else "~ noisy (IQR > "
                               f"{noise:.0%})")
                    for x, y in noisy:
                        ax.annotate("~", (x, y), textcoords="offset points", xytext=(7, 5),
                                    color="red", fontsize=12, fontweight="bold")
                    flagged[row_i][col] = True
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(hidden)
            ax.set_xticklabels([str(h) for h in hidden])
            ax.minorticks_off()
            ax.yaxis.set_major_locator(FixedLocator(yticks))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.set_xlabel("hidden size")
            ax.set_title(f"{cell.upper()}: {title}")
            ax.grid(True, which="major", alpha=0.3)
        axes[0][col].legend(fontsize=8)
        if flagged[1][col]:
            axes[1][col].legend(fontsize=8)
    for row_i in range(2):
        axes[row_i][0].set_ylabel("speed-up over torch.nn (median, IQR bars)")
    where = env.get("device_name") or env["processor"]
    steps = ",".join(str(s) for s in sorted({r["steps"] for r in grid}))
    inputs = ",".join(str(c) for c in sorted({r["input"] for r in grid}))
    fig.suptitle(f"fastrnn {env['fastrnn']} vs torch.nn, {env['dtype']}, {steps} steps, input size "
                 f"{inputs}\n{where}, {env['threads']} threads")
    fig.tight_layout()
    return fig


def _progress(items, disable, total):
    """tqdm's progress bar when tqdm is installed, else a line per item."""
    if disable:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        def lines():
            for i, item in enumerate(items):
                print(f"[{i + 1}/{total}] {item[0]} {item[1][:5]}", file=sys.stderr, flush=True)
                yield item
        return lines()
    return tqdm(items, unit="shape", file=sys.stderr, total=total)


def write_json(args, env, rows, complete, calls=None):
    """The JSON report of the rows so far (none without --json), written
    whole to a temporary file and renamed over the report, so that a reader
    never sees half a file; `complete` False while rows are to come."""
    if not args.json:
        return False
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    arguments = {k: v for k, v in vars(args).items() if k != "argv"}
    tmp = f"{args.json}.tmp"
    with open(tmp, "w") as f:
        json.dump({"fastrnn": env["fastrnn"], "git_commit": env["git_commit"],
                   "timestamp": env["timestamp"], "argv": args.argv, "arguments": arguments,
                   "environment": env, "complete": complete, "results": rows,
                   "calls": calls or []}, f, indent=1)
    os.replace(tmp, args.json)
    return True


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    env = environment(args)
    cases = [(cell, shape) for cell in args.cell for shape in shapes(args)]
    if args.emulate_cuda:
        print("fastrnn.bench: --emulate-cuda: the CUDA kernels' emulator on CPU tensors; "
              "the times mean nothing", flush=True)
    print(f"fastrnn.bench: {len(cases)} cases ({','.join(args.cell)}) on "
          f"{env.get('device_name', env['processor'])}, {args.dtype}, fastrnn {env['fastrnn']}, "
          f"torch {env['torch']}, {env['threads']} threads, CPU kernels {env['cpu_isa']}", flush=True)
    waits = wait_policy_warning(env)
    if waits:
        print(waits, flush=True)
    import fastrnn

    rows = []
    if args.roofline:
        env["fma_peak_gflops_before"] = fma_peak(env["threads"]) / 1e9
    cuda = args.device == "cuda" or args.emulate_cuda
    with fastrnn.kernels(cuda_path=args.cuda_path if cuda else None,
                         emulate_cuda=True if args.emulate_cuda else None):
        for cell, shape in _progress(cases, args.no_progress, len(cases)):
            try:
                rows.append(measure(args, cell, shape))
            except RuntimeError as e:
                if "path was forced" not in str(e):
                    raise
                print(f"skipped {cell} {shape[:5]}: {e}".splitlines()[0], flush=True)
                continue
            # Row by row: a run cut short (a time limit, a signal) leaves
            # every row measured so far, marked incomplete.
            write_json(args, env, rows, complete=False)
    if args.roofline:
        # The probe before and after the rows, the higher taken: the rows'
        # percentages are of the same run's peak, on a machine whose rate
        # moves with its load.
        env["fma_peak_gflops_after"] = fma_peak(env["threads"]) / 1e9
        peak = max(env["fma_peak_gflops_before"], env["fma_peak_gflops_after"]) * 1e9
        add_roofline(rows, peak)
        print(f"roofline: float32 multiply-add peak {peak / 1e9:.0f} GFMA/s on {env['threads']} "
              f"thread(s), {env['cpu_isa']} (probe before the rows "
              f"{env['fma_peak_gflops_before']:.0f}, after {env['fma_peak_gflops_after']:.0f}); "
              "%pk: each side's multiply-adds a second as a percentage of it (forward+backward "
              "counted as three forwards)")
        write_json(args, env, rows, complete=False)
    print(table(rows, args.noise))
    print("max err: largest |difference| from torch.nn over the output, final states and every "
          "gradient; times: medians; x: torch.nn's median over fastrnn's; spread: the largest "
          "interquartile range over median of the row's timings")
    warning = noise_warning(rows, args.noise)
    if warning:
        print(warning, flush=True)
    calls = None
    if args.calls and not cuda:
        from . import bench_calls

        write_json(args, env, rows, complete=False)
        calls = bench_calls.run(args.cell, seconds=min(args.seconds, 1.0))
        print(bench_calls.table(calls))
        print("per call: medians of interleaved blocks of calls, CPU, float32; x: torch.nn's "
              "median over fastrnn's (fused); cells one step, no-grad, then forward+backward; "
              "layers one step of batch 1 with the state carried, no-grad, and ONNX Runtime "
              "running the exported torch.nn layer on the same threads")
    if write_json(args, env, rows, complete=True, calls=calls):
        print(f"wrote {args.json}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("no plot: matplotlib is not installed (pip install matplotlib, or fastrnn[bench])")
        else:
            if plot(rows, args.plot, env, args.noise):
                print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
