"""The per-call report of `python -m fastrnn.bench --calls`: what one small
call costs, where the fixed cost of a call decides the speed.

- torch.nn's cells against fastrnn's (fused backend), one step, no-grad and
  forward+backward, batch 1 and 8;
- the layers called one step at a time with their state carried (batch 1,
  as a streaming recogniser calls them), no-grad, with ONNX Runtime running
  the exported torch.nn layer (TorchScript exporter, same thread count) as a
  third column where onnxruntime is installed.

Each side is timed in blocks of calls, the sides interleaved block by block
in one process; the figures are medians per call in microseconds, the
ratio is torch.nn's median over fastrnn's, and the spread the largest
interquartile range over median of the row's timings. The no-grad rows run
each block of calls inside one `torch.no_grad()`, as a sampling or
streaming loop does: entering it costs about 1.3 us a call, which ONNX
Runtime's column never pays.
"""

import contextlib
import io
import time
import warnings

import torch
from torch import nn

import fastrnn

from .bench import _repeat, summary

CELL_CLASSES = {"rnn": (nn.RNNCell, fastrnn.RNNCell), "lstm": (nn.LSTMCell, fastrnn.LSTMCell),
                "gru": (nn.GRUCell, fastrnn.GRUCell)}
LAYER_CLASSES = {"rnn": (nn.RNN, fastrnn.RNN), "lstm": (nn.LSTM, fastrnn.LSTM),
                 "gru": (nn.GRU, fastrnn.GRU)}
# (input, hidden, batch) of the cells; (input, hidden) of the streamed layers.
CELL_SHAPES = [(16, 16, 1), (64, 128, 1), (64, 128, 8), (256, 512, 1), (256, 512, 8)]
STREAM_SHAPES = [(64, 64), (64, 128), (64, 256)]


def _interleaved(fns, seconds, blocks=15, grad=True):
    """Per-call medians (us) and spreads (bench.summary's) of each fn, timed
    in `blocks` interleaved blocks that take about seconds / blocks each in
    all; with grad False, all of it inside one torch.no_grad()."""
    with contextlib.nullcontext() if grad else torch.no_grad():
        for fn in fns:
            fn()
        one_call = []
        for fn in fns:
            t0 = time.perf_counter()
            fn()
            one_call.append(max(time.perf_counter() - t0, 1e-7))
        calls = [max(1, int(seconds / blocks / len(fns) / t)) for t in one_call]
        runs = [_repeat(fn, n) for fn, n in zip(fns, calls)]
        samples = [[] for _ in fns]
        for _ in range(blocks):
            for i, run in enumerate(runs):
                t0 = time.perf_counter()
                run()
                samples[i].append((time.perf_counter() - t0) / calls[i])
    return [(s["median_ms"] * 1e3, s["spread"]) for s in map(summary, samples)]


def _state(cell, n, hidden):
    h = torch.randn(n, hidden)
    return (h, torch.randn(n, hidden)) if cell == "lstm" else h


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def cell_rows(cells, seconds):
    rows = []
    for cell in cells:
        ref_cls, our_cls = CELL_CLASSES[cell]
        for C, H, N in CELL_SHAPES:
            torch.manual_seed(0)
            ref = ref_cls(C, H)
            ours = our_cls(C, H, backend="fused")
            ours.load_state_dict(ref.state_dict())
            x, hx = torch.randn(N, C), _state(cell, N, H)
            xg = x.clone().requires_grad_()

            def nograd(m):
                def run():
                    m(x, hx)
                return run

            def fwd_bwd(m):
                def run():
                    _first(m(xg, hx)).sum().backward()
                return run

            (t, ts), (f, fs) = _interleaved([nograd(ref), nograd(ours)], seconds, grad=False)
            (tb, tbs), (fb, fbs) = _interleaved([fwd_bwd(ref), fwd_bwd(ours)], seconds)
            assert ours.last_path == "fused"
            rows.append({"kind": "cell", "cell": cell, "input": C, "hidden": H, "batch": N,
                         "torch_us": t, "fastrnn_us": f, "speedup": t / f,
                         "torch_fb_us": tb, "fastrnn_fb_us": fb, "speedup_fb": tb / fb,
                         "spread": max(ts, fs, tbs, fbs)})
    return rows


def _onnx_session(model, x, hx):
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x, hx), f, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Its threads would otherwise spin after each run, on the cores the
    # interleaved torch calls are timed on.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(f.getvalue(), options, providers=["CPUExecutionProvider"])
    flat = [x, *(hx if isinstance(hx, tuple) else (hx,))]
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), flat)}
    return lambda: session.run(None, feed)


def stream_rows(cells, seconds):
    rows = []
    for cell in cells:
        ref_cls, our_cls = LAYER_CLASSES[cell]
        for C, H in STREAM_SHAPES:
            torch.manual_seed(0)
            ref = ref_cls(C, H).eval()
            ours = our_cls(C, H, backend="fused").eval()
            ours.load_state_dict(ref.state_dict())
            x = torch.randn(1, 1, C)
            h = torch.randn(1, 1, H)
            hx = (h, torch.randn(1, 1, H)) if cell == "lstm" else h

            def call(m):
                def run():
                    m(x, hx)
                return run

            fns = [call(ref), call(ours)]
            onnx = _onnx_session(ref, x, hx)
            if onnx is not None:
                fns.append(onnx)
            timed = _interleaved(fns, seconds, grad=False)
            assert ours.last_path == "fused"
            t, f = timed[0][0], timed[1][0]
            row = {"kind": "stream", "cell": cell, "input": C, "hidden": H, "batch": 1,
                   "torch_us": t, "fastrnn_us": f, "speedup": t / f,
                   "spread": max(s for _, s in timed)}
            if onnx is not None:
                row["onnxruntime_us"] = timed[2][0]
                row["vs_onnxruntime"] = timed[2][0] / f
            rows.append(row)
    return rows


def table(rows):
    lines = ["per call (us, medians)", "", "| call | nn | fastrnn | x | nn f+b | fastrnn f+b | "
             "x f+b | ONNX Runtime | spread |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | "
             "---: | ---: |"]
    for r in rows:
        name = (f"{r['cell'].upper()}Cell {r['input']}, {r['hidden']}, batch {r['batch']}"
                if r["kind"] == "cell" else
                f"{r['cell'].upper()} {r['input']}, {r['hidden']}, one step")
        fb = (f"{r['torch_fb_us']:.0f} | {r['fastrnn_fb_us']:.0f} | {r['speedup_fb']:.2f}"
              if "torch_fb_us" in r else "- | - | -")
        ort = f"{r['onnxruntime_us']:.0f}" if "onnxruntime_us" in r else "-"
        lines.append(f"| {name} | {r['torch_us']:.0f} | {r['fastrnn_us']:.0f} | "
                     f"{r['speedup']:.2f} | {fb} | {ort} | {r['spread']:.0%} |")
    return "\n".join(lines)


def run(cells, seconds=0.3):
    """The rows of the per-call report, CPU tensors, float32."""
    return cell_rows(cells, seconds) + stream_rows(cells, seconds)
