#!/usr/bin/env bash
# The device check: one call on the lent GPU machine builds the CUDA C++ extension
# guider_fast._C, runs the op tests of every backend with compiled kernels (triton, cuda,
# torch), runs a short subset of the CUDA C++ ops under compute-sanitizer (memcheck,
# racecheck), and the GPU benchmark matrices (DBPR and calibration; Sinkhorn) with the cuda
# contenders next to the Triton ones, and writes a report under $OUT.
#
#   run(command="GUIDER_FAST_COMMIT=<HEAD, short> bash benchmarks/device_check.sh",
#       carry=[".whl"], timeout_s=480)
#
# Time plan: the whole script stops by TOTAL_S = 455 s (under the call's 480 s), counted from
# its start, every step under its own hard timeout, the smaller of its cap and what is left:
#   build guider_fast._C <= 120 s (ninja on 16 cores: about a minute expected) | info ~10 s |
#   op tests (tests/ops, every device) 140 s, and beside them, in the same window, the
#   sanitizer subset (memcheck, then racecheck, <= 55 s each: correctness checks on a few
#   small launches, not timings, so they can share the GPU with the tests) |
#   DBPR/calibration bench 100 s | GPU training, torch vs triton backend, 50 s |
#   Sinkhorn bench: what is left, at most 150 s (~95 s after a one-minute build).
# If guider_fast._C does not build, everything else still runs: the cuda tests and bench
# contenders are skipped with the dispatcher's reason, the sanitizer step is skipped, and
# device.txt says so first (with the tail of build_cuda.log).
# Both benches run under the one runner (benchmarks/runner.py): a worker per section, their
# own --budget (cap - 15 s), partial rows kept on a kill.  Their rows (results layout, device =
# the card's name) go to $OUT/results.jsonl; copy that file's lines into
# benchmarks/results/results.jsonl and run `python benchmarks/report.py render` to keep them.
# Their summaries (targets, cuda/triton ratios) are appended to device.txt.
#
# The machine has torch and triton but no POT/GeomLoss and no network: to compare with
# them, download their wheels here first and carry .whl; without them the benchmark
# reports those peers as skipped, with the reason:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl pot==0.9.7.post1 geomloss==0.3.1
set -u -o pipefail
START=$SECONDS  # the time plan above counts from here
# $OUT brings back at most 8 files: device.txt (with the sanitizer output and the benches'
# summaries), tests.log, bench.log, train.log, bench_dbpr_gpu.md, bench_gpu.md,
# results.jsonl, build_cuda.log; everything else goes to $SCRATCH.
OUT=${OUT:-${TMPDIR:-/tmp}/guider_fast_out}
SCRATCH=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SCRATCH/site" .whl/*.whl && export PYTHONPATH=$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}
fi
# guider_fast from the working tree; kernels/ installs as guider_fast.kernels.
[ -e guider_fast/kernels ] || ln -s ../kernels guider_fast/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# Rows carry the commit (pass GUIDER_FAST_COMMIT where the copy has no .git) and the card's name.
export GUIDER_FAST_COMMIT=${GUIDER_FAST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)

TOTAL_S=${DEVICE_CHECK_TOTAL_S:-455}
# cap WANT: the smaller of WANT and the seconds left of TOTAL_S (0 when under 15 s are left).
cap() {
  local left=$(( TOTAL_S - (SECONDS - START) ))
  (( left < 15 )) && { echo 0; return; }
  echo $(( $1 < left ? $1 : left ))
}
skipped() { echo "SKIPPED $1: the device check's $TOTAL_S s are spent" | tee -a "$OUT/device.txt"; }

# The CUDA C++ extension guider_fast._C, built in place against the machine's CUDA torch
# (GUIDER_FAST_BUILD_CUDA=1: a missing prerequisite is an error, in the log). The op tests
# then run backend="cuda" on CUDA tensors; its CPU emulation is left out here.
# GUIDER_FAST_BUILD_CPU=0: a CPU extension is not what this call measures, and its build
# would share this step's time (and could fail the whole build_ext).
build_start=$SECONDS
GUIDER_FAST_BUILD_CUDA=1 GUIDER_FAST_BUILD_CPU=0 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
  timeout -k 5 "$(cap 120)" python3 setup.py -q build_ext --inplace > "$OUT/build_cuda.log" 2>&1
build_rc=$?
if (( build_rc == 0 )) && python3 -c "import guider_fast._C" >> "$OUT/build_cuda.log" 2>&1; then
  build_line="guider_fast._C: built in $(( SECONDS - build_start )) s (log: build_cuda.log)"
else
  (( build_rc == 0 )) && build_rc=1  # built but does not import: the log has the ImportError
  build_line="guider_fast._C: BUILD FAILED (rc $build_rc after $(( SECONDS - build_start )) s): the cuda"
  build_line+=" op tests and bench contenders are skipped with the reason, the sanitizer step is skipped"
fi
export GUIDER_FAST_TEST_CUDA_SIM=0

{
  echo "$build_line"
  (( build_rc != 0 )) && tail -n 15 "$OUT/build_cuda.log"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -m guider_fast.cli info
} 2>&1 | tee "$OUT/device.txt"

# compute-sanitizer on benchmarks/cuda_sanitizer_subset.py (each CUDA C++ op once on small
# inputs, checked against torch).  Exit codes: 0 clean; 9 the sanitizer reported errors
# (--error-exitcode); 1 a value check failed; 2 the cuda backend is unavailable; 124 timeout;
# 125 not run.
SANITIZER=$(command -v compute-sanitizer || true)
for dir in "${CUDA_HOME:-}/bin" "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")" \
    /usr/local/cuda/bin; do
  [ -z "$SANITIZER" ] && [ -x "$dir/compute-sanitizer" ] && SANITIZER=$dir/compute-sanitizer
done
sanitize() {
  local tool=$1 t rc
  t=$(cap 55)
  if (( t == 0 )); then
    echo "SKIPPED compute-sanitizer $tool: the device check's $TOTAL_S s are spent"; echo 124 > "$SCRATCH/$tool.rc"
    return
  fi
  timeout -k 5 "$t" "$SANITIZER" --tool "$tool" --error-exitcode 9 --print-limit 20 \
    python3 benchmarks/cuda_sanitizer_subset.py --device cuda > "$SCRATCH/$tool.log" 2>&1
  rc=$?
  echo "$rc" > "$SCRATCH/$tool.rc"
  echo "== compute-sanitizer --tool $tool: rc=$rc ($(wc -l < "$SCRATCH/$tool.log") lines; first 60, last 3)"
  head -n 60 "$SCRATCH/$tool.log"
  (( $(wc -l < "$SCRATCH/$tool.log") > 60 )) && { echo "..."; tail -n 3 "$SCRATCH/$tool.log"; }
}
sanitizer_pid=
if (( build_rc != 0 )); then
  sanitizer_note="SKIPPED compute-sanitizer: guider_fast._C did not build"
elif [ -z "$SANITIZER" ]; then
  sanitizer_note="SKIPPED compute-sanitizer: not found (PATH, \$CUDA_HOME/bin, nvcc's folder, /usr/local/cuda/bin)"
else
  sanitizer_note="compute-sanitizer: $SANITIZER"
  # Beside the op tests (see the time plan); its report joins device.txt after them.
  { sanitize memcheck; sanitize racecheck; } > "$SCRATCH/sanitizer.txt" 2>&1 &
  sanitizer_pid=$!
fi

# Compiled kernels, not the interpreter that tests/conftest.py switches on by default.
# -rs: every skip with its reason; the log shows each test's outcome even if the timeout cuts it.
t=$(cap 140)
if (( t > 0 )); then
  TRITON_INTERPRET=0 timeout -k 5 "$t" python3 -m pytest tests/ops -q -rs -p no:cacheprovider \
    2>&1 | tee "$OUT/tests.log"
  tests_rc=${PIPESTATUS[0]}
else skipped "op tests"; tests_rc=124; fi

# The sanitizer's report (it ends within its own timeouts; the benches must not share the GPU).
[ -n "$sanitizer_pid" ] && wait "$sanitizer_pid"
{
  echo "$sanitizer_note"
  cat "$SCRATCH/sanitizer.txt" 2>/dev/null
} | tee -a "$OUT/device.txt"
# 125: not run (the note above says why).
memcheck_rc=$(cat "$SCRATCH/memcheck.rc" 2>/dev/null || echo 125)
racecheck_rc=$(cat "$SCRATCH/racecheck.rc" 2>/dev/null || echo 125)

# bench: the one runner's options for both GPU scripts (budget under the step's cap; rows
# appended to $OUT/results.jsonl, kept on SIGTERM).
bench() {
  local script=$1 t=$2 name=$3; shift 3
  TRITON_INTERPRET=0 timeout -k 10 "$t" python3 "benchmarks/$script" --budget $(( t > 30 ? t - 15 : t / 2 )) \
    --results "$OUT/results.jsonl" --run "${name}_$(date -u +%F)" --md "$OUT/$name.md" "$@" \
    2>&1 | tee -a "$OUT/bench.log"
  return "${PIPESTATUS[0]}"
}

t=$(cap 100)
if (( t > 0 )); then
  bench bench_dbpr_gpu.py "$t" bench_dbpr_gpu --summary "$SCRATCH/bench_dbpr_summary.md"; bench_dbpr_rc=$?
else skipped "DBPR bench"; bench_dbpr_rc=124; fi

# GUIDER training on the GPU: seconds per epoch with the torch and triton backends (Baby-sized
# synthetic data, 2 epochs each); each run's metrics become a row of $OUT/results.jsonl.
t=$(cap 50)
if (( t > 0 )); then
  for backend in triton torch; do
    timeout -k 5 $(( t / 2 )) python3 -m guider_fast.cli train --device cuda --backend "$backend" --epochs 2 \
      --no-progress --metrics-json "$SCRATCH/train_cuda_$backend.json" 2>&1 | tail -n 8 | tee -a "$OUT/train.log"
  done
  ls "$SCRATCH"/train_cuda_*.json >/dev/null 2>&1 && python3 benchmarks/report.py --results "$OUT/results.jsonl" \
    add-train "$SCRATCH"/train_cuda_*.json --run "train_cuda_$(date -u +%F)" --device "$GPU_NAME" 2>&1 \
    | tee -a "$OUT/train.log"
else skipped "GPU training"; fi

t=$(cap 150)
if (( t > 0 )); then
  bench bench_gpu.py "$t" bench_gpu --summary "$SCRATCH/bench_gpu_summary.md"; bench_rc=$?
else skipped "Sinkhorn bench"; bench_rc=124; fi

cat "$SCRATCH/bench_dbpr_summary.md" "$SCRATCH/bench_gpu_summary.md" 2>/dev/null | tee -a "$OUT/device.txt"
{
  echo "$build_line"
  echo "$sanitizer_note"
  echo "build rc=$build_rc op tests rc=$tests_rc memcheck rc=$memcheck_rc racecheck rc=$racecheck_rc" \
    "dbpr bench rc=$bench_dbpr_rc sinkhorn bench rc=$bench_rc ($(( SECONDS - START )) s)"
  grep -E "FAILED|ERROR" "$OUT/tests.log" 2>/dev/null | head -n 20
  tail -n 3 "$OUT/tests.log" 2>/dev/null
  echo "results: $(wc -l < "$OUT/results.jsonl" 2>/dev/null || echo 0) rows in \$OUT/results.jsonl"
} | tee -a "$OUT/device.txt"
# Non-zero when any step failed; a sanitizer that was skipped or not found counts too.
exit $(( build_rc != 0 || tests_rc != 0 || bench_rc != 0 || bench_dbpr_rc != 0 \
  || memcheck_rc != 0 || racecheck_rc != 0 ))
