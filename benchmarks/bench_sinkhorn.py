"""GPU Sinkhorn benchmarks under pytest-benchmark (skipped without CUDA).

pytest-benchmark times the host, so each test records the device time (median of
``triton.testing.do_bench``, CUDA events), peak memory and, for guider_fast's Triton
forward, the roofline floor in ``extra_info``; the host timing is a single round.
``python benchmarks/bench_gpu.py`` prints the same matrix as a table (device_check.sh).
"""

import pytest
import torch

import bench_gpu


@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("GPU benchmarks need a CUDA device")
    pytest.importorskip("triton")
    return torch.device("cuda")


@pytest.mark.parametrize("workload", bench_gpu.WORKLOADS, ids=lambda w: "B{}_n{}_m{}_d{}".format(*w))
@pytest.mark.parametrize("contender", ["guider_fast triton", "guider_fast torch", "POT solve_sample_batch",
                                       "GeomLoss tensorized"])
@pytest.mark.parametrize("mode", bench_gpu.MODES)
def test_sinkhorn_gpu(benchmark, cuda, workload, contender, mode):
    x, y, eps = bench_gpu._inputs(*workload, cuda)
    fns = bench_gpu._contenders(x, y, eps)[contender]
    if isinstance(fns, str):
        pytest.skip(fns)
    fn = fns[bench_gpu.MODES.index(mode)]
    if fn is None:
        pytest.skip(f"{contender} has no {mode} variant here")
    ms, peak_mb = bench_gpu._measure(fn)
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), device_ms=ms, peak_mb=peak_mb,
                                workload=list(workload), contender=contender, mode=mode)
    if contender == "guider_fast triton" and mode == "forward":
        regime = bench_gpu.gf.ot.sinkhorn_regime(*workload)
        floor = bench_gpu.roofline(*workload, regime)
        benchmark.extra_info.update(regime=regime, floor_ms=floor["floor_ms"], bound=floor["bound"],
                                    roofline_fraction=floor["floor_ms"] / ms)
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=1, iterations=1)
