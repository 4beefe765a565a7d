"""SIGKILL while a run publishes, then a re-run: the interrupted publish is finished (rolled forward), every
page has exactly one ok row, and nothing staged is visible to readers.

The ``medvlm`` command runs as a real subprocess; the test watches the output folder and kills the
process group the moment the run's first table file is published (before its commit record).
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from conftest import write_manifest
from support.reliability_report import record

pytestmark = pytest.mark.e2e  # pytest -m 'not e2e' leaves these out

MEDVLM = str(Path(sys.executable).with_name("medvlm"))


def table(out: Path, name: str):
    return ds.dataset(out / name, format="parquet", partitioning="hive").to_table()


def start_run(manifest: Path, out: Path, model, env) -> subprocess.Popen:
    return subprocess.Popen(
        [MEDVLM, "run", "--manifest", str(manifest), "--output", str(out), "--model", str(model.model_path),
         "--mmproj", str(model.mmproj_path), "--mode", "structured", "--max-tokens", "96", "--chunk-size", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )


def kill_when_publishing(proc: subprocess.Popen, out: Path, timeout: float = 240) -> bool:
    """SIGKILL the run's process group as soon as a table file is published; True if its commit was not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if glob.glob(str(out / "completions" / "run_date=*" / "part-*.parquet")):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return not glob.glob(str(out / "_commits" / "*.json"))
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return False


def test_kill_during_publishing_then_rerun(tmp_path, tiny_qwen, demo_docs):
    records = [dict(r, document_id=f"{r['document_id']}-{i}") for i in range(4) for r in demo_docs]
    manifest = write_manifest(tmp_path / "m.csv", records)
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), MEDVLM_CACHE_DIR=str(tmp_path / "cache"),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    for attempt in range(3):  # the publish window is short: try again if the kill landed after the commit
        out = tmp_path / f"out{attempt}"
        if kill_when_publishing(start_run(manifest, out, tiny_qwen, env), out):
            break
    else:
        raise AssertionError("could not kill a run while it was publishing in 3 attempts")

    # What a reader sees after the kill: some tables of the killed run, no runs row, no commit.
    assert not (out / "runs").exists() or table(out, "runs").num_rows == 0
    staged = list((out / "_staging").iterdir())
    assert len(staged) == 1 and (staged[0] / "_publish.json").exists()
    killed_run = staged[0].name

    rerun = start_run(manifest, out, tiny_qwen, env)
    log, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, log[-3000:]
    assert f"finished publishing run {killed_run}" in log
    assert "12 skipped" in log  # every page was done by the killed run, now published

    completions = table(out, "completions").to_pylist()
    keys = Counter(r["result_key"] for r in completions if r["status"] == "ok")
    record("SIGKILL while publishing, then a re-run", inputs=len(records), faults={"SIGKILL": 1 + attempt},
           rows_lost=len(records) - len(keys))
    assert len(keys) == 12 and set(keys.values()) == {1}  # exactly one ok row per key
    assert {r["run_id"] for r in completions} == {killed_run}
    runs = table(out, "runs").to_pylist()
    assert len(runs) == 2 and {r["run_id"] for r in runs} >= {killed_run}
    killed_row = next(r for r in runs if r["run_id"] == killed_run)
    assert (killed_row["pages_ok"], killed_row["reconciled"]) == (12, True)
    assert next(r for r in runs if r["run_id"] != killed_run)["skipped_pages"] == 12
    for name in ("diagnoses", "medications", "instructions", "runs"):  # every table of the killed run published
        assert len(glob.glob(str(out / name / "run_date=*" / f"*-{killed_run}.parquet"))) == 1, name
    assert len(list((out / "_commits").glob("*.json"))) == 2
    assert not (out / "_staging").exists() or not any((out / "_staging").iterdir())
