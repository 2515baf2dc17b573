#!/usr/bin/env bash
# One run on a lent GPU machine, about 8 minutes at most: build the CUDA
# extension in place against the machine's own python3 (no virtualenv, no
# downloads), run the CUDA tests, the GPU benchmark (every CUDA path forced in
# turn too), compute-sanitizer (memcheck, racecheck) on small forward and
# backward calls of every path, and the benchmark in bfloat16. The most
# telling steps come first, in case the run is cut short.
# Everything it prints also goes to $OUT/gpu_check.log (bench-results/gpu
# where OUT is unset), with the benchmark's JSON and plot beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-bench-results/gpu}
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export FASTRNN_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step environment
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

step build
timeout 240 $PY setup.py -q build_ext --inplace || { echo "BUILD FAILED"; exit 1; }

step "CUDA tests"
timeout 180 $PY -m pytest tests -q --maxfail=25 -k "cuda and not emulat" -p no:cacheprovider || status=1

step "benchmark float32"
timeout 150 $PY -m fastrnn.bench --device cuda --no-progress --seconds 0.3 \
  --json "$OUT_DIR/bench_float32.json" --plot "$OUT_DIR/speedup_float32.png" || status=1

# The same shapes with each path forced, for the thresholds of the automatic
# choice (cluster up to about 660, grid where it fits the device, step).
for path in cluster grid step; do
  step "paths: $path forced, float32"
  timeout 75 $PY -m fastrnn.bench --device cuda --no-progress --no-named --cuda-path $path \
    --hidden 256,512,1024 --batch 1,8,64 --steps 512 --seconds 0.1 --min-reps 3 \
    --json "$OUT_DIR/paths_$path.json" --plot "" || status=1
done

step "compute-sanitizer memcheck"
timeout 90 compute-sanitizer --tool memcheck --error-exitcode 3 $PY bench/sanitize_cases.py || status=1
step "compute-sanitizer racecheck"
timeout 90 compute-sanitizer --tool racecheck --error-exitcode 3 $PY bench/sanitize_cases.py || status=1

step "benchmark bfloat16"
timeout 90 $PY -m fastrnn.bench --device cuda --dtype bfloat16 --no-progress --no-named --seconds 0.2 \
  --json "$OUT_DIR/bench_bfloat16.json" --plot "$OUT_DIR/speedup_bfloat16.png" || status=1

step "done: status $status"
exit $status
