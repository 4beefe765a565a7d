"""The benchmark harness's quick mode runs end to end (no timing is asserted: figures live in docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # pytest -m 'not e2e' leaves these out

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_measures_every_path(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), MEDVLM_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["path"], r.get("parallel"), r.get("overlap", r.get("isolate"))): r for r in report["results"]}
    assert set(rows) >= {("naive", 1, None), ("engine", 1, False), ("engine", 2, False), ("engine", 2, True),
                         ("flow", 2, True), ("plan", None, None)}
    for key, r in rows.items():
        if key[0] in ("naive", "engine"):
            assert r["docs"] == 3 and r["docs_per_s"] > 0 and r["gen_tok_per_s"] > 0, key
        if key[0] == "engine":
            assert r["encode_ms_per_page"] > 0
    # --quick: the default (isolated) flow only, with Prefect's heartbeat and without
    flows = [r for r in report["results"] if r["path"] == "flow"]
    assert [(r["isolate"], r["prefect_heartbeat"]) for r in flows] == [(True, True), (True, False)]
    for flow in flows:
        assert flow["docs"] == 3 and flow["engine_alone_docs_per_s"] > 0 and flow["x_engine_same_pages"] > 0
        # each flow run followed by its engine alone, on decoded pages and on the page files
        assert len(flow["walls_s"]) == len(flow["engine_alone_walls_s"]) == len(flow["engine_from_files_walls_s"]) == 1
        assert 0 < flow["x_engine_same_pages"] < flow["x_engine_to_completed"]  # the call holds the flow's body and more
        assert 0 < flow["x_engine_same_pages_total"] < flow["x_engine_to_completed_total"]
        # one pair: its interval is its own ratio
        for total in ("x_engine_to_completed_total", "x_engine_from_files_to_completed_total"):
            assert flow[total + "_ci95"] == pytest.approx([flow[total]] * 2)
        assert len(flow["prefect_exits_s"]) == 1 and flow["prefect_exit_s"] == flow["prefect_exits_s"][0]
        assert 0 < flow["x_engine_from_files"] < flow["x_engine_from_files_to_completed"]
        assert 0 < flow["prefect_exit_s"] < flow["wall_s"]
        # the CPU each process spent: the harness's own process always, the isolated engine's child when it works
        assert len(flow["cpu_s_flow"]) == len(flow["cpu_s_engine_from_files"]) == 1
        assert flow["cpu_s_flow"][0]["harness"] > 0 and flow["cpu_s_engine_from_files"][0]["engine child"] > 0
    # the isolated engine with libgomp's spinning threads and with the passive policy, each on the flow's pages
    openmp = [r for r in report["results"] if r["path"] == "openmp"]
    assert [r["openmp_wait"] for r in openmp] == ["spin", "passive"]
    assert all(r["docs"] == 3 and len(r["walls_s"]) == 1 and r["docs_per_s"] > 0 for r in openmp)
    sleeps = [r for r in report["results"] if r["path"] == "prefect"]
    assert [(r["body_s"], r["prefect_heartbeat"]) for r in sleeps] == [
        (body, heartbeat) for heartbeat in (True, False) for body in (0.2, 0.7, 1.2, 1.7)]
    assert all(r["call_s"] > r["body_s"] + r["exit_s"] for r in sleeps)
    assert rows[("plan", None, None)]["rows"] == 2000 and rows[("plan", None, None)]["task_runs"] == 16  # 2000 rows, 128 a task (MEDVLM_CHUNK_SIZE)
    assert "its engine alone on the same pages" in done.stdout


def test_quick_scale_harness_measures_every_step(tmp_path):
    out = tmp_path / "scale.json"
    done = subprocess.run([sys.executable, "-m", "bench.scale", "--quick", "--dir", str(tmp_path / "w"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no inference runs" in done.stdout
    [r] = json.loads(out.read_text())["results"]
    assert r["manifest_rows"] == r["parent_plan"]["valid"] == 2000 and r["parent_plan"]["shards"] == 8
    assert r["shard_startup"]["rows"] == r["shard_startup_before"]["rows"] == 256
    # the shard's own documents' keys only, against every key of the history before
    assert 0 < r["shard_startup"]["done_keys"] < r["shard_startup_before"]["done_keys"] == r["done_keys_whole_history"]["done_keys"]
    assert r["index_build"]["runs"] == 10 and r["publish_index"]["buckets_rewritten"] > 0
    assert r["prefect_runs"] == {**r["prefect_runs"], "flow_runs": 9, "shard_runs": 8, "task_runs": 16}
    assert all(r[k]["peak_rss_mb"] > 0 for k in ("parent_plan", "shard_startup", "publish_index"))


def test_gpu_script_cpu_quick_mode_prints_one_table_and_writes_json(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "gpu"), PYTHON=sys.executable, PREFECT_HOME=str(tmp_path / "prefect"),
               MEDVLM_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run(["bash", "bench/gpu.sh", "--cpu-quick"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:] + (tmp_path / "gpu" / "bench.log").read_text()[-3000:]
    summary = json.loads((tmp_path / "gpu" / "gpu.json").read_text())
    assert [s["max_tokens"] for s in summary["settings"]] == [4, 8] and summary["mode"] == "cpu"
    rows = {(r["label"], r["parallel"]): r for r in summary["rows"]}
    assert set(rows) == {("naive", 1), ("engine enc=1", 2), ("engine enc=2", 2)}
    for row in rows.values():
        assert set(row["by_tokens"]) == {"4", "8"}
        assert all(r["docs_per_s"] > 0 and r["x_naive"] > 0 for r in row["by_tokens"].values())
    assert rows[("naive", 1)]["by_tokens"]["4"]["docs"] == 2 and rows[("engine enc=2", 2)]["by_tokens"]["8"]["docs"] == 3
    assert "engine enc=2" in done.stdout and "x server" in done.stdout and "proves the script" in done.stdout


def test_the_interval_of_a_ratio_of_sums_holds_it_and_narrows_with_more_pairs():
    sys.path.insert(0, str(ROOT))
    from bench.run import ratio_of_sums_ci95

    engine = [6.0, 6.4, 5.9, 7.1, 6.6, 6.2, 7.4, 6.0]
    flow = [6.5, 6.6, 6.9, 7.2, 7.4, 6.3, 7.9, 6.8]
    low, high = ratio_of_sums_ci95(engine, flow)
    assert low < sum(engine) / sum(flow) < high < 1.0
    wider = ratio_of_sums_ci95(engine[:3], flow[:3])
    assert wider[1] - wider[0] > high - low
    assert ratio_of_sums_ci95([0.9, 1.8], [1.0, 2.0]) == pytest.approx([0.9, 0.9])  # every pair the same ratio
    assert ratio_of_sums_ci95(engine, flow) == [low, high]  # fixed seed: the same pairs, the same interval
