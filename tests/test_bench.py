"""The benchmark harness's quick mode runs end to end (no timing is asserted: figures live in BENCHMARKS.md)."""

from __future__ import annotations

import pytest

import json
import os
import subprocess
import sys
from pathlib import Path

pytestmark = pytest.mark.e2e  # pytest -m 'not e2e' leaves these out

ROOT = Path(__file__).resolve().parents[1]


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
    flow = rows[("flow", 2, True)]  # --quick: the default (isolated) flow only
    assert flow["docs"] == 3 and flow["engine_alone_docs_per_s"] > 0 and flow["x_engine_same_pages"] > 0
    assert rows[("plan", None, None)]["rows"] == 2000 and rows[("plan", None, None)]["task_runs"] == 32  # 2000 rows, 64 a task (8 x n_parallel 8)
    assert "the engine alone on the same pages" in done.stdout
