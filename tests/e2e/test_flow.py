"""The real medvlm-batch Prefect flow on the tiny models, asserting on the Parquet tables users get."""

from __future__ import annotations

import hashlib
import io
import json
import os

import duckdb
import pyarrow.dataset as ds
import pytest
from PIL import Image

from conftest import batch, write_manifest
from medvlm_core.inputs.prompts import PROMPTS, get_prompt


def read(output, table):
    return ds.dataset(os.path.join(output, table), format="parquet", partitioning="hive").to_table().to_pylist()


def sha256_file(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def mixed_manifest(tmp_path, demo_docs):
    """Three good documents, a 3-page TIFF, a missing file, a corrupt PNG and a row with its own prompt."""
    docs = tmp_path / "documents"
    frames = [Image.new("RGB", (300, 400), c) for c in ("white", "gray", "black")]
    frames[0].save(docs / "fax.tiff", save_all=True, append_images=frames[1:])
    good = io.BytesIO()
    Image.new("RGB", (400, 400), "white").save(good, format="PNG")
    (docs / "corrupt.png").write_bytes(good.getvalue()[:150])
    records = demo_docs + [
        {"document_id": "fax-0004", "image_uri": "documents/fax.tiff", "patient_id": "P-000104"},
        {"document_id": "missing-0005", "image_uri": "documents/nowhere.png", "patient_id": "P-000105"},
        {"document_id": "corrupt-0006", "image_uri": str(docs / "corrupt.png")},
        {"document_id": "rx-0002-dose", "image_uri": "documents/rx-0002.png", "prompt": "Only the dose, please."},
    ]
    return write_manifest(tmp_path / "manifest.csv", records)


def test_flow_writes_one_row_per_page_and_accounts_for_every_row(tmp_path, mixed_manifest, tiny_llava):
    output = str(tmp_path / "out")
    state = batch(
        manifest=str(mixed_manifest), output=output, model=str(tiny_llava.model_path),
        mmproj=str(tiny_llava.mmproj_path), max_tokens=8, n_ctx=4096, chunk_size=3, return_state=True,
    )
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["reconciled"] is True
    assert (summary["manifest_rows"], summary["pages_ok"], summary["pages_error"]) == (7, 7, 2)

    rows = read(output, "completions")
    by_doc = {}
    for r in rows:
        by_doc.setdefault(r["document_id"], []).append(r)
    assert sorted(r["page"] for r in by_doc["fax-0004"]) == [1, 2, 3]
    assert {r["page_count"] for r in by_doc["fax-0004"]} == {3}

    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 7
    model_sha = sha256_file(tiny_llava.model_path)
    for r in ok:
        assert r["completion"].strip() and r["completion_tokens"] == 8 and r["prompt_tokens"] > 0
        assert r["finish_reason"] == "length" and r["latency_ms"] > 0 and r["error_type"] is None
        assert r["model_sha256"] == model_sha and r["mmproj_sha256"] == sha256_file(tiny_llava.mmproj_path)
        assert r["model_name"] == "tiny-llava" and r["chat_format"] == "mtmd"
        assert r["image_sha256"] == sha256_file(r["image_uri"])
        assert json.loads(r["params_json"])["generation"]["max_tokens"] == 8
        assert r["run_date"] == r["created_at"].strftime("%Y-%m-%d")
    discharge = by_doc["discharge-0001"][0]
    assert (discharge["patient_id"], discharge["encounter_id"]) == ("P-000101", "E-9001")
    assert discharge["prompt_id"] == "clinical_analysis"
    assert discharge["prompt_sha256"] == get_prompt("clinical_analysis").sha256
    own = by_doc["rx-0002-dose"][0]
    assert own["prompt_id"] == "custom" and own["prompt_sha256"] == hashlib.sha256(b"Only the dose, please.").hexdigest()
    assert own["result_key"] != by_doc["rx-0002"][0]["result_key"]  # different prompt, different key

    missing = by_doc["missing-0005"][0]
    assert (missing["status"], missing["error_type"]) == ("error", "not_found")
    assert "nowhere.png" in missing["error_message"] and missing["completion"] is None
    assert missing["patient_id"] == "P-000105"
    corrupt = by_doc["corrupt-0006"][0]
    assert (corrupt["status"], corrupt["error_type"]) == ("error", "unreadable_image")

    [run] = read(output, "runs")
    assert run["run_id"] == summary["run_id"] == rows[0]["run_id"]
    assert (run["manifest_rows"], run["processed_rows"], run["pages_ok"], run["pages_error"]) == (7, 7, 7, 2)
    assert run["reconciled"] and run["completion_tokens"] == 56
    assert run["model_sha256"] == model_sha
    # nothing staged is left behind, the commit record exists, and no document text is in the run row
    assert not os.path.exists(os.path.join(output, "_staging", run["run_id"]))
    assert os.path.exists(os.path.join(output, "_commits", f"{run['run_id']}.json"))
    assert PROMPTS["clinical_analysis"] not in json.dumps(run, default=str)

    # the tables are queryable at once with DuckDB
    con = duckdb.connect()
    counts = dict(con.execute(
        f"select status, count(*) from read_parquet('{output}/completions/*/*.parquet', hive_partitioning=true) group by 1"
    ).fetchall())
    assert counts == {"ok": 7, "error": 2}


def test_same_inputs_same_completions(tmp_path, tiny_qwen, demo_docs):
    manifest = write_manifest(tmp_path / "m.jsonl", demo_docs)
    completions = []
    for name in ("a", "b"):
        state = batch(
            manifest=str(manifest), output=str(tmp_path / name), model=str(tiny_qwen.model_path),
            mmproj=str(tiny_qwen.mmproj_path), max_tokens=6, n_ctx=4096, return_state=True,
        )
        assert state.is_completed(), state.message
        rows = sorted(read(str(tmp_path / name), "completions"), key=lambda r: r["document_id"])
        completions.append([(r["document_id"], r["completion"], r["result_key"]) for r in rows])
        assert {r["chat_format"] for r in rows} == {"qwen2.5-vl"}
    assert completions[0] == completions[1]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": "/nonexistent/model.gguf"}, "model file not found"),
        ({"manifest": "/nonexistent/manifest.csv"}, "cannot be read"),
        ({"prompt_id": "no_such_prompt"}, "unknown prompt id"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ],
)
def test_run_that_cannot_start_fails_with_one_clear_message(tmp_path, tiny_llava, demo_docs, change, message):
    params = dict(
        manifest=str(write_manifest(tmp_path / "m.csv", demo_docs)), output=str(tmp_path / "out"),
        model=str(tiny_llava.model_path), mmproj=str(tiny_llava.mmproj_path),
    )
    params.update(change)
    state = batch(return_state=True, **params)
    assert state.is_failed() and message in state.message
    assert not os.path.exists(tmp_path / "out" / "completions")


def test_rerun_skips_done_pages_retries_errors_and_force_reruns(tmp_path, tiny_llava, demo_docs):
    docs = tmp_path / "documents"
    records = demo_docs + [{"document_id": "late", "image_uri": "documents/late.png"}]
    manifest = write_manifest(tmp_path / "m.csv", records)
    output = str(tmp_path / "out")
    params = dict(manifest=str(manifest), output=output, model=str(tiny_llava.model_path),
                  mmproj=str(tiny_llava.mmproj_path), max_tokens=4, n_ctx=4096, chunk_size=2)

    first = batch(**params)
    assert (first["pages_ok"], first["pages_error"], first["skipped_rows"]) == (3, 1, 0)

    # the missing document arrives; a new one is added; the rest is already done
    Image.new("RGB", (300, 300), "white").save(docs / "late.png")
    Image.new("RGB", (300, 300), "gray").save(docs / "new.png")
    write_manifest(manifest, records + [{"document_id": "new", "image_uri": "documents/new.png"}])
    second = batch(**params)
    assert (second["pages_ok"], second["pages_error"], second["skipped_rows"], second["skipped_pages"]) == (2, 0, 3, 3)
    assert second["reconciled"]

    third = batch(**params)
    assert (third["pages_ok"], third["skipped_rows"], third["reconciled"]) == (0, 5, True)

    rows = read(output, "completions")
    ok_keys = [r["result_key"] for r in rows if r["status"] == "ok"]
    assert len(ok_keys) == len(set(ok_keys)) == 5  # exactly one ok row per key across three runs
    [run3] = [r for r in read(output, "runs") if r["run_id"] == third["run_id"]]
    assert (run3["skipped_rows"], run3["processed_rows"], run3["manifest_rows"]) == (5, 0, 5)

    forced = batch(force=True, **params)
    assert (forced["pages_ok"], forced["skipped_rows"]) == (5, 0)


def test_a_manifest_of_only_refused_rows_still_publishes_every_table(tmp_path, tiny_llava):
    manifest = write_manifest(tmp_path / "m.csv", [{"document_id": "a", "image_uri": "a.png", "page": "-1"},
                                                    {"document_id": "b", "image_uri": "", "page": "1"}])
    summary = batch(manifest=str(manifest), output=str(tmp_path / "out"), model=str(tiny_llava.model_path),
                           mmproj=str(tiny_llava.mmproj_path), max_tokens=2, n_ctx=1024)
    assert (summary["quarantined_rows"], summary["pages_ok"], summary["reconciled"]) == (2, 0, True)
    read = lambda table: ds.dataset(tmp_path / "out" / table, partitioning="hive").to_table()  # noqa: E731
    assert read("completions").num_rows == 0 and read("quarantine").num_rows == 2 and read("runs").num_rows == 1
    assert set(summary["published"]) == {"completions", "quarantine", "runs"}
