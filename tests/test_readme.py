"""The README's Python blocks run as written, one after the other in a
fresh interpreter, and print what their comments say."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def expected_prints(code):
    """The output each `print(...)  # expected` line's comment promises."""
    return [m.group(1).strip().replace("'", "")
            for m in re.finditer(r"^print\(.*\)\s+#\s*(.+)$", code, flags=re.M)]


def test_readme_python_blocks_run_and_print_what_they_say(tmp_path):
    blocks = python_blocks(os.path.join(ROOT, "README.md"))
    assert len(blocks) >= 3
    code = "\n".join(blocks)
    # In a directory of its own, as a user's script; fastrnn from where this
    # process has it: a build elsewhere on PYTHONPATH first (make sanitize,
    # make compat, made absolute), then the checkout.
    paths = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join(paths + [ROOT]))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    promised = expected_prints(code)
    assert promised == ["fused", "GRU fused", "True fused", "torch.Size([4, 16]) fused"]
    assert out.stdout.splitlines() == promised
