#!/usr/bin/env bash
# The device check: one call on the lent GPU machine runs the op tests of every backend with
# compiled kernels and the GPU benchmark matrices (Sinkhorn; DBPR and calibration), and
# writes a report under $OUT.
#
#   run(command="GUIDER_FAST_COMMIT=<HEAD, short> bash benchmarks/device_check.sh",
#       carry=[".whl"], timeout_s=480)
#
# Time plan: the whole script stops by TOTAL_S = 455 s (under the call's 480 s), every step
# under its own hard timeout, the smaller of its cap and what is left of TOTAL_S:
#   info ~10 s | op tests (tests/ops, every device) 150 s | DBPR/calibration bench 150 s |
#   GPU training, torch vs triton backend, 70 s | Sinkhorn bench: what is left, at most 150 s.
# Both benches run under the one runner (benchmarks/runner.py): a worker per section, their
# own --budget (cap - 15 s), partial rows kept on a kill.  Their rows (results layout, device =
# the card's name) go to $OUT/results.jsonl; copy that file's lines into
# benchmarks/results/results.jsonl and run `python benchmarks/report.py render` to keep them.
#
# The machine has torch and triton but no POT/GeomLoss and no network: to compare with
# them, download their wheels here first and carry .whl; without them the benchmark
# reports those peers as skipped, with the reason:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl pot==0.9.7.post1 geomloss==0.3.1
# The CUDA extension (csrc/) does not exist yet: nothing to build.
set -u -o pipefail
START=$SECONDS  # the time plan above counts from here
# $OUT brings back at most 8 files: device.txt, tests.log, bench.log, train.log,
# bench_dbpr_gpu.md, bench_gpu.md, results.jsonl; everything else goes to $SCRATCH.
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

# The CUDA C++ extension guider_fast._C, built in place against the machine's CUDA torch
# (GUIDER_FAST_BUILD_CUDA=1: a missing prerequisite is an error, in the log). The op tests
# then run backend="cuda" on CUDA tensors; its CPU emulation is left out here.
GUIDER_FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} timeout -k 5 150 \
  python3 setup.py -q build_ext --inplace > "$OUT/build_cuda.log" 2>&1 || echo "CUDA extension build failed: see build_cuda.log" >&2
export GUIDER_FAST_TEST_CUDA_SIM=0

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -m guider_fast.cli info
} 2>&1 | tee "$OUT/device.txt"

TOTAL_S=${DEVICE_CHECK_TOTAL_S:-455}
# cap WANT: the smaller of WANT and the seconds left of TOTAL_S (0 when under 15 s are left).
cap() {
  local left=$(( TOTAL_S - (SECONDS - START) ))
  (( left < 15 )) && { echo 0; return; }
  echo $(( $1 < left ? $1 : left ))
}
skipped() { echo "SKIPPED $1: the device check's $TOTAL_S s are spent" | tee -a "$OUT/device.txt"; }

# Compiled kernels, not the interpreter that tests/conftest.py switches on by default.
# -rs: every skip with its reason; the log shows each test's outcome even if the timeout cuts it.
t=$(cap 150)
if (( t > 0 )); then
  TRITON_INTERPRET=0 timeout -k 5 "$t" python3 -m pytest tests/ops -q -rs -p no:cacheprovider \
    2>&1 | tee "$OUT/tests.log"
  tests_rc=${PIPESTATUS[0]}
else skipped "op tests"; tests_rc=124; fi

# bench: the one runner's options for both GPU scripts (budget under the step's cap; rows
# appended to $OUT/results.jsonl, kept on SIGTERM).
bench() {
  local script=$1 t=$2 name=$3; shift 3
  TRITON_INTERPRET=0 timeout -k 10 "$t" python3 "benchmarks/$script" --budget $(( t > 30 ? t - 15 : t / 2 )) \
    --results "$OUT/results.jsonl" --run "${name}_$(date -u +%F)" --md "$OUT/$name.md" "$@" \
    2>&1 | tee -a "$OUT/bench.log"
  return "${PIPESTATUS[0]}"
}

t=$(cap 150)
if (( t > 0 )); then
  bench bench_dbpr_gpu.py "$t" bench_dbpr_gpu --summary "$SCRATCH/bench_dbpr_summary.md"; bench_dbpr_rc=$?
else skipped "DBPR bench"; bench_dbpr_rc=124; fi

# GUIDER training on the GPU: seconds per epoch with the torch and triton backends (Baby-sized
# synthetic data, 2 epochs each); each run's metrics become a row of $OUT/results.jsonl.
t=$(cap 70)
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
  bench bench_gpu.py "$t" bench_gpu; bench_rc=$?
else skipped "Sinkhorn bench"; bench_rc=124; fi

{
  echo "op tests rc=$tests_rc dbpr bench rc=$bench_dbpr_rc sinkhorn bench rc=$bench_rc" \
    "($(( SECONDS - START )) s)"
  grep -E "FAILED|ERROR" "$OUT/tests.log" 2>/dev/null | head -n 20
  tail -n 3 "$OUT/tests.log" 2>/dev/null
  echo "results: $(wc -l < "$OUT/results.jsonl" 2>/dev/null || echo 0) rows in \$OUT/results.jsonl"
} | tee -a "$OUT/device.txt"
cat "$OUT/bench_gpu.md" 2>/dev/null
cat "$SCRATCH/bench_dbpr_summary.md" 2>/dev/null | tee -a "$OUT/device.txt"
exit $(( tests_rc != 0 || bench_rc != 0 || bench_dbpr_rc != 0 ))
