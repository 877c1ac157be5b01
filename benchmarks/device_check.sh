#!/usr/bin/env bash
# The device check: one call on the lent GPU machine runs the GPU tests of every backend
# and the GPU benchmark matrix, and writes a report under $OUT.
#
#   run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=480)
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

# Compiled kernels, not the interpreter that tests/conftest.py switches on by default.
TRITON_INTERPRET=0 timeout 200 python3 -m pytest tests/test_gpu.py tests/test_dispatch_cli.py -q -rs \
  -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

timeout 230 python3 benchmarks/bench_gpu.py --json "$OUT/bench_gpu.json" --md "$OUT/bench_gpu.md" \
  2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "tests rc=$tests_rc bench rc=$bench_rc" | tee -a "$OUT/device.txt"
cat "$OUT/bench_gpu.md" 2>/dev/null
exit $(( tests_rc != 0 || bench_rc != 0 ))
