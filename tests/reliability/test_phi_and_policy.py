"""PHI hygiene and the location policy, on full runs of the real pipeline.

Markers are planted in every place patient data lives (patient and encounter ids, a manifest prompt, the
document text, a quarantined row, an S3-style secret in the environment); every log line, the native
stderr and the Prefect artifact of the run are captured and must contain none of them.
"""

from __future__ import annotations

import logging

import pyarrow.dataset as ds
from PIL import Image

from conftest import batch, write_manifest
from medvlm_core.testing.demo_docs import render_document
from support.reliability_report import record

MARKERS = {
    "patient": "PHI-PATIENT-7731",
    "encounter": "PHI-ENCOUNTER-7732",
    "prompt": "PHI-PROMPT-7733",
    "document": "PHI-DOCTEXT-7734",
    "quarantined": "PHI-QUARANTINE-7735",
    "secret": "SECRET-KEY-7736-abcdefghijklmnop",
}


def test_no_phi_or_secret_in_logs_or_artifacts(tmp_path, tiny_llava, caplog, capfd, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", MARKERS["secret"])
    docs = tmp_path / "documents"
    docs.mkdir()
    render_document("DISCHARGE", [f"Patient {MARKERS['document']}", "Metformin 500 mg"]).save(docs / "a.png")
    Image.new("RGB", (10, 10)).save(docs / "b.png")
    (docs / "c.png").write_bytes(b"not an image " + MARKERS["document"].encode())
    manifest = write_manifest(tmp_path / "m.csv", [
        {"document_id": "a", "image_uri": "documents/a.png", "patient_id": MARKERS["patient"],
         "encounter_id": MARKERS["encounter"], "prompt": f"Summarise for {MARKERS['prompt']}"},
        {"document_id": "b", "image_uri": "documents/missing.png", "patient_id": MARKERS["patient"]},
        {"document_id": "c", "image_uri": "documents/c.png", "patient_id": MARKERS["patient"]},
        {"document_id": "d", "image_uri": "documents/b.png", "patient_id": MARKERS["quarantined"], "page": "-3"},
    ])
    caplog.set_level(logging.DEBUG)
    state = batch(manifest=str(manifest), output=str(tmp_path / "out"), model=str(tiny_llava.model_path),
                         mmproj=str(tiny_llava.mmproj_path), max_tokens=4, n_ctx=4096, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert (summary["pages_ok"], summary["pages_error"], summary["quarantined_rows"]) == (1, 2, 1)

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifacts = [a.data for a in client.read_artifacts() if a.key == "medvlm-run-summary"]
    assert any(summary["run_id"] in str(a) for a in artifacts)
    captured = capfd.readouterr()
    text = "\n".join([caplog.text, captured.out, captured.err, *map(str, artifacts), state.message or ""])
    assert "chunk 0" in caplog.text  # the logs were captured
    leaked = [name for name, marker in MARKERS.items() if marker in text]
    record("PHI: planted markers in logs/stderr/artifact", inputs=len(MARKERS), faults={"leaked": len(leaked)})
    assert leaked == []
    # the data itself is where it belongs: in the output tables
    rows = ds.dataset(tmp_path / "out" / "completions", partitioning="hive").to_table().to_pylist()
    assert {r["patient_id"] for r in rows} == {MARKERS["patient"]}
    [run] = ds.dataset(tmp_path / "out" / "runs", partitioning="hive").to_table().to_pylist()
    assert MARKERS["secret"] not in str(run)


def test_location_policy_quarantines_documents_outside_and_refuses_outputs(tmp_path, tiny_llava):
    allowed = tmp_path / "allowed"
    (allowed / "docs").mkdir(parents=True)
    Image.new("RGB", (50, 50), "white").save(allowed / "docs" / "ok.png")
    outside = tmp_path / "outside.png"
    Image.new("RGB", (50, 50), "white").save(outside)
    (allowed / "docs" / "link.png").symlink_to(outside)
    manifest = write_manifest(allowed / "m.csv", [
        {"document_id": "ok", "image_uri": "docs/ok.png"},
        {"document_id": "dotdot", "image_uri": "docs/../../outside.png"},
        {"document_id": "abs", "image_uri": str(outside)},
        {"document_id": "etc", "image_uri": "file:///etc/passwd"},
        {"document_id": "other-bucket", "image_uri": "s3://someone-elses-bucket/x.png"},
        {"document_id": "symlink", "image_uri": "docs/link.png"},
        {"document_id": "web", "image_uri": "https://example.org/x.png"},
    ])
    model_dir = str(tiny_llava.model_path.parent)
    params = dict(manifest=str(manifest), output=str(allowed / "out"), model=str(tiny_llava.model_path),
                  mmproj=str(tiny_llava.mmproj_path), max_tokens=2, n_ctx=4096,
                  allowed_locations=[str(allowed), model_dir])
    summary = batch(**params)
    assert (summary["pages_ok"], summary["quarantined_rows"], summary["reconciled"]) == (1, 6, True)
    reasons = {q["row_number"]: q["reason"] for q in
               ds.dataset(allowed / "out" / "quarantine", partitioning="hive").to_table().to_pylist()}
    for row in (2, 3, 4, 5, 6):
        assert reasons[row] == f"row {row}: image_uri is outside the allowed locations of this deployment"
    assert "image_uri must be s3://" in reasons[7]
    record("policy: documents outside the allow-list", inputs=7, faults={"outside": 6},
           rows_lost=7 - summary["pages_ok"] - summary["quarantined_rows"])

    state = batch(return_state=True, **dict(params, output=str(tmp_path / "elsewhere")))
    assert state.is_failed() and "output" in state.message and "outside the allowed locations" in state.message
    assert not (tmp_path / "elsewhere").exists()
