"""bench/gpu_check.sh, the script a lent GPU machine runs, tested here
through its dry run (GPU_CHECK_DRY=1: every step on the CUDA kernels' CPU
emulator): every step passes, and the verdict table and JSON are written
whatever happens (steps that no longer fit, SIGTERM). Nothing in the dry run
is measured, so no verdict here depends on how long a step took: the dry
run's steps have no limits of their own, only a budget no loaded machine
reaches."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import fastrnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")

pytestmark = [
    pytest.mark.skipif(not fastrnn.cuda_built(), reason="the emulator comes with the CUDA build"),
    # The dry run checks the in-place build and imports the checkout: not
    # under the side builds of make sanitize, tsan and compat.
    pytest.mark.skipif(bool(os.environ.get("PYTHONPATH", "").strip()) and "build/" in os.environ["PYTHONPATH"],
                       reason="runs against the in-place build only"),
]


def dry_run(out, budget=3600, wait=True):
    env = dict(os.environ, GPU_CHECK_DRY="1", OUT=str(out), PYTHON=sys.executable,
               GPU_CHECK_BUDGET=str(budget))
    proc = subprocess.Popen(["bash", SCRIPT], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if wait:
        proc.communicate(timeout=budget + 120)
    return proc


def verdict(out):
    return json.loads((out / "verdict.json").read_text())


# Three minutes on a quiet machine: in make test-deep, which CI runs.
@pytest.mark.deep
def test_dry_run_passes_every_step(tmp_path):
    proc = dry_run(tmp_path)
    v = verdict(tmp_path)
    failed = [s for s in v["steps"] if s["status"] != "PASS"]
    assert proc.returncode == 0 and v["verdict"] == "PASS", failed
    assert [s["step"] for s in v["steps"]] == [
        "environment", "build (checked)", "smoke: persistent", "smoke: cluster", "smoke: grid", "smoke: step",
        "CUDA tests", "compute-sanitizer memcheck", "compute-sanitizer synccheck",
        "compute-sanitizer racecheck", "benchmark float32", "profile (ncu)", "benchmark float32, no TF32",
        "benchmark: persistent forced",
        "benchmark: cluster forced", "benchmark: grid forced", "benchmark: step forced",
        "benchmark bfloat16"]
    assert v["dry_run"] is True and v["budget_s"] == 3600
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["bench_bfloat16.json", "bench_float32.json", "bench_float32_no_tf32.json",
                     "gpu_check.log", "paths.json",
                     "speedup_float32.png", "verdict.json"]
    paths = json.loads((tmp_path / "paths.json").read_text())
    assert {name: {r["cuda_path"] for r in report["results"]} for name, report in paths.items()} == {
        p: {p} for p in ("persistent", "cluster", "grid", "step")}
    log = (tmp_path / "gpu_check.log").read_text().splitlines()
    table = log[log.index(next(line for line in log if line.startswith("=== verdict: PASS"))):]
    assert len(table) == 2 + len(v["steps"])
    assert all(line.split()[-3] == "PASS" for line in table[2:])
    # Each smoke run compared the forced path with torch.nn, cell by cell.
    assert sum("worst relative error" in line and line.endswith(" s") and " ok " in line for line in log) == 12


def test_steps_that_do_not_fit_the_budget_are_skipped(tmp_path):
    proc = dry_run(tmp_path, budget=3)
    v = verdict(tmp_path)
    assert proc.returncode == 1 and v["verdict"] == "INCOMPLETE"
    assert {s["status"] for s in v["steps"]} == {"SKIPPED"} and len(v["steps"]) == 18
    assert "=== verdict: INCOMPLETE" in (tmp_path / "gpu_check.log").read_text()


def test_sigterm_mid_step_still_writes_the_verdict(tmp_path):
    proc = dry_run(tmp_path, wait=False)
    log = tmp_path / "gpu_check.log"
    deadline = time.monotonic() + 900  # a wait for the step to start, not a verdict
    while time.monotonic() < deadline and "=== smoke: persistent (" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    v = verdict(tmp_path)
    assert proc.returncode == 1 and v["verdict"] == "FAIL"
    assert v["steps"][-1]["step"] == "smoke: persistent" and v["steps"][-1]["status"] == "INTERRUPTED"
    assert [s["status"] for s in v["steps"][:2]] == ["PASS", "PASS"]


def _smoke():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import gpu_smoke
    finally:
        sys.path.pop(0)
    return gpu_smoke


def test_the_dry_run_checks_the_build_instead_of_building(tmp_path, monkeypatch, capsys):
    """The dry run's build step never compiles (which would redo the
    checkout's build with this environment's flags): it passes on the
    extension make build made, and fails, saying what to run, where a source
    is newer than it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_built",
                                                  os.path.join(ROOT, "bench", "gpu_check_built.py"))
    built = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(built)
    with open(SCRIPT) as f:
        script = f.read()
    dry_branch = script[script.index("if [[ $DRY == 1 ]]; then\n  # The same steps"):]
    dry_branch = dry_branch[:dry_branch.index("\nelse\n")]
    assert "bench/gpu_check_built.py" in dry_branch and "build_ext" not in dry_branch
    header = tmp_path / "csrc" / "cuda" / "x.h"
    header.parent.mkdir(parents=True)
    header.write_text("// a source\n")
    monkeypatch.setattr(built, "ROOT", str(tmp_path))
    so = os.path.getmtime(fastrnn._ops._C.__file__)
    os.utime(header, (so - 60, so - 60))
    assert built.main() == 0
    os.utime(header, (so + 60, so + 60))
    assert built.main() == 1
    assert "older than csrc/cuda/x.h: run make build" in capsys.readouterr().out


def test_the_script_runs_every_path():
    """The script's per-path loops (smoke, forced-path benchmark) name the
    extension's paths, fastrnn.kernels.CUDA_PATHS but 'auto'."""
    from fastrnn.kernels import CUDA_PATHS

    with open(SCRIPT) as f:
        loops = re.findall(r"^for path in ([a-z ]+); do$", f.read(), re.M)
    assert len(loops) == 2
    for loop in loops:
        assert tuple(loop.split()) == CUDA_PATHS[1:]


def test_smoke_shapes_are_ones_the_gpu_run_can_launch():
    """Each path's smoke shape, per cell, is one the chooser launches both
    ways at the GPU run's steps and batch: the LSTM's grid backward has no
    launch at hidden 1024, batch 8, so its shape stops short of it."""
    smoke = _smoke()
    for path in smoke.PATHS:
        for cell in smoke.CELLS:
            hidden = smoke.gpu_hidden(cell, path)
            assert hidden >= 64, (path, cell)
            blocks = smoke.GPU_BLOCKS.get(path, 0)
            assert smoke.refusal(cell, path, blocks, hidden, smoke.GPU_STEPS, smoke.GPU_BATCH) == ""
            if hidden < 1024:
                assert smoke.refusal(cell, path, blocks, hidden + 8, smoke.GPU_STEPS, smoke.GPU_BATCH)
    assert smoke.refusal("lstm", "grid", 0, 1024, 64, 8).startswith("backward: ")
    assert smoke.gpu_hidden("lstm", "grid") < 1024 == smoke.gpu_hidden("rnn", "grid")


def test_smoke_goes_on_to_the_next_cell_after_a_raise(monkeypatch, capsys):
    smoke = _smoke()
    real = smoke.check

    def check(cell, *args):
        if cell == "rnn":
            raise RuntimeError("fastrnn: the grid CUDA path was forced, but ...")
        return real(cell, *args)

    monkeypatch.setattr(smoke, "check", check)
    assert smoke.main(["step", "--emulate"]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if "worst relative error" in line
             or "raised" in line]
    assert len(lines) == 3 and "raised RuntimeError: fastrnn: the grid CUDA path was forced" in lines[0]
    assert lines[0].split()[-3] == "FAIL" and all(" ok " in line for line in lines[1:])


def _steps(tmp_path, *steps):
    """Runs gpu_check.sh's step() on `steps` ((name, max, min, command)) with
    a budget of 100 s of which 90 are the benchmark's, then its finish()."""
    lines = [f"GPU_CHECK_LIB=1 OUT={tmp_path} GPU_CHECK_BUDGET=100 GPU_CHECK_BENCH_RESERVE=90 "
             f"source {SCRIPT}"]
    for name, most, least, command in steps:
        if name == "RESERVED=0":
            lines.append(name)
            continue
        lines.append(f"step '{name}' {most} {least} {command}")
    lines.append("finish")
    proc = subprocess.run(["bash", "-c", "\n".join(lines)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    return proc, verdict(tmp_path)


def test_a_step_cut_by_the_budget_makes_the_run_incomplete_not_failed(tmp_path):
    """Before the benchmark a step sees the budget less the benchmark's
    share; one that runs out of the budget rather than its own limit is
    BUDGET, and the verdict INCOMPLETE."""
    proc, v = _steps(tmp_path, ("tests", 60, 1, "sleep 300"))
    assert proc.returncode == 1 and v["verdict"] == "INCOMPLETE", proc.stdout + proc.stderr
    assert [(s["step"], s["status"], s["exit"]) for s in v["steps"]] == [("tests", "BUDGET", 124)]
    limit = int(re.search(r"=== tests \(limit (\d+)s", proc.stdout).group(1))
    assert limit <= 10, "the budget less the benchmark's share, not the step's own 60 s"


def test_a_step_past_its_own_limit_fails_the_run(tmp_path):
    proc, v = _steps(tmp_path, ("RESERVED=0", 0, 0, ""), ("smoke", 1, 1, "sleep 300"),
                     ("benchmark", 30, 1, "true"))
    assert proc.returncode == 1 and v["verdict"] == "FAIL"
    assert [(s["step"], s["status"]) for s in v["steps"]] == [("smoke", "TIMEOUT"), ("benchmark", "PASS")]
