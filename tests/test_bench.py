"""The benchmark report (`make bench`): a tiny run writes a table, JSON and
plot whose figures are consistent, and bad options end with exit status 2."""

import json

import pytest

from fastrnn import _ops, bench

pytestmark = pytest.mark.skipif(not _ops.available(), reason="needs the extension")


def test_tiny_report(tmp_path, capsys):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    status = bench.main(["--device", "cpu", "--hidden", "8", "--batch", "1,3", "--steps", "4",
                         "--seconds", "0.01", "--min-reps", "3", "--no-progress",
                         "--json", str(out_json), "--plot", str(out_png)])
    assert status == 0
    report = json.loads(out_json.read_text())
    rows = report["results"]
    assert [(r["hidden"], r["batch"], r["steps"]) for r in rows] == [(8, 1, 4), (8, 3, 4)]
    for r in rows:
        assert r["cuda_path"] is None
        assert max(r["max_abs_error"].values()) < 1e-5
        assert set(r["max_abs_error"]) >= {"output", "h_n", "grad_input", "grad_weight_hh_l0"}
        for mode in ("forward", "forward_backward"):
            t, f = r[mode]["torch"], r[mode]["fastrnn"]
            assert t["reps"] >= 3 and f["reps"] >= 3
            assert t["q1_ms"] <= t["median_ms"] <= t["q3_ms"]
            assert r[mode]["speedup"] == pytest.approx(t["median_ms"] / f["median_ms"])
    assert report["environment"]["device"] == "cpu"
    assert out_png.stat().st_size > 0
    assert "(32,8,1,3,4)" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--hidden", "0"], "expected comma-separated positive integers"),
    (["--device", "cpu", "--cuda-path", "grid"], "--cuda-path: applies to --device cuda only"),
    (["--device", "cpu", "--dtype", "bfloat16"], "the fused CPU kernel takes float32 and float64"),
    (["--seconds", "0"], "--seconds must be positive"),
])
def test_bad_options_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_table_on_cuda_adds_time_per_step_peak_memory_and_path():
    """The table's own arithmetic, on a made-up CUDA row: 0.4 ms for 512
    steps of one layer is 0.78 us a step."""
    row = {"input": 64, "hidden": 256, "layers": 1, "batch": 64, "steps": 512,
           "max_abs_error": {"output": 1e-6},
           "forward": {"torch": {"median_ms": 2.0}, "fastrnn": {"median_ms": 0.4}, "speedup": 5.0},
           "forward_backward": {"torch": {"median_ms": 6.0}, "fastrnn": {"median_ms": 1.5},
                                "speedup": 4.0},
           "saved_bytes": {"torch": 2**22, "fastrnn": 2**21},
           "peak_bytes": {"torch": 2**25, "fastrnn": 2**24}, "cuda_path": "cluster"}
    head, _, line = bench.table([row]).splitlines()
    assert "us/step" in head and "peak MB t/f" in head and "path" in head
    assert line.split()[-3:] == ["0.78", "32.0/16.0", "cluster"]
