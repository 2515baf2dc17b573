#!/usr/bin/env bash
# The one script a lent GPU machine runs: a verdict on every CUDA path inside
# a time budget, the most telling steps first.
#
#   bench/gpu_check.sh                  # on a GPU machine (its own python3)
#   GPU_CHECK_DRY=1 bench/gpu_check.sh  # no GPU: the same steps through the
#                                       # CUDA kernels' CPU emulator, a few
#                                       # minutes on a quiet machine, no
#                                       # step limits but the budget (3600 s)
#
# Steps, in order: environment; build (sm_90 only, line info for the
# sanitizers; the dry run checks the extension make build made instead of
# building); a smoke run of each CUDA path forced at the largest shape it
# takes, per cell, forward and backward (hidden up to 1024, a cluster of 8;
# bench/gpu_smoke.py; the dry run checks the launches of those very shapes),
# each in its own process under `timeout -k 5 30` and checked against
# torch.nn in float64; the CUDA tests (parity on CUDA, then
# tests/test_cuda.py, whose grid-path tests come last); compute-sanitizer
# memcheck, synccheck and racecheck on small calls of every path and cell
# plus the near-full-shared-memory configurations; the benchmark in float32;
# Nsight Compute on the shapes where cuDNN was faster (bench/profile_case.py;
# the dry run runs those calls through the emulator); float32 with TF32 off
# on both sides; the benchmark with each path forced in turn, and in
# bfloat16.
#
# GPU_CHECK_BUDGET (seconds, default 540; 3600 for the dry run) bounds the
# whole run: each step gets at most what is left, and a step that no longer
# fits its minimum is reported SKIPPED; the steps before the benchmark leave
# it GPU_CHECK_BENCH_RESERVE seconds (30% of the budget). A step that runs
# out of its own limit is TIMEOUT (a failure), one that runs out of the
# budget BUDGET (an incomplete run). Whatever happens (a failed step, a
# timeout, SIGTERM), an EXIT trap writes the verdict table (step, PASS, FAIL,
# TIMEOUT, BUDGET or SKIPPED, exit status, seconds; INTERRUPTED for a step
# cut by a signal) as the last lines of $OUT/gpu_check.log and as
# $OUT/verdict.json. $OUT (default bench-results/gpu) receives at most 7
# files: gpu_check.log, verdict.json, bench_float32.json,
# speedup_float32.png, bench_float32_no_tf32.json, paths.json,
# bench_bfloat16.json.
# Exit status: 0 when every step passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
START=$(date +%s)
DRY=${GPU_CHECK_DRY:-0}
# On an H200 (2026-12-04) a machine's start and the transfers took about 30 s
# of the session's 900: 540 s leaves the command limit (600 s) a margin and
# the session enough for a second, shorter call.
BUDGET=${GPU_CHECK_BUDGET:-$( ((DRY == 1)) && echo 3600 || echo 540)}
OUT_DIR=${OUT:-bench-results/gpu}
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/gpu_check.log
: >"$LOG"
WORK=$(mktemp -d)
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# A grid-path barrier that waits this long stops its launch, which then
# raises an error, instead of hanging (co-residency lost to another
# process, say).
export FASTRNN_GRID_TIMEOUT_MS=${FASTRNN_GRID_TIMEOUT_MS:-5000}

# The benchmark's share of the budget: the steps before it see the budget
# less this much, so that a slow build or test step cannot leave the run
# without any benchmark figures.
BENCH_RESERVE=${GPU_CHECK_BENCH_RESERVE:-$((BUDGET * 3 / 10))}
RESERVED=$BENCH_RESERVE
NAMES=() STATUSES=() CODES=() SECONDS_TAKEN=()
CURRENT="" CHILD=""

say() { echo "$*" | tee -a "$LOG"; }

record() {  # name status code seconds
  NAMES+=("$1") STATUSES+=("$2") CODES+=("$3") SECONDS_TAKEN+=("$4")
}

# step NAME MAX MIN CMD...: runs CMD under `timeout -k 5 T`, T being MAX or
# what is left of the budget if less; SKIPPED when T would be under MIN.
step() {
  local name=$1 max=$2 min=$3
  shift 3
  local left=$((BUDGET - ($(date +%s) - START) - RESERVED))
  # The dry run measures nothing: a step's own limit is for the GPU, and on
  # a loaded machine the emulator may take many times as long, so there only
  # the budget bounds a step.
  ((DRY == 1)) && max=$left
  local limit=$((max < left ? max : left))
  # A step whose limit is what is left of the budget, not its own, and that
  # runs out of it was cut by the budget: BUDGET, an incomplete run, not a
  # failed one.
  local cut_status=TIMEOUT
  ((limit == left)) && cut_status=BUDGET
  if ((limit < min)); then
    say "=== $name: SKIPPED (${left}s of the budget left, it needs ${min}s)"
    record "$name" SKIPPED - 0
    return
  fi
  say ""
  say "=== $name (limit ${limit}s, $(date +%T))"
  CURRENT=$name
  local t0 rc status
  t0=$(date +%s)
  # In the background and waited for, so that SIGTERM reaches the trap at
  # once rather than when the step ends.
  (timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"; exit "${PIPESTATUS[0]}") &
  CHILD=$!
  wait "$CHILD"
  rc=$?
  CHILD="" CURRENT=""
  if ((rc == 124 || rc == 137)); then status=$cut_status; elif ((rc != 0)); then status=FAIL; else status=PASS; fi
  record "$name" "$status" "$rc" $(($(date +%s) - t0))
  say "=== $name: $status (exit $rc, $(($(date +%s) - t0))s)"
}

finish() {
  local code=$?
  trap - EXIT INT TERM
  if [[ -n $CHILD ]]; then
    # Interrupted mid-step: stop the step (timeout passes the signal on to
    # its command's process group) and record it.
    pkill -TERM -P "$CHILD" 2>/dev/null
    wait "$CHILD" 2>/dev/null
  fi
  if [[ -n $CURRENT ]]; then record "$CURRENT" INTERRUPTED "$code" -; fi
  # The forced-path benchmarks, one JSON file of them all.
  if compgen -G "$WORK/paths_*.json" >/dev/null; then
    "$PY" - "$OUT_DIR/paths.json" "$WORK"/paths_*.json <<'EOF' 2>/dev/null
import json, os, sys
out = {os.path.basename(p)[6:-5]: json.load(open(p)) for p in sys.argv[2:]}
json.dump(out, open(sys.argv[1], "w"), indent=1)
EOF
  fi
  rm -rf "$WORK"
  local verdict=PASS i
  for i in "${!NAMES[@]}"; do
    case ${STATUSES[$i]} in
      PASS) ;;
      SKIPPED | BUDGET) [[ $verdict == PASS ]] && verdict=INCOMPLETE ;;
      *) verdict=FAIL ;;
    esac
  done
  local elapsed=$(($(date +%s) - START))
  {
    echo ""
    echo "=== verdict: $verdict ($([[ $DRY == 1 ]] && echo "dry run, emulator" || echo GPU), ${elapsed}s of ${BUDGET}s)"
    printf '%-34s %-11s %5s %6s\n' step status exit seconds
    for i in "${!NAMES[@]}"; do
      printf '%-34s %-11s %5s %6s\n' "${NAMES[$i]}" "${STATUSES[$i]}" "${CODES[$i]}" "${SECONDS_TAKEN[$i]}"
    done
  } | tee -a "$LOG"
  {
    printf '{"verdict": "%s", "dry_run": %s, "budget_s": %s, "elapsed_s": %s, "steps": [' \
      "$verdict" "$([[ $DRY == 1 ]] && echo true || echo false)" "$BUDGET" "$elapsed"
    for i in "${!NAMES[@]}"; do
      local secs=${SECONDS_TAKEN[$i]} exit_code=${CODES[$i]}
      [[ $secs == - ]] && secs=null
      [[ $exit_code == - ]] && exit_code=null
      printf '%s{"step": "%s", "status": "%s", "exit": %s, "seconds": %s}' \
        "$([[ $i == 0 ]] || echo ", ")" "${NAMES[$i]}" "${STATUSES[$i]}" "$exit_code" "$secs"
    done
    printf ']}\n'
  } >"$OUT_DIR/verdict.json"
  [[ $verdict == PASS ]] && exit 0 || exit 1
}
# GPU_CHECK_LIB=1: sourced for its functions only (the tests of step and
# finish).
[[ ${GPU_CHECK_LIB:-0} == 1 ]] && return 0
trap finish EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

if [[ $DRY == 1 ]]; then
  # The same steps on CPU tensors through the emulator of an H100/H200,
  # shapes and repetitions cut to fit a few minutes on two cores.
  EMU=(--emulate)
  BENCH=("$PY" -m fastrnn.bench --emulate-cuda --no-progress --hidden 16,32 --batch 2 --steps 4
         --seconds 0.02 --min-reps 2 --retries 0)
  step environment 30 5 "$PY" -c "import torch, fastrnn; print('dry run: no GPU, the emulator;', 'torch', torch.__version__, 'fastrnn', fastrnn.__version__)"
  # The extension `make build` made, never rebuilt here: a rebuild with
  # this environment's flags would recompile the checkout's build, and a
  # run stopped midway would leave it half done. Stale sources fail the step.
  step "build (checked)" 60 5 "$PY" bench/gpu_check_built.py
  TESTS=("$PY" -m pytest tests/test_cuda_emulation.py -q -p no:cacheprovider
         -k "cluster_of_eight or grid_groups or grid_barrier or forced_shape or one_wave or automatic_path")
  SANITIZE=("$PY" bench/sanitize_cases.py --emulate --quick)
  MEMCHECK=("${SANITIZE[@]}" --full-smem=persistent)
  SYNCCHECK=("${SANITIZE[@]}")
  RACECHECK=("${SANITIZE[@]}" --full-smem=persistent --no-step)
else
  EMU=()
  BENCH=("$PY" -m fastrnn.bench --device cuda --no-progress)
  step environment 30 5 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv && \
    $PY -c \"import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())\""
  step "build (sm_90)" 240 60 env FASTRNN_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 FASTRNN_LINEINFO=1 \
    MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py -q build_ext --inplace
  TESTS=("$PY" -m pytest tests/test_parity.py tests/test_cuda.py -q -p no:cacheprovider -k cuda --maxfail=20)
  SAN=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --error-exitcode 3)
  MEMCHECK=("${SAN[@]}" --tool memcheck "$PY" bench/sanitize_cases.py --full-smem)
  SYNCCHECK=("${SAN[@]}" --tool synccheck "$PY" bench/sanitize_cases.py)
  # Races are in shared memory: the step path's kernels use none, and
  # racecheck over its cuBLAS calls ran most of the step's 90 s on an H200.
  RACECHECK=("${SAN[@]}" --tool racecheck "$PY" bench/sanitize_cases.py --full-smem --no-step)
fi

for path in persistent cluster grid step; do
  step "smoke: $path" 30 10 "$PY" bench/gpu_smoke.py "$path" "${EMU[@]}"
done
step "CUDA tests" 150 30 "${TESTS[@]}"
step "compute-sanitizer memcheck" 90 30 "${MEMCHECK[@]}"
step "compute-sanitizer synccheck" 60 20 "${SYNCCHECK[@]}"
step "compute-sanitizer racecheck" 120 30 "${RACECHECK[@]}"
RESERVED=0  # the benchmark's turn: the whole of what is left
if [[ $DRY == 1 ]]; then
  step "benchmark float32" 60 10 "${BENCH[@]}" --cell rnn --json "$OUT_DIR/bench_float32.json" \
    --plot "$OUT_DIR/speedup_float32.png"
else
  step "benchmark float32" 120 30 "${BENCH[@]}" --seconds 0.2 --json "$OUT_DIR/bench_float32.json" \
    --plot "$OUT_DIR/speedup_float32.png"
fi
# Where the time of a step goes on the shapes where cuDNN beat the
# single-kernel paths on an H200 (bench/profile_case.py): Nsight Compute's
# stall reasons for one launch of each, the clocks left as they are.
if [[ $DRY == 1 ]]; then
  step "profile (ncu)" 60 5 "$PY" bench/profile_case.py --emulate
else
  step "profile (ncu)" 90 20 ncu --clock-control none --kernel-name-base demangled \
    --kernel-name "regex:(persistent|cluster)_kernel" --launch-count 3 --section SpeedOfLight \
    --section Occupancy --section SchedulerStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis "$PY" bench/profile_case.py
fi
# Float32 against torch.nn with TF32 off on both sides: cuDNN may run a
# float32 layer on TF32 tensor cores by default, fastrnn's products are
# float32 (its GEMMs follow torch.backends.cuda.matmul.allow_tf32, off by
# default).
if [[ $DRY == 1 ]]; then
  step "benchmark float32, no TF32" 30 5 "${BENCH[@]}" --cell rnn --no-named --no-tf32 \
    --json "$OUT_DIR/bench_float32_no_tf32.json" --plot ""
else
  step "benchmark float32, no TF32" 45 10 "${BENCH[@]}" --no-named --no-tf32 --hidden 64,256,1024 \
    --batch 8,64 --seconds 0.1 --min-reps 3 --retries 0 --json "$OUT_DIR/bench_float32_no_tf32.json" --plot ""
fi
# The same shapes with each path forced: the thresholds of the automatic choice.
for path in persistent cluster grid step; do
  if [[ $DRY == 1 ]]; then
    step "benchmark: $path forced" 30 5 "${BENCH[@]}" --cell rnn --no-named --cuda-path "$path" \
      --json "$WORK/paths_$path.json" --plot ""
  else
    step "benchmark: $path forced" 45 10 "${BENCH[@]}" --cell rnn,lstm --no-named --cuda-path "$path" \
      --hidden 64,256,1024 --batch 8,64 --steps 512 --seconds 0.1 --min-reps 3 --retries 0 \
      --json "$WORK/paths_$path.json" --plot ""
  fi
done
if [[ $DRY == 1 ]]; then
  step "benchmark bfloat16" 30 5 "${BENCH[@]}" --cell gru --dtype bfloat16 --json "$OUT_DIR/bench_bfloat16.json" --plot ""
else
  step "benchmark bfloat16" 60 15 "${BENCH[@]}" --dtype bfloat16 --no-named --seconds 0.1 --retries 0 \
    --json "$OUT_DIR/bench_bfloat16.json" --plot ""
fi
