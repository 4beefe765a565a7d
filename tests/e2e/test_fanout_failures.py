"""A fan-out whose shards cannot run loses nothing: every row becomes an error row and the run fails loudly."""

from __future__ import annotations

import asyncio

import pyarrow.dataset as ds

from conftest import write_manifest
from medvlm.flows.fanout import medvlm_fanout
from medvlm_core.output.paths import OutputLayout
from medvlm_core.storage import Storage


def test_failed_shards_become_error_rows_and_fail_the_run(tmp_path, tiny_llava, demo_docs):
    manifest = write_manifest(tmp_path / "m.csv", demo_docs + [{"document_id": "", "image_uri": "x.png"}])
    output = tmp_path / "out"
    state = asyncio.run(medvlm_fanout(
        manifest=str(manifest), output=str(output), model=str(tiny_llava.model_path), mmproj=str(tiny_llava.mmproj_path),
        options={"max_tokens": 2, "n_ctx": 4096}, shard_size=2, max_shard_attempts=2,
        shard_deployment="medvlm-shard/does-not-exist", return_state=True,
    ))
    assert state.is_failed()
    assert "2 of 2 shard(s) failed" in state.message and "shard 0: could not launch" in state.message
    rows = ds.dataset(output / "completions", partitioning="hive").to_table().to_pylist()
    assert sorted((r["document_id"], r["status"], r["error_type"]) for r in rows) == [
        ("discharge-0001", "error", "task_failed"), ("lab-0003", "error", "task_failed"), ("rx-0002", "error", "task_failed"),
    ]
    assert all("after 2 attempt(s)" in r["error_message"] for r in rows)
    [run] = ds.dataset(output / "runs", partitioning="hive").to_table().to_pylist()
    assert (run["manifest_rows"], run["quarantined_rows"], run["pages_error"], run["reconciled"]) == (4, 1, 3, True)
    assert Storage().list_files(OutputLayout.of(str(output)).run_staging(run["run_id"]), ".parquet") == []

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # the summary artifact is written from the async flow too
        assert any(run["run_id"] in (a.data or "") for a in client.read_artifacts() if a.key == "medvlm-run-summary")
