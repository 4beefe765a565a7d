"""What a run shows in Prefect, read back from the server's API: a flow run named for what it does, the
summary, counts and link artifacts, and the ``medvlm.run.published`` event with the counts (no document data)."""

from __future__ import annotations

import time

from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventNameFilter

from conftest import batch, write_manifest


def test_a_run_names_itself_writes_its_artifacts_and_emits_published(tmp_path, tiny_llava, demo_docs):
    manifest = write_manifest(tmp_path / "discharge-batch.csv", demo_docs + [{"document_id": "", "image_uri": "x.png"}])
    state = batch(manifest=str(manifest), output=str(tmp_path / "out"), model=str(tiny_llava.model_path),
                  mmproj=str(tiny_llava.mmproj_path), max_tokens=4, n_ctx=4096, chunk_size=1, return_state=True)
    summary = state.result()
    run_id = summary["run_id"]
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
        assert flow_run.name == f"batch discharge-batch.csv {run_id.rsplit('-', 1)[1]}"
        artifacts = {a.key: a for a in client.read_artifacts() if a.flow_run_id == flow_run.id}
        assert {"medvlm-run-summary", "medvlm-run-counts", "medvlm-run-output"} <= set(artifacts)
        # written while the publish task finishes its bookkeeping, but the flow run's, not the task's
        assert all(artifacts[k].task_run_id is None for k in ("medvlm-run-summary", "medvlm-run-counts", "medvlm-run-output"))
        assert f"| pages ok | 3 |" in artifacts["medvlm-run-summary"].data and "completions" in artifacts["medvlm-run-summary"].data
        [progress] = [a for a in client.read_artifacts() if a.flow_run_id == flow_run.id and a.type == "progress"]
        assert progress.data == 100.0 and "manifest rows done of 3" in progress.description  # the valid rows
        counts = {(r["status"], r["error_type"]): r["pages"] for r in _table(artifacts["medvlm-run-counts"].data)}
        assert counts[("ok", "")] == 3 and counts[("quarantined (rows)", "")] == 1
        assert artifacts["medvlm-run-output"].data.startswith("[") and str(tmp_path / "out") in artifacts["medvlm-run-output"].data

    event = None
    deadline = time.monotonic() + 60  # events reach the server asynchronously
    while event is None and time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            page = client.read_events(filter=EventFilter(event=EventNameFilter(name=["medvlm.run.published"])), limit=50)
        event = next((e for e in page.events if e.payload.get("run_id") == run_id), None)
        time.sleep(0.5)
    assert event is not None, "no medvlm.run.published event"
    assert event.resource.id == f"medvlm.output.{tmp_path / 'out'}"
    assert (event.payload["pages_ok"], event.payload["quarantined_rows"], event.payload["reconciled"]) == (3, 1, True)
    assert not any(d["document_id"] in str(event.payload) for d in demo_docs)  # counts only


def _table(data):
    import json

    rows = json.loads(data) if isinstance(data, str) else data
    return rows


def test_report_flow_writes_the_query_and_keeps_document_data_out_of_prefect(tmp_path, tiny_llava, demo_docs):
    import pyarrow.parquet as pq

    from medvlm.flows.report import medvlm_report

    output = tmp_path / "out"
    batch_state = batch(manifest=str(write_manifest(tmp_path / "m.csv", demo_docs)), output=str(output),
                        model=str(tiny_llava.model_path), mmproj=str(tiny_llava.mmproj_path), max_tokens=4, n_ctx=4096,
                        return_state=True)
    run_id = batch_state.result()["run_id"]
    with get_client(sync_client=True) as client:  # one chunk: its three artifacts (written at once), no progress
        batch_artifacts = [a for a in client.read_artifacts() if a.flow_run_id == batch_state.state_details.flow_run_id]
    assert sorted(a.key or a.type for a in batch_artifacts) == ["medvlm-run-counts", "medvlm-run-output", "medvlm-run-summary"]
    throughput = medvlm_report(output=str(output), run_id=run_id)
    assert [r["run_id"] for r in pq.read_table(throughput["report"]).to_pylist()] == [run_id]

    state = medvlm_report(output=str(output), run_id=run_id, query_name="document_status", return_state=True)
    report = state.result()
    rows = pq.read_table(report["report"]).to_pylist()
    assert sorted(r["document_id"] for r in rows) == sorted(d["document_id"] for d in demo_docs)
    with get_client(sync_client=True) as client:
        [artifact] = [a for a in client.read_artifacts() if a.flow_run_id == state.state_details.flow_run_id]
    assert "3 rows" in artifact.data and not any(d["document_id"] in artifact.data for d in demo_docs)

    failed = medvlm_report(output=str(output), query_name="no_such_query", return_state=True)
    assert failed.is_failed() and "unknown query 'no_such_query'" in failed.message
