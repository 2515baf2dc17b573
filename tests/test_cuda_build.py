"""The CUDA build's own checks, which need nvcc but no GPU: a kernel that
spills registers to local memory fails the build (setup.py's ptxas flags),
and the extension under test was built with that check."""

import ast
import os
import shutil
import subprocess

import pytest

import fastrnn
from fastrnn import _ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc")

# 96 values live at once in every thread: they fit 255 registers (a bound of
# 256 threads), not 64 (a bound of 1024), where ptxas spills them.
KERNEL = r"""
__global__ void __launch_bounds__(BOUND, 1) many_live(const float* in, float* out, int n) {
  float v[96];
#pragma unroll
  for (int i = 0; i < 96; ++i) v[i] = in[threadIdx.x + i * n];
  float s = 0.f;
#pragma unroll
  for (int r = 1; r < 9; ++r)
#pragma unroll
    for (int i = 0; i < 96; ++i) s += v[i] * v[(i + r) % 96];
  out[threadIdx.x] = s;
}
"""


def _ptxas_flags():
    """setup.py's PTXAS_FLAGS, read from its source (importing it would run
    the build)."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "PTXAS_FLAGS"
                                                for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no PTXAS_FLAGS")


def _compile(tmp_path, bound):
    src = tmp_path / f"k{bound}.cu"
    src.write_text(KERNEL.replace("BOUND", str(bound)))
    # The compiler is a build tool, not code under test: not under make
    # sanitize's preloaded sanitizer runtimes (nvcc crashes under them).
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS", "TSAN_OPTIONS")}
    return subprocess.run([NVCC, "-O3", "-arch=sm_90", *_ptxas_flags(), "-c", str(src),
                           "-o", str(tmp_path / f"k{bound}.o")],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_a_register_spill_fails_the_build(tmp_path):
    spilled = _compile(tmp_path, 1024)
    assert spilled.returncode != 0
    assert "spill" in (spilled.stdout + spilled.stderr).lower()
    fits = _compile(tmp_path, 256)
    assert fits.returncode == 0, fits.stdout + fits.stderr


@pytest.mark.skipif(not fastrnn.cuda_built(), reason="needs the CUDA build")
def test_the_extension_was_built_with_the_spill_check():
    info = _ops._built_for()
    assert info is not None and info.nvcc_flags is not None
    for flag in _ptxas_flags():
        assert flag in info.nvcc_flags
