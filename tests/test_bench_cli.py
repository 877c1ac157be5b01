"""``guider-fast bench``: reports from small pytest-benchmark fixtures (tests/fixtures/, cut
from committed runs) and the results layout (no benchmark run).

The real run (``--quick``, ~1 min on 2 vCPUs) is opt-in: GUIDER_FAST_BENCH_RUN=1.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import pytest

from guider_fast import bench

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
RESULTS = ["bench_cpu.json", "bench_dbpr_cpu.json"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _args(*argv):
    parser = argparse.ArgumentParser(prog="guider-fast bench")
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def _json(name):
    return FIXTURES / name


def _tables(markdown):
    """{group name: {contender: ratio cell}} from the per-group sections of bench.md."""
    tables, group = {}, None
    for line in markdown.splitlines():
        if line.startswith("### G"):
            group = line.split(": ", 1)[1]
            tables[group] = {}
        elif group is not None and line.startswith("| ") and not line.startswith("| contender"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            tables[group][cells[0].replace(" (baseline)", "")] = cells[-1]
    return tables


def _expected_ratios(results):
    """Direct computation: median / the median of the group's extra_info["baseline"] benchmark."""
    groups = {}
    for b in results["benchmarks"]:
        groups.setdefault(b["group"], []).append(b)
    expected = {}
    for group, benches in groups.items():
        (base,) = [b for b in benches if b["extra_info"].get("baseline")]
        expected[group] = {b["extra_info"]["contender"]: b["stats"]["median"] / base["stats"]["median"]
                           for b in benches}
    return expected


@pytest.mark.parametrize("name", RESULTS)
def test_from_json_markdown_has_groups_and_ratios(name, tmp_path, capsys):
    path = _json(name)
    results = json.loads(path.read_text())
    assert bench.run(_args("--from-json", str(path), "--out", str(tmp_path))) == 0
    text = (tmp_path / "bench.md").read_text()
    assert text.strip() in capsys.readouterr().out  # printed as well

    expected = _expected_ratios(results)
    tables = _tables(text)
    assert set(tables) == set(expected)
    for group, ratios in expected.items():
        assert set(tables[group]) == set(ratios), group
        for contender, ratio in ratios.items():
            assert float(tables[group][contender]) == pytest.approx(ratio, abs=0.0051), (group, contender)
    assert "## Summary" in text


def test_known_groups_and_summary_rows(tmp_path):
    text_cpu = bench.markdown(bench.collect(json.loads(_json("bench_cpu.json").read_text())))
    assert "### G1: dbpr_loss forward+backward | B=65536, K=1 negative" in text_cpu
    assert "calibrate | B=2048, 64-d rows, 64-bit codes" in text_cpu
    assert "sinkhorn fixed eps, 100 iters | (B, n, m) = (128, 128, 128), d = 64 | forward" in text_cpu
    text_dbpr = bench.markdown(bench.collect(json.loads(_json("bench_dbpr_cpu.json").read_text())))
    assert "dbpr training step | 20,000 users x 7,000 items, D=64, B=2,048, K=1, uniform indices" in text_dbpr
    # Summary: best/worst over non-guider_fast contenders, the baseline named per group.
    summary = [line for line in text_dbpr.splitlines() if line.startswith("| G") and "| group |" not in line]
    assert len(summary) == 2
    assert all("| guider_fast sgd |" in line for line in summary)
    assert not any("(guider_fast" in line for line in summary)


def test_summary_best_and_worst_match_the_json():
    results = json.loads(_json("bench_cpu.json").read_text())
    for group in bench.collect(results):
        medians = {b["extra_info"]["contender"]: b["stats"]["median"]
                   for b in results["benchmarks"] if b["group"] == group.name}
        rivals = {c: m / medians["guider_fast"] for c, m in medians.items()
                  if not c.startswith("guider_fast")}
        got = {e.contender: e.ratio for e in group.competitors()}
        assert got == pytest.approx(rivals)
        assert group.baseline.contender == "guider_fast"


def test_png_written(tmp_path):
    pytest.importorskip("matplotlib")
    assert bench.run(_args("--from-json", str(_json("bench_dbpr_cpu.json")), "--out", str(tmp_path))) == 0
    assert (tmp_path / "bench_ratios.png").read_bytes()[:8] == PNG_SIGNATURE


def test_without_matplotlib_markdown_only(tmp_path, capsys, monkeypatch):
    for module in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert bench.run(_args("--from-json", str(_json("bench_cpu.json")), "--out", str(tmp_path))) == 0
    assert (tmp_path / "bench.md").is_file()
    assert not (tmp_path / "bench_ratios.png").exists()
    assert "pip install matplotlib" in capsys.readouterr().out


def test_gpu_style_json_without_groups_or_baseline_flag(tmp_path):
    """bench_sinkhorn.py sets no group and no baseline flag; it records device_ms."""
    def gpu(contender, mode, device_ms, host_s=1.0):
        return {"group": None, "name": f"test_sinkhorn_gpu[{mode}-{contender}-B1024_n64_m64_d64]",
                "param": f"{mode}-{contender}-B1024_n64_m64_d64", "stats": {"median": host_s, "rounds": 1},
                "extra_info": {"contender": contender, "mode": mode, "workload": [1024, 64, 64, 64],
                               "device_ms": device_ms}}

    results = {"benchmarks": [gpu("guider_fast triton", "forward", 2.0),
                              gpu("guider_fast torch", "forward", 5.0),
                              gpu("POT solve_sample_batch", "forward", 8.0),
                              gpu("GeomLoss tensorized", "forward", 1.0),
                              {"group": "orphans", "name": "test_x[a]", "stats": {"median": 0.5, "rounds": 3},
                               "extra_info": {"contender": "a"}}]}
    groups = {g.name: g for g in bench.collect(results)}
    gpu_group = groups["test_sinkhorn_gpu | 1024x64x64x64 | forward"]
    assert gpu_group.device_time and gpu_group.baseline.contender == "guider_fast triton"
    assert {e.contender: e.ratio for e in gpu_group.entries} == pytest.approx(
        {"guider_fast triton": 1.0, "guider_fast torch": 2.5, "POT solve_sample_batch": 4.0,
         "GeomLoss tensorized": 0.5})
    assert [e.contender for e in gpu_group.competitors()] == ["GeomLoss tensorized", "POT solve_sample_batch"]
    orphans = groups["orphans"]
    assert orphans.baseline is None and orphans.entries[0].ratio is None

    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(results))
    assert bench.run(_args("--from-json", str(path), "--out", str(tmp_path / "out"))) == 0
    text = (tmp_path / "out" / "bench.md").read_text()
    assert "No guider_fast contender in this group: no ratios." in text
    assert "| a | 500.00 | 3 | - |" in text
    assert "| device ms |" in text


def test_empty_or_unreadable_json(tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmarks": []}))
    assert bench.run(_args("--from-json", str(empty), "--out", str(tmp_path))) == 1
    assert bench.run(_args("--from-json", str(tmp_path / "missing.json"), "--out", str(tmp_path))) == 2
    err = capsys.readouterr().err
    assert "no benchmark results" in err and "cannot read" in err


def test_missing_suite_exits_2(tmp_path, capsys):
    assert bench.run(_args("--suite", str(tmp_path / "nowhere"), "--out", str(tmp_path))) == 2
    err = capsys.readouterr().err
    assert "benchmark suite not found" in err and "--suite" in err and "--from-json" in err
    assert err.strip().count("\n") == 0  # one line
    assert not (tmp_path / "bench.json").exists()


def test_rows_keep_every_statistic():
    """pytest-benchmark JSON -> rows of the results layout: nothing measured is dropped."""
    results = json.loads(_json("bench_cpu.json").read_text())
    rows = bench.rows_from_pytest(results, run="fixture")
    assert len(rows) == len(results["benchmarks"])
    for row, b in zip(rows, results["benchmarks"]):
        assert set(bench.ROW_FIELDS) <= set(row)
        assert row["median"] == b["stats"]["median"] and row["min"] == b["stats"]["min"]
        assert row["extra"]["stats"]["mean"] == b["stats"]["mean"] and row["rounds"] == b["stats"]["rounds"]
        assert row["group"] == b["group"] and row["baseline"] == b["extra_info"]["baseline"]
        assert row["commit"] == "4b372cf" and row["date"].startswith("2026-11-27") and row["device"] == "AMD EPYC"


def test_from_jsonl_rows_same_tables(tmp_path, capsys):
    """--from-json reads a results JSON-lines file too, with the same ratios as the JSON it came from."""
    path = _json("bench_cpu.json")
    rows_path = tmp_path / "results.jsonl"
    bench.write_rows(bench.rows_from_pytest(json.loads(path.read_text()), run="a"), rows_path)
    assert bench.run(_args("--from-json", str(rows_path), "--out", str(tmp_path / "rows"))) == 0
    assert bench.run(_args("--from-json", str(path), "--out", str(tmp_path / "json"))) == 0
    assert _tables((tmp_path / "rows" / "bench.md").read_text()) == _tables((tmp_path / "json" / "bench.md").read_text())
    # A second run in the same file: its groups stay apart (prefixed with the run).
    bench.write_rows(bench.rows_from_pytest(json.loads(path.read_text()), run="b"), rows_path)
    groups = bench.collect_rows(bench.read_rows(rows_path))
    assert len(groups) == 2 * len(bench.collect(json.loads(path.read_text())))
    assert all(g.name.startswith(("a: ", "b: ")) for g in groups)


def test_peak_memory_metric_and_skipped_rows():
    rows = [dict(op="peak", contender="guider_fast", shape="s", group="g", peak_mb=10.0, median=None),
            dict(op="peak", contender="POT", shape="s", group="g", peak_mb=25.0, median=None),
            dict(op="t", contender="guider_fast triton", shape="s", group="h", median=0.002, min=0.001),
            dict(op="t", contender="POT", shape="s", group="h", median=None, skipped="not importable")]
    memory = bench.collect_rows(rows, metric=bench.PEAK_MB)
    assert [(e.contender, e.ratio) for e in memory[0].entries] == [("guider_fast", 1.0), ("POT", 2.5)]
    (timed,) = bench.collect_rows(rows)
    assert timed.baseline.contender == "guider_fast triton"
    text = "\n".join(bench.group_table(timed))
    assert "| POT | skipped: not importable |" in text and "| guider_fast triton (baseline) | 2.000 | 1.000 |" in text


def test_committed_results_layout():
    """benchmarks/results/results.jsonl (a source checkout): every row has the layout's fields."""
    path = BENCHMARKS / "results" / "results.jsonl"
    if not path.is_file():
        pytest.skip("not a source checkout")
    rows = bench.read_rows(path)
    assert rows and all(set(bench.ROW_FIELDS) <= set(r) and r.get("run") for r in rows)
    assert all(r["commit"] and r["date"] and r["device"] for r in rows)


def test_library_does_not_import_benchmarks():
    source = Path(bench.__file__).read_text()
    assert "import report" not in source and "sys.path" not in source


def test_default_suite_is_next_to_the_source():
    if not BENCHMARKS.is_dir():
        pytest.skip("not a source checkout")
    assert bench.find_suite(None) == BENCHMARKS


def test_quick_command(tmp_path):
    cmd = bench.pytest_command(BENCHMARKS, ["sinkhorn", "ops"], tmp_path / "b.json", quick=True, keyword=None)
    assert cmd[:3] == [sys.executable, "-m", "pytest"]
    assert "benchmarks/bench_sinkhorn_cpu.py" in cmd and "benchmarks/bench_ops_cpu.py" in cmd
    assert "--benchmark-only" in cmd and f"--benchmark-json={tmp_path / 'b.json'}" in cmd
    k = cmd[cmd.index("-k") + 1]
    assert k == f"{bench.QUICK_K['sinkhorn']} or {bench.QUICK_K['ops']}"
    plain = bench.pytest_command(BENCHMARKS, ["dbpr"], tmp_path / "b.json", quick=False, keyword=None)
    assert "-k" not in plain
    assert bench._selected(None) == ["sinkhorn", "ops", "dbpr", "gpu"]
    assert bench._selected(["ops", "ops", "dbpr"]) == ["ops", "dbpr"]


def test_pytest_failure_is_the_exit_status(tmp_path, capsys):
    """A run that selects nothing: pytest exits 5, no JSON, no report (~5 s, collection only)."""
    if not BENCHMARKS.is_dir():
        pytest.skip("not a source checkout")
    status = bench.run(_args("--select", "ops", "-k", "no_such_benchmark", "--out", str(tmp_path)))
    assert status == 5
    assert "pytest wrote no" in capsys.readouterr().err
    assert not (tmp_path / "bench.md").exists()


def test_cli_subcommand(tmp_path, capsys):
    """Once cli.py wires ``guider-fast bench`` (skipped until then)."""
    from guider_fast import cli

    try:
        status = cli.main(["bench", "--from-json", str(_json("bench_cpu.json")), "--out", str(tmp_path)])
    except SystemExit as exit_:  # argparse: invalid choice 'bench'
        pytest.skip(f"guider-fast bench is not wired in cli.py yet ({exit_.code})")
    assert status == 0
    assert (tmp_path / "bench.md").is_file()


@pytest.mark.skipif(os.environ.get("GUIDER_FAST_BENCH_RUN") != "1",
                    reason="runs benchmarks (~10 s); set GUIDER_FAST_BENCH_RUN=1")
def test_real_quick_run(tmp_path):
    if not BENCHMARKS.is_dir():
        pytest.skip("not a source checkout")
    args = _args("--select", "ops", "-k", "test_calibrate and 2048]", "--out", str(tmp_path))
    assert bench.run(args) == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    assert {b["group"] for b in results["benchmarks"]} == {"calibrate | B=2048, 64-d rows, 64-bit codes"}
    assert "calibrate | B=2048" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench_ratios.png").is_file() or "matplotlib" not in sys.modules
