"""Is fastrnn correct and faster than nn.RNN here? `python -m fastrnn.bench`.

For every shape it builds nn.RNN and fastrnn.RNN (fused backend) with the
same weights and reports
  - correctness: the largest absolute difference of output, h_n and every
    gradient between the two;
  - time of no-grad forward and of forward+backward: medians over repeated
    calls with the interquartile range, the two sides interleaved call by call
    so that drift of the machine falls on both, after a warm-up, with CUDA
    synchronised around every call;
  - the speed ratio (nn.RNN's median over fastrnn's);
  - memory: the bytes each side keeps for backward (every saved storage
    once) and, on CUDA, the peak of allocated memory over one forward+backward.
It writes a table, a JSON file with every figure and the environment, and a
plot of speed ratio against hidden size.
"""

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}

# The named shapes: (input, hidden, layers, batch, steps). The first is the
# seed notebook's; the others are the sizes the project's speed goals name.
CPU_SHAPES = [(9, 16, 1, 2, 5), (9, 16, 3, 2, 100), (32, 64, 1, 8, 256), (64, 256, 2, 32, 128),
              (256, 1024, 1, 16, 64)]
GPU_SHAPES = [(9, 16, 1, 2, 5), (64, 256, 1, 64, 512), (512, 1024, 1, 64, 512)]
CPU_GRID = dict(hidden=[16, 64, 256, 1024], batch=[1, 8, 64], steps=[128], layers=[1])
GPU_GRID = dict(hidden=[64, 256, 512, 1024], batch=[1, 8, 64], steps=[512], layers=[1])
QUICK_GRID = dict(hidden=[16, 64, 256], batch=[1, 8], steps=[32], layers=[1])


def positive_ints(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m fastrnn.bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="default: cuda when a GPU is present, else cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--cuda-path", choices=["auto", "persistent", "cluster", "grid", "step"],
                   default="auto", help="force the CUDA time loop's path (default: chosen per call); "
                   "shapes the forced path cannot run are skipped")
    p.add_argument("--hidden", type=positive_ints, help="hidden sizes, e.g. 16,64,256")
    p.add_argument("--batch", type=positive_ints, help="batch sizes")
    p.add_argument("--steps", type=positive_ints, help="sequence lengths")
    p.add_argument("--layers", type=positive_ints, help="numbers of layers")
    p.add_argument("--input-size", type=positive_ints, default=[32], help="input features (one value)")
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--no-named", action="store_true", help="skip the named shapes, run the grid only")
    p.add_argument("--quick", action="store_true", help="a small grid that finishes in under a minute on CPU")
    p.add_argument("--min-reps", type=int, default=5, help="timed calls per side at least")
    p.add_argument("--seconds", type=float, default=1.0, help="timing budget per side and mode")
    p.add_argument("--threads", type=int, help="torch.set_num_threads before timing")
    p.add_argument("--json", default="bench-results/bench.json", help="path of the JSON report ('' for none)")
    p.add_argument("--plot", default="bench-results/speedup.png", help="path of the PNG plot ('' for none)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here")
    if args.device == "cpu" and args.cuda_path != "auto":
        p.error("--cuda-path: applies to --device cuda only")
    if args.device == "cpu" and args.dtype in ("float16", "bfloat16"):
        p.error(f"--dtype {args.dtype}: the fused CPU kernel takes float32 and float64")
    if len(args.input_size) != 1:
        p.error("--input-size takes one value")
    if args.min_reps < 1:
        p.error("--min-reps must be at least 1")
    if args.seconds <= 0:
        p.error("--seconds must be positive")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    from . import _ops

    if not _ops.available():
        p.error(f"fastrnn's extension is not built ({_ops.EXTENSION_ERROR}); run `make build`")
    if args.device == "cuda" and not _ops.cuda_built():
        p.error("--device cuda: fastrnn was built without CUDA (rebuild with FASTRNN_CUDA=1)")
    return args


def shapes(args):
    """(input, hidden, layers, batch, steps, in_grid) for every case."""
    gpu = args.device == "cuda"
    grid = dict(QUICK_GRID if args.quick else (GPU_GRID if gpu else CPU_GRID))
    for key in ("hidden", "batch", "steps", "layers"):
        if getattr(args, key):
            grid[key] = getattr(args, key)
    out = []
    explicit = any(getattr(args, k) for k in ("hidden", "batch", "steps", "layers"))
    if not (args.no_named or args.quick or explicit):
        out += [(*s, False) for s in (GPU_SHAPES if gpu else CPU_SHAPES)]
    elif args.quick and not args.no_named:
        out.append((9, 16, 1, 2, 5, False))
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
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return {"median_ms": statistics.median(samples) * 1e3, "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3,
            "reps": len(samples)}


def measure(args, shape):
    import fastrnn

    C, H, L, N, T, _ = shape
    device, dtype = args.device, DTYPES[args.dtype]
    torch.manual_seed(0)
    ref = nn.RNN(C, H, L, bidirectional=args.bidirectional, device=device, dtype=dtype)
    ours = fastrnn.RNN(C, H, L, bidirectional=args.bidirectional, device=device, dtype=dtype,
                       backend="fused")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, N, C, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(T, N, (2 if args.bidirectional else 1) * H, device=device, dtype=dtype)

    def fwd(m):
        def run():
            with torch.no_grad():
                m(x)
        return run

    def fwd_bwd(m):
        def run():
            y, h = m(x)
            torch.autograd.backward([y, h], [gy, torch.ones_like(h)])
        return run

    # Correctness first: the same call on both sides, every gradient.
    results = {}
    for name, m in (("torch", ref), ("fastrnn", ours)):
        x.grad = None
        m.zero_grad(set_to_none=True)
        y, h = m(x)
        torch.autograd.backward([y, h], [gy, torch.ones_like(h)])
        results[name] = [("output", y.detach()), ("h_n", h.detach()), ("grad_input", x.grad.clone())]
        results[name] += [(f"grad_{n}", p.grad.clone()) for n, p in m.named_parameters()]
    assert ours.last_path == "fused"
    from . import _ops

    cuda_path = _ops._C.last_cuda_path() if device == "cuda" else None
    errors = {k: (a - b).abs().max().item() for (k, a), (_, b) in zip(results["torch"], results["fastrnn"])}

    timer = Timer(device)
    row = {"input": C, "hidden": H, "layers": L, "batch": N, "steps": T, "grid": shape[5],
           "bidirectional": args.bidirectional, "dtype": args.dtype, "max_abs_error": errors,
           "cuda_path": cuda_path}
    for mode, make in (("forward", fwd), ("forward_backward", fwd_bwd)):
        sides = {"torch": make(ref), "fastrnn": make(ours)}
        for fn in sides.values():  # warm-up
            fn()
            fn()
        samples = {"torch": [], "fastrnn": []}
        start = time.perf_counter()
        i = 0
        while i < args.min_reps or time.perf_counter() - start < 2 * args.seconds:
            order = ("torch", "fastrnn") if i % 2 == 0 else ("fastrnn", "torch")
            for side in order:
                samples[side].append(timer(sides[side]))
            i += 1
            if i >= 1000:
                break
        stats = {side: summary(s) for side, s in samples.items()}
        stats["speedup"] = stats["torch"]["median_ms"] / stats["fastrnn"]["median_ms"]
        row[mode] = stats
    row["saved_bytes"] = {"torch": saved_bytes(lambda: ref(x)), "fastrnn": saved_bytes(lambda: ours(x))}
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


def environment(args):
    from . import _ops

    env = {"torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "processor": _cpu_name(),
           "threads": torch.get_num_threads(), "device": args.device, "dtype": args.dtype,
           "cpu_isa": _ops._C.cpu_isa(), "cuda": torch.version.cuda}
    if args.device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def table(rows):
    """The report's table; on CUDA it adds the fused forward's time per step
    (per layer), the peak memory of a forward+backward and the path taken."""
    cuda = any(r.get("cuda_path") for r in rows)
    head = (f"{'shape (C,H,L,N,T)':<24}{'max err':>9}  {'fwd torch ms':>13}{'fwd fused ms':>13}{'x':>7}"
            f"  {'f+b torch ms':>13}{'f+b fused ms':>13}{'x':>7}  {'saved MB t/f':>14}"
            + (f"  {'us/step':>8}  {'peak MB t/f':>14}  {'path':<10}" if cuda else ""))
    lines = [head, "-" * len(head)]

    def cell(s):
        return f"{s['median_ms']:.3f}"

    def megabytes(pair):
        return f"{pair['torch'] / 2**20:.1f}/{pair['fastrnn'] / 2**20:.1f}"

    for r in rows:
        shape = f"({r['input']},{r['hidden']},{r['layers']},{r['batch']},{r['steps']})"
        err = max(r["max_abs_error"].values())
        f, fb = r["forward"], r["forward_backward"]
        line = (f"{shape:<24}{err:>9.1e}  {cell(f['torch']):>13}{cell(f['fastrnn']):>13}"
                f"{f['speedup']:>6.1f}x  {cell(fb['torch']):>13}{cell(fb['fastrnn']):>13}"
                f"{fb['speedup']:>6.1f}x  {megabytes(r['saved_bytes']):>14}")
        if cuda:
            per_step = f["fastrnn"]["median_ms"] * 1e3 / (r["steps"] * r["layers"])
            line += f"  {per_step:>8.2f}  {megabytes(r['peak_bytes']):>14}  {r['cuda_path']:<10}"
        lines.append(line)
    return "\n".join(lines)


def plot(rows, path, env):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [r for r in rows if r["grid"]]
    if not grid:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, mode, title in ((axes[0], "forward", "forward (no grad)"),
                            (axes[1], "forward_backward", "forward + backward")):
        for batch in sorted({r["batch"] for r in grid}):
            pts = sorted((r["hidden"], r[mode]["speedup"]) for r in grid if r["batch"] == batch)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"batch {batch}")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("hidden size")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speed-up over nn.RNN (median)")
    axes[1].legend()
    where = env.get("device_name") or env["processor"]
    fig.suptitle(f"fastrnn vs nn.RNN, {env['dtype']}, {where}, {env['threads']} threads")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(args)
    cases = shapes(args)
    print(f"fastrnn.bench: {len(cases)} shapes on {env.get('device_name', env['processor'])}, "
          f"{args.dtype}, torch {env['torch']}, {env['threads']} threads, CPU kernels {env['cpu_isa']}",
          flush=True)
    from tqdm import tqdm

    if args.device == "cuda":
        from . import _ops

        _ops._C.set_cuda_path(args.cuda_path)
    rows = []
    for shape in tqdm(cases, disable=args.no_progress, unit="shape", file=sys.stderr):
        try:
            rows.append(measure(args, shape))
        except RuntimeError as e:
            if "path was forced" not in str(e):
                raise
            print(f"skipped {shape[:5]}: {e}".splitlines()[0], flush=True)
    print(table(rows))
    print("max err: largest |difference| from nn.RNN over output, h_n and every gradient; "
          "times: medians; x: nn.RNN's median over fastrnn's")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": rows}, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot and plot(rows, args.plot, env):
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
