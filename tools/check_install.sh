#!/usr/bin/env bash
# Installing fastrnn the ways a user would, each checked from outside the
# checkout (CI runs this after make test and make compat):
#  1. the source archive (sdist) carries every source and header: built with
#     `setup.py sdist`, installed with `pip install --no-build-isolation` into
#     a fresh virtualenv that borrows .venv's torch, then a forward of each
#     layer on its fused CPU kernels;
#  2. `pip install` of it with pip's default isolated build stops with the
#     command that works, instead of building against another torch;
#  3. an extension built for another torch (make compat's, torch 2.11) says
#     so when .venv's torch imports it.
# CPU-only builds of the kernels this processor runs (FASTRNN_CUDA=0,
# FASTRNN_CPU_ISAS=native): the point is the packaging, not the kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "== 1. sdist, installed with --no-build-isolation into a fresh virtualenv"
rm -rf "$WORK/dist"
FASTRNN_NO_EXT=1 $PY setup.py -q sdist -d "$WORK/dist" >/dev/null
SDIST=$(ls "$WORK"/dist/fastrnn-*.tar.gz)
tar tzf "$SDIST" > "$WORK/contents"
for f in csrc/cells.h csrc/cpu/recurrence_cpu_kernels.h csrc/cuda/recurrence_cuda_bodies.h \
         csrc/cuda/recurrence_cuda_kernels.cuh csrc/cuda/recurrence_cuda_kernels_f32.cu LICENSE \
         fastrnn/py.typed; do
  grep -q "/$f\$" "$WORK/contents" || { echo "sdist lacks $f"; exit 1; }
done
python3 -m venv "$WORK/venv"
SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
NEW_SITE=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$SITE" > "$NEW_SITE/borrowed-from-dot-venv.pth"   # torch, setuptools, ninja, pybind11
(cd "$WORK" && FASTRNN_CUDA=0 FASTRNN_CPU_ISAS=native MAX_JOBS=2 "$WORK/venv/bin/python" -m pip install -q \
  --disable-pip-version-check --no-build-isolation --no-deps "$SDIST")
(cd "$WORK" && "$WORK/venv/bin/python" - "$WORK" <<'PYEOF'
import sys, torch, fastrnn
assert fastrnn.__file__.startswith(sys.argv[1]), fastrnn.__file__
assert fastrnn.available(), fastrnn._ops.extension_error()
for cls in (fastrnn.RNN, fastrnn.LSTM, fastrnn.GRU):
    layer = cls(3, 5, 2, backend="fused")
    y, _ = layer(torch.randn(4, 2, 3))
    assert layer.last_path == "fused" and y.shape == (4, 2, 5)
print("installed from the sdist:", fastrnn.__file__, "forward of RNN, LSTM, GRU ok")
PYEOF
)
(cd "$WORK" && "$WORK/venv/bin/python" -m fastrnn.info)

echo "== 2. pip install with its isolated build environment fails loudly"
if (cd "$WORK" && "$WORK/venv/bin/python" -m pip install --disable-pip-version-check --no-deps \
      --force-reinstall "$SDIST" > "$WORK/isolated.log" 2>&1); then
  echo "an isolated build should have stopped"; exit 1
fi
grep -q "no torch can be imported in this build environment" "$WORK/isolated.log" || {
  tail -30 "$WORK/isolated.log"; echo "the message is missing"; exit 1; }
grep -q "pip install --no-build-isolation" "$WORK/isolated.log"
echo "isolated build stopped with: $(grep -m1 'no torch can be imported' "$WORK/isolated.log" | sed 's/^ *//')"

echo "== 3. an extension built for another torch says so"
if [ -d build/compat/fastrnn ]; then
  PYTHONPATH=$ROOT/build/compat $PY -P -W always - <<'PYEOF'
import warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastrnn
info = fastrnn._ops._built_for()
assert "build/compat" in fastrnn.__file__ and info.torch != torch.__version__, fastrnn.__file__
said = [str(w.message) for w in caught] + [str(fastrnn._ops.extension_error())]
wanted = f"built for PyTorch {info.torch}"
assert any(wanted in s and torch.__version__ in s for s in said), said
print("loaded:", fastrnn.available(), "|", next(s for s in said if wanted in s)[:200])
PYEOF
else
  echo "skipped: no build/compat (make compat builds it)"
fi
echo "check_install: ok"
