"""The benchmark report (`make bench`): a tiny run writes a table, JSON and
plot whose figures are consistent, noisy rows are measured again and named,
the optional dependencies are optional, and bad options end with exit
status 2."""

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastrnn
from fastrnn import _ops, bench

pytestmark = pytest.mark.skipif(not _ops.available(), reason="needs the extension")

TINY = ["--device", "cpu", "--hidden", "8", "--batch", "1,3", "--steps", "4", "--seconds", "0.01",
        "--min-reps", "3", "--no-progress"]


def test_tiny_report(tmp_path, capsys):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    status = bench.main(TINY + ["--json", str(out_json), "--plot", str(out_png)])
    assert status == 0
    report = json.loads(out_json.read_text())
    rows = report["results"]
    assert [(r["cell"], r["hidden"], r["batch"], r["steps"]) for r in rows] == [
        (c, 8, n, 4) for c in ("rnn", "lstm", "gru") for n in (1, 3)]
    for r in rows:
        assert r["cuda_path"] is None
        assert max(r["max_abs_error"].values()) < 1e-5
        states = {"h_n", "c_n"} if r["cell"] == "lstm" else {"h_n"}
        assert set(r["max_abs_error"]) >= {"output", "grad_input", "grad_weight_hh_l0"} | states
        for mode in ("forward", "forward_backward"):
            t, f = r[mode]["torch"], r[mode]["fastrnn"]
            assert t["reps"] >= 3 and f["reps"] >= 3
            assert t["q1_ms"] <= t["median_ms"] <= t["q3_ms"]
            assert r[mode]["speedup"] == pytest.approx(t["median_ms"] / f["median_ms"])
            assert r[mode]["speedup_low"] <= r[mode]["speedup"] <= r[mode]["speedup_high"]
        assert 1 <= r["measurements"] <= 3
        assert r["noisy"] == (bench._spread(r) > 0.2)
    assert report["fastrnn"] == fastrnn.__version__ and report["complete"] is True
    assert report["argv"] == TINY + ["--json", str(out_json), "--plot", str(out_png)]
    assert report["arguments"]["cell"] == ["rnn", "lstm", "gru"]
    assert report["timestamp"].endswith("+00:00")
    assert report["git_commit"] is None or len(report["git_commit"].split("+")[0]) == 40
    assert report["environment"]["device"] == "cpu"
    assert out_png.stat().st_size > 0
    out = capsys.readouterr().out
    assert "rnn (32,8,1,3,4)" in out and "lstm (32,8,1,1,4)" in out and "gru (32,8,1,3,4)" in out


def test_one_cell_and_no_optional_dependencies(tmp_path, capsys, monkeypatch):
    """Without tqdm and matplotlib the report still runs: progress as lines,
    no plot and a line saying why."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    argv = [a for a in TINY if a != "--no-progress"] + ["--cell", "gru", "--json", "",
                                                          "--plot", str(tmp_path / "p.png")]
    assert bench.main(argv) == 0
    out, err = capsys.readouterr()
    assert "[2/2] gru" in err
    assert "no plot: matplotlib is not installed" in out
    assert "gru (32,8,1,1,4)" in out and "rnn (" not in out
    assert not (tmp_path / "p.png").exists()


def _row(cell, spread_torch, spread_fused=0.05):
    def side(spread):
        return {"median_ms": 1.0, "q1_ms": 1.0 - spread / 2, "q3_ms": 1.0 + spread / 2, "spread": spread}
    mode = {"torch": side(spread_torch), "fastrnn": side(spread_fused), "speedup": 1.0}
    return {"cell": cell, "input": 4, "hidden": 8, "layers": 1, "batch": 2, "steps": 3,
            "max_abs_error": {"output": 0.0}, "forward": mode, "forward_backward": mode,
            "saved_bytes": {"torch": 0, "fastrnn": 0}}


def test_noisy_rows_are_marked_and_named():
    """A row whose interquartile range is above --noise of its median on
    either side is marked ~ in the table and named in the warning; a quiet
    one is neither."""
    rows = [_row("rnn", 0.05), _row("lstm", 0.45), _row("gru", 0.05, 0.3)]
    lines = bench.table(rows, 0.2).splitlines()[2:]
    assert ["~" in line for line in lines] == [False, True, True]
    assert lines[1].split()[-2] == "45%"
    warning = bench.noise_warning(rows, 0.2)
    assert "2 of 3 rows" in warning and "lstm (4,8,1,2,3) 45%" in warning and "gru (4,8,1,2,3) 30%" in warning
    assert "rnn (" not in warning
    assert bench.noise_warning(rows[:1], 0.2) is None


def test_compare_gives_the_ratio_and_its_quartile_range():
    stats = bench.compare([0.9, 1.0, 1.1, 1.0, 1.0], [0.45, 0.5, 0.55, 0.5, 0.5])
    assert stats["speedup"] == pytest.approx(2.0)
    assert stats["speedup_low"] == pytest.approx(stats["torch"]["q1_ms"] / stats["fastrnn"]["q3_ms"])
    assert stats["speedup_high"] == pytest.approx(stats["torch"]["q3_ms"] / stats["fastrnn"]["q1_ms"])
    assert stats["torch"]["spread"] == pytest.approx((stats["torch"]["q3_ms"] - stats["torch"]["q1_ms"]) / 1e3)


def test_noisy_measurement_is_repeated(monkeypatch):
    """measure() measures again while the spread stays above --noise, up to
    --retries more times, and keeps the quietest measurement."""
    spreads = iter([0.9, 0.5, 0.1])
    calls = []

    def fake_compare(t, f):
        calls.append(1)
        s = next(spreads) if len(calls) % 2 else 0.0
        side = {"median_ms": 1.0, "q1_ms": 1.0, "q3_ms": 1.0, "spread": s, "reps": 3}
        return {"torch": side, "fastrnn": dict(side, spread=0.0), "speedup": 1.0, "speedup_low": 1.0,
                "speedup_high": 1.0}

    monkeypatch.setattr(bench, "compare", fake_compare)
    args = bench.parse_args(TINY + ["--retries", "2", "--cell", "rnn"])
    row = bench.measure(args, "rnn", (4, 8, 1, 2, 3, True))
    assert row["measurements"] == 3 and not row["noisy"]
    assert bench._spread(row) == 0.1
    spreads = iter([0.9, 0.5, 0.7])
    calls.clear()
    row = bench.measure(bench.parse_args(TINY + ["--retries", "1"]), "rnn", (4, 8, 1, 2, 3, True))
    assert row["measurements"] == 2 and row["noisy"] and bench._spread(row) == 0.5


def test_shape_table_is_shared_with_the_pytest_suite():
    sys.path.insert(0, "bench")
    try:
        import test_speed
    finally:
        sys.path.remove("bench")
    assert test_speed.SHAPES == bench.named_shapes(test_speed.DEVICE)


@pytest.mark.skipif(not _ops.cuda_built(), reason="needs the CUDA build")
def test_emulated_cuda_report_names_the_forced_path(tmp_path, capsys):
    out_json = tmp_path / "e.json"
    argv = ["--emulate-cuda", "--cuda-path", "grid", "--cell", "rnn", "--hidden", "8", "--batch", "2",
            "--steps", "3", "--seconds", "0.01", "--min-reps", "1", "--retries", "0", "--no-progress",
            "--json", str(out_json), "--plot", ""]
    assert bench.main(argv) == 0
    (row,) = json.loads(out_json.read_text())["results"]
    assert row["cuda_path"] == "grid" and max(row["max_abs_error"].values()) < 1e-5
    assert "the times mean nothing" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--hidden", "0"], "expected comma-separated positive integers"),
    (["--cell", "lstm,elman"], "expected cells among rnn,lstm,gru"),
    (["--device", "cpu", "--cuda-path", "grid"], "--cuda-path: applies to --device cuda (or --emulate-cuda) only"),
    (["--seconds", "0"], "--seconds must be positive"),
    (["--noise", "0"], "--noise must be positive"),
    (["--retries", "-1"], "--retries must be at least 0"),
])
def test_bad_options_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_table_on_cuda_adds_time_per_step_peak_memory_and_path():
    """The table's own arithmetic, on a made-up CUDA row: 0.4 ms for 512
    steps of one layer is 0.78 us a step."""
    row = {"cell": "lstm", "input": 64, "hidden": 256, "layers": 1, "batch": 64, "steps": 512,
           "max_abs_error": {"output": 1e-6},
           "forward": {"torch": {"median_ms": 2.0, "spread": 0.01}, "fastrnn": {"median_ms": 0.4, "spread": 0.02},
                       "speedup": 5.0},
           "forward_backward": {"torch": {"median_ms": 6.0, "spread": 0.01},
                                "fastrnn": {"median_ms": 1.5, "spread": 0.01}, "speedup": 4.0},
           "saved_bytes": {"torch": 2**22, "fastrnn": 2**21},
           "peak_bytes": {"torch": 2**25, "fastrnn": 2**24}, "cuda_path": "cluster"}
    head, _, line = bench.table([row]).splitlines()
    assert "us/step" in head and "peak MB t/f" in head and "path" in head
    assert line.startswith("lstm (64,256,1,64,512)")
    assert line.split()[-3:] == ["0.78", "32.0/16.0", "cluster"]


def _made_up(cell, hidden, batch, speedup, noisy):
    mode = {"speedup": speedup, "speedup_low": speedup * 0.8, "speedup_high": speedup * 1.25}
    return {"cell": cell, "hidden": hidden, "batch": batch, "steps": 128, "layers": 1, "input": 32,
            "grid": True, "noisy": noisy, "forward": dict(mode), "forward_backward": dict(mode)}


def test_plot_labels_every_ratio_and_marks_noisy_rows():
    """A ratio of 400x lies under a labelled tick, and a noisy row is ringed
    and marked ~ in each of its panels, as the table marks it."""
    import matplotlib.pyplot as plt

    rows = [_made_up("rnn", 16, 8, 3.0, False), _made_up("rnn", 64, 8, 400.0, True),
            _made_up("gru", 16, 8, 0.7, False), _made_up("gru", 64, 8, 2.0, False)]
    env = {"fastrnn": "x", "dtype": "float32", "processor": "cpu", "threads": 2}
    fig = bench.figure(rows, env)
    try:
        rnn_axes = [ax for ax in fig.axes if ax.get_title().startswith("RNN")]
        gru_axes = [ax for ax in fig.axes if ax.get_title().startswith("GRU")]
        assert len(rnn_axes) == len(gru_axes) == 2
        for ax in fig.axes:
            ticks = ax.yaxis.get_major_locator().tick_values(*ax.get_ylim())
            assert max(ticks) >= 400 * 1.25 and min(ticks) <= 0.7 * 0.8
        for ax in rnn_axes:
            assert [t.get_text() for t in ax.texts] == ["~"]
            rings = [c for c in ax.collections if c.get_offsets().shape[0] == 1
                     and tuple(c.get_edgecolor()[0][:3]) == (1.0, 0.0, 0.0)]
            assert len(rings) == 1 and tuple(rings[0].get_offsets()[0]) == (64.0, 400.0)
            assert any("noisy" in t.get_text() for t in ax.get_legend().get_texts())
        for ax in gru_axes:
            assert not ax.texts
    finally:
        plt.close(fig)


def test_json_is_written_row_by_row(tmp_path, monkeypatch):
    """A run cut short after its first row leaves that row in the JSON,
    marked incomplete; a whole run is marked complete."""
    out_json = tmp_path / "b.json"
    real = bench.measure
    calls = []

    def measure(*a):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run cut short
        return real(*a)

    monkeypatch.setattr(bench, "measure", measure)
    with pytest.raises(KeyboardInterrupt):
        bench.main(TINY + ["--cell", "gru", "--json", str(out_json), "--plot", ""])
    report = json.loads(out_json.read_text())
    assert report["complete"] is False
    assert [(r["cell"], r["batch"]) for r in report["results"]] == [("gru", 1)]
    assert not (tmp_path / "b.json.tmp").exists()


def test_forward_macs_counts_both_products_of_every_layer():
    # LSTM, input 32, hidden 64, 2 layers, batch 8, 10 steps, bidirectional:
    # layer 0 reads 32 + 64 inputs, layer 1 2*64 + 64, for 4*64 outputs.
    assert bench.forward_macs("lstm", 32, 64, 2, 8, 10, 2) == 2 * 10 * 8 * 4 * 64 * ((32 + 64) + (128 + 64))
    assert bench.forward_macs("rnn", 9, 16, 1, 2, 5, 1) == 5 * 2 * 16 * (9 + 16)


def test_roofline_reports_each_side_against_the_same_runs_peak(tmp_path, capsys):
    out_json = tmp_path / "r.json"
    assert bench.main(TINY + ["--cell", "gru", "--roofline", "--json", str(out_json), "--plot", ""]) == 0
    report = json.loads(out_json.read_text())
    env = report["environment"]
    peak = max(env["fma_peak_gflops_before"], env["fma_peak_gflops_after"])
    assert peak > 0
    for r in report["results"]:
        roof = r["roofline"]
        assert roof["peak_gmacs"] == pytest.approx(peak)
        assert roof["forward_macs"] == bench.forward_macs("gru", 32, 8, 1, r["batch"], 4, 1)
        for mode, count in (("forward", 1), ("forward_backward", 3)):
            for side in ("torch", "fastrnn"):
                gmacs = count * roof["forward_macs"] / (r[mode][side]["median_ms"] * 1e-3) / 1e9
                assert roof[mode][side]["gmacs"] == pytest.approx(gmacs)
                assert roof[mode][side]["percent_of_peak"] == pytest.approx(100 * gmacs / peak)
    out = capsys.readouterr().out
    assert "roofline: float32 multiply-add peak" in out and "fwd %pk t/f" in out


def test_roofline_is_left_out_on_cuda_runs():
    args = bench.parse_args(["--device", "cpu", "--roofline"])
    assert args.roofline
    if fastrnn.cuda_built():
        assert not bench.parse_args(["--emulate-cuda", "--roofline"]).roofline


def test_calls_report_times_cells_and_one_step_layers(tmp_path, capsys, monkeypatch):
    """--calls: per-call rows for every cell shape and streamed layer of the
    chosen cells, each side timed, the ratios consistent, ONNX Runtime's
    column where it is installed."""
    from fastrnn import bench_calls

    monkeypatch.setattr(bench_calls, "CELL_SHAPES", [(5, 8, 1), (5, 8, 3)])
    monkeypatch.setattr(bench_calls, "STREAM_SHAPES", [(5, 8)])
    out_json = tmp_path / "c.json"
    assert bench.main(TINY + ["--cell", "lstm,gru", "--calls", "--json", str(out_json),
                              "--plot", ""]) == 0
    calls = json.loads(out_json.read_text())["calls"]
    assert [(r["kind"], r["cell"], r["batch"]) for r in calls] == [
        ("cell", "lstm", 1), ("cell", "lstm", 3), ("cell", "gru", 1), ("cell", "gru", 3),
        ("stream", "lstm", 1), ("stream", "gru", 1)]
    for r in calls:
        assert r["torch_us"] > 0 and r["fastrnn_us"] > 0
        assert r["speedup"] == pytest.approx(r["torch_us"] / r["fastrnn_us"])
        if r["kind"] == "cell":
            assert r["speedup_fb"] == pytest.approx(r["torch_fb_us"] / r["fastrnn_fb_us"])
        else:
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                assert "onnxruntime_us" not in r
            else:
                assert r["vs_onnxruntime"] == pytest.approx(r["onnxruntime_us"] / r["fastrnn_us"])
    out = capsys.readouterr().out
    assert "| LSTMCell 5, 8, batch 3 |" in out and "| GRU 5, 8, one step |" in out


def test_no_tf32_turns_tf32_off_for_both_sides(tmp_path):
    """--no-tf32: torch.nn's cuDNN layers and the GEMMs in plain float32 for
    the run (cuDNN may use TF32 tensor cores for float32 by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        assert bench.main(TINY + ["--cell", "rnn", "--no-tf32", "--json", str(tmp_path / "b.json"),
                                  "--plot", ""]) == 0
        assert torch.backends.cudnn.allow_tf32 is False
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


PROBES = Path(__file__).resolve().parent.parent / "bench" / "probes"


@pytest.mark.skipif(shutil.which("gcc") is None or platform.machine() not in ("x86_64", "AMD64"),
                    reason="the probes are C for x86-64, built with gcc")
@pytest.mark.parametrize("probe, args, printed", [
    ("stream_loads.c", ["0.05"], "GB/s"),
    ("dot_mix.c", ["8", "64", "4"], "GFMA/s"),
])
@pytest.mark.parametrize("march", ["native", "x86-64"])
def test_probes_build_and_run_with_this_machines_vectors(tmp_path, probe, args, printed, march):
    """The README's limits come from bench/probes; each must build with
    -march=native on whatever this processor has (AVX-512, AVX2 alone) and
    for plain x86-64, and print its figure. Only that it runs is checked;
    its rate is the machine's."""
    exe = tmp_path / probe.replace(".c", "")
    subprocess.run(["gcc", "-O2", f"-march={march}", "-Wall", "-Werror", str(PROBES / probe),
                    "-o", str(exe)], check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe), *args], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    assert printed in out and "-bit" in out, out
    bad = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr


@pytest.mark.parametrize("policy, threads, device, warned", [
    ("PASSIVE", 2, "cpu", True), ("passive", 4, "cpu", True), ("PASSIVE", 1, "cpu", False),
    ("ACTIVE", 2, "cpu", False), (None, 2, "cpu", False), ("PASSIVE", 2, "cuda", False)])
def test_sleeping_openmp_threads_are_named_in_a_warning(policy, threads, device, warned):
    """OMP_WAIT_POLICY=PASSIVE slows torch.nn's side of a CPU run of several
    threads far more than fastrnn's: the report says so, and records it."""
    env = {"omp_wait_policy": policy, "threads": threads, "device": device}
    warning = bench.wait_policy_warning(env)
    assert (warning is not None) == warned
    if warned:
        assert warning.startswith(f"warning: OMP_WAIT_POLICY={policy}:")


def test_the_report_records_and_warns_of_the_wait_policy(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    threads = torch.get_num_threads()
    out_json = tmp_path / "b.json"
    try:
        assert bench.main(TINY + ["--cell", "rnn", "--batch", "1", "--threads", "2",
                                  "--json", str(out_json), "--plot", ""]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out_json.read_text())
    assert report["environment"]["omp_wait_policy"] == "PASSIVE"
    assert "warning: OMP_WAIT_POLICY=PASSIVE:" in capsys.readouterr().out
