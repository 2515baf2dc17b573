"""The examples run, and what they claim holds."""

import os
import runpy
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_walkthrough_runs():
    # The checkout last, so that a build elsewhere on PYTHONPATH (make
    # sanitize, make compat) is the one the example imports.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (os.environ.get("PYTHONPATH"), ROOT) if p))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "walkthrough.py")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "nn.RNN with the same state_dict gives the same output" in out.stdout
    assert "weight_hh_l0   (16, 16)" in out.stdout
    assert "replace_rnn: fastrnn.module.LSTM, ran fused, same output" in out.stdout


@pytest.mark.parametrize("cell,name", [("rnn", "RNN"), ("lstm", "LSTM"), ("gru", "GRU")])
def test_training_learns_and_matches_torch_nn(cell, name, capsys):
    """The example trains the torch.nn model and the same model after
    fastrnn.replace_rnn (fused kernels, CPU): both learn, to the same loss."""
    train = runpy.run_path(os.path.join(ROOT, "examples", "train_sine.py"))
    ref, ours, model = train["main"](["--cell", cell, "--epochs", "6", "--sequences", "64", "--steps", "30"])
    assert type(model.rnn).__module__ == "fastrnn.module" and type(model.rnn).__name__ == name
    assert model.rnn.last_path == "fused"
    assert ours[-1] < 0.5 * ours[0], "the fused model did not learn"
    # Same seed, same data, same math: the curves agree to float32 noise.
    assert ours == pytest.approx(ref, rel=1e-3)
    assert f"time: nn.{name}" in capsys.readouterr().out


def test_cell_sampling_matches_torch_nn(capsys):
    """The sampling example: the trained model's fused cell gives torch.nn's
    logits over the same text, and the greedy sample is the learnt text."""
    sample = runpy.run_path(os.path.join(ROOT, "examples", "sample_chars.py"))
    losses, text_nn, text_ours, diff, model = sample["main"](["--iters", "120", "--length", "60"])
    assert type(model.cell).__name__ == "LSTMCell" and type(model.cell).__module__ == "fastrnn.module"
    assert model.cell.last_path == "fused"
    assert losses[-1] < 0.2 * losses[0], "the model did not learn"
    assert diff < 1e-4
    assert "the quick brown fox" in text_ours
    assert "time a character" in capsys.readouterr().out
