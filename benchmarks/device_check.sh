#!/usr/bin/env bash
# The device check: one call on the lent GPU machine runs the GPU tests of every backend
# and the GPU benchmark matrices (Sinkhorn; DBPR and calibration), and writes a report
# under $OUT.
#
#   run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=480)
#
# Time plan: the whole script stops by TOTAL_S = 455 s (under the call's 480 s), every step
# under its own hard timeout, the smaller of its cap and what is left of TOTAL_S:
#   info ~10 s | Sinkhorn + dispatch tests 70 s | DBPR/calibration tests 80 s |
#   DBPR/calibration bench 150 s (its own --budget 135 s, sections in priority order,
#   partial results kept on a kill) | GPU training, torch vs triton backend, 70 s |
#   Sinkhorn bench: what is left, at most 150 s.
# Worst case 10 + 70 + 80 + 150 + 70 + 75 = 455 s; typically the tests finish early and the
# Sinkhorn bench gets most of its 150 s.  (Earlier plan: tests 200 s, Sinkhorn bench 230 s.)
# bench_gpu.py writes its table only at its end: a kill there loses the Sinkhorn table.
#
# The machine has torch and triton but no POT/GeomLoss and no network: to compare with
# them, download their wheels here first and carry .whl; without them the benchmark
# skips those peers with the reason:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl pot==0.9.7.post1 geomloss==0.3.1  The CUDA extension (csrc/)
# does not exist yet: nothing to build.
set -u -o pipefail
START=$SECONDS  # the time plan above counts from here
OUT=${OUT:-/tmp/guider_fast_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# guider_fast from the working tree; kernels/ installs as guider_fast.kernels.
[ -e guider_fast/kernels ] || ln -s ../kernels guider_fast/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

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
t=$(cap 70)
if (( t > 0 )); then
  TRITON_INTERPRET=0 timeout -k 5 "$t" python3 -m pytest tests/test_gpu.py tests/test_dispatch_cli.py -q -rs \
    -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
  tests_rc=${PIPESTATUS[0]}
else skipped "Sinkhorn tests"; tests_rc=124; fi

# -v: each test's outcome is in the log as it finishes, even if the timeout cuts the run.
t=$(cap 80)
if (( t > 0 )); then
  TRITON_INTERPRET=0 timeout -k 5 "$t" python3 -m pytest tests/test_gpu_dbpr.py -v -rs --tb=short \
    -p no:cacheprovider 2>&1 | tee "$OUT/tests_dbpr.log"
  tests_dbpr_rc=${PIPESTATUS[0]}
else skipped "DBPR tests"; tests_dbpr_rc=124; fi

# Stops itself at --budget (sections in priority order); on SIGTERM it kills its worker
# and still writes the rows measured so far.
t=$(cap 150)
if (( t > 0 )); then
  TRITON_INTERPRET=0 timeout -k 10 "$t" python3 benchmarks/bench_dbpr_gpu.py --budget $(( t > 30 ? t - 15 : t / 2 )) \
    --json "$OUT/bench_dbpr_gpu.json" --md "$OUT/bench_dbpr_gpu.md" --summary "$OUT/bench_dbpr_summary.md" \
    2>&1 | tee "$OUT/bench_dbpr.log"
  bench_dbpr_rc=${PIPESTATUS[0]}
else skipped "DBPR bench"; bench_dbpr_rc=124; fi

# GUIDER training on the GPU: seconds per epoch with the torch and triton backends (Baby-sized
# synthetic data, 2 epochs each), metrics JSON per run.
t=$(cap 70)
if (( t > 0 )); then
  for backend in triton torch; do
    timeout -k 5 $(( t / 2 )) python3 -m guider_fast.cli train --device cuda --backend "$backend" --epochs 2 \
      --no-progress --metrics-json "$OUT/train_cuda_$backend.json" 2>&1 | tail -n 8 | tee -a "$OUT/train.log"
  done
else skipped "GPU training"; fi

t=$(cap 150)
if (( t > 0 )); then
  timeout -k 5 "$t" python3 benchmarks/bench_gpu.py --json "$OUT/bench_gpu.json" --md "$OUT/bench_gpu.md" \
    2>&1 | tee "$OUT/bench.log"
  bench_rc=${PIPESTATUS[0]}
else skipped "Sinkhorn bench"; bench_rc=124; fi

{
  echo "tests rc=$tests_rc dbpr tests rc=$tests_dbpr_rc dbpr bench rc=$bench_dbpr_rc bench rc=$bench_rc" \
    "($(( SECONDS - START )) s)"
  tail -n 3 "$OUT/tests.log" 2>/dev/null
  grep -E "FAILED|ERROR" "$OUT/tests_dbpr.log" 2>/dev/null | head -n 20
  tail -n 2 "$OUT/tests_dbpr.log" 2>/dev/null
} | tee -a "$OUT/device.txt"
cat "$OUT/bench_gpu.md" 2>/dev/null
cat "$OUT/bench_dbpr_summary.md" 2>/dev/null
exit $(( tests_rc != 0 || tests_dbpr_rc != 0 || bench_rc != 0 || bench_dbpr_rc != 0 ))
