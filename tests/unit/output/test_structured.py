"""Structured mode on the real flow: constrained JSON, normalized tables, truncation, user extractions, queries."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from conftest import batch, write_manifest
from medvlm_core.analytics import EXAMPLE_QUERIES, query
from medvlm_core.output.structured import CLINICAL_SCHEMA, flatten, tables_for
from medvlm_core.storage import Storage

MEDVLM = str(Path(sys.executable).with_name("medvlm"))


def read(output, table):
    return ds.dataset(Path(output) / table, format="parquet", partitioning="hive").to_table()


def test_flatten_clinical_answer_into_three_tables():
    answer = {
        "diagnoses": [{"name": "Type 2 diabetes", "evidence": "HbA1c 8.9%"}],
        "medications": [
            {"name": "Metformin", "dose": "500", "unit": "mg", "route": "PO", "frequency": "BID",
             "reasoning": "glycaemic control", "conditional": False, "condition": ""},
            {"name": "Silver sulfadiazine", "dose": "1", "unit": "application", "route": "topical",
             "frequency": "daily", "reasoning": "ulcer", "conditional": True, "condition": "only if the ulcer fails to heal"},
        ],
        "instructions": [{"text": "Wound clinic", "conditional": False, "condition": "", "follow_up_interval": "2 weeks"}],
    }
    keys = {"run_id": "r", "result_key": "k", "document_id": "d", "page": 1, "patient_id": "P", "encounter_id": "E"}
    rows = flatten("clinical_extraction", CLINICAL_SCHEMA, answer, keys)
    assert set(rows) == {"diagnoses", "medications", "instructions"}
    assert [m["item_index"] for m in rows["medications"]] == [0, 1]
    assert rows["medications"][1]["condition"] == "only if the ulcer fails to heal" and rows["medications"][1]["conditional"]
    assert rows["diagnoses"][0] | keys == rows["diagnoses"][0]
    schema = tables_for("clinical_extraction", CLINICAL_SCHEMA)["medications"][1]
    assert schema.field("conditional").type == "bool" and "frequency" in schema.names


@pytest.fixture
def extraction(tmp_path):
    """A user-defined extraction whose schema asks for at least one short item, so rows always appear."""
    spec = {
        "prompt_id": "vitals",
        "prompt": "List every vital sign on the page.",
        "schema": {
            "type": "object",
            "properties": {
                "vitals": {
                    "type": "array", "minItems": 1, "maxItems": 2,
                    "items": {"type": "object",
                              "properties": {"name": {"type": "string", "maxLength": 5},
                                             "value": {"type": "string", "maxLength": 4},
                                             "abnormal": {"type": "boolean"}},
                              "required": ["name", "value", "abnormal"]},
                }
            },
            "required": ["vitals"],
        },
    }
    path = tmp_path / "vitals.json"
    path.write_text(json.dumps(spec))
    return path


def test_structured_run_clinical_user_extraction_and_truncation(tmp_path, tiny_llava, demo_docs, extraction):
    records = demo_docs + [
        {"document_id": "vitals-1", "image_uri": demo_docs[0]["image_uri"], "prompt_id": "vitals"},
    ]
    manifest = write_manifest(tmp_path / "m.csv", records)
    output = tmp_path / "out"
    state = batch(
        manifest=str(manifest), output=str(output), model=str(tiny_llava.model_path), mmproj=str(tiny_llava.mmproj_path),
        prompt_id="clinical_extraction", extraction=str(extraction), max_tokens=400, n_ctx=4096, return_state=True,
    )
    assert state.is_completed(), state.message
    completions = {r["document_id"]: r for r in read(output, "completions").to_pylist()}
    for doc in ("discharge-0001", "rx-0002", "lab-0003"):
        row = completions[doc]
        assert row["status"] == "ok" and row["prompt_id"] == "clinical_extraction"
        assert set(json.loads(row["completion"])) == {"diagnoses", "medications", "instructions"}  # always parses
    # the clinical tables exist with their schemas (the random model may well list nothing)
    for table in ("diagnoses", "medications", "instructions"):
        expected = tables_for("clinical_extraction", CLINICAL_SCHEMA)[table][1]
        got = read(output, table)
        assert [f for f in got.schema.names if f != "run_date"] == expected.names
    # the user extraction landed in its own table, one row per item, keyed to its page
    vitals = read(output, "vitals").to_pylist()
    answer = json.loads(completions["vitals-1"]["completion"])
    assert 1 <= len(vitals) == len(answer["vitals"]) <= 2
    for i, v in enumerate(vitals):
        assert (v["document_id"], v["page"], v["item_index"], v["section"]) == ("vitals-1", 1, i, "vitals")
        assert v["result_key"] == completions["vitals-1"]["result_key"]
        assert v["run_id"] == completions["vitals-1"]["run_id"]
        assert (v["name"], v["value"], v["abnormal"]) == tuple(answer["vitals"][i][k] for k in ("name", "value", "abnormal"))

    # max_tokens too small: truncated, the raw text kept, no partial rows in the structured tables
    out2 = tmp_path / "out2"
    state = batch(
        manifest=str(manifest), output=str(out2), model=str(tiny_llava.model_path), mmproj=str(tiny_llava.mmproj_path),
        prompt_id="clinical_extraction", extraction=str(extraction), max_tokens=6, n_ctx=4096, return_state=True,
    )
    assert state.is_completed(), state.message
    rows = read(out2, "completions").to_pylist()
    assert {r["status"] for r in rows} == {"truncated"} and all(r["completion"] for r in rows)
    for table in ("diagnoses", "medications", "instructions", "vitals"):
        assert read(out2, table).num_rows == 0
    [run] = read(out2, "runs").to_pylist()
    assert (run["pages_truncated"], run["reconciled"]) == (4, True)


def test_readme_queries_on_real_output(tmp_path, tiny_llava, demo_docs):
    records = demo_docs + [{"document_id": "lost", "image_uri": "documents/lost.png"}]
    manifest = write_manifest(tmp_path / "m.csv", records)
    output = tmp_path / "out"
    for _ in range(2):  # two runs: the second skips what the first did and retries the error
        batch(manifest=str(manifest), output=str(output), model=str(tiny_llava.model_path),
                     mmproj=str(tiny_llava.mmproj_path), prompt_id="clinical_extraction", max_tokens=300, n_ctx=4096)
    storage = Storage()
    errors = query(str(output), EXAMPLE_QUERIES["errors_by_type"], storage).to_pylist()
    # the built-in query reads the current views: the page failed twice, it is one failing page now
    assert errors == [{"error_type": "not_found", "documents": 1, "pages": 1}]
    history = query(str(output), "select count(*) as n from completions where status = 'error'", storage).to_pylist()
    assert history == [{"n": 2}]  # both attempts stay in the history
    runs = query(str(output), EXAMPLE_QUERIES["throughput_per_run"], storage).to_pylist()
    assert [(r["pages_ok"], r["pages_error"], r["skipped_pages"]) for r in runs] == [(3, 1, 0), (0, 1, 3)]
    meds = query(str(output), EXAMPLE_QUERIES["medications_per_diagnosis"], storage)
    assert meds.column_names == ["diagnosis", "medication", "pages"]
    conditional = query(str(output), EXAMPLE_QUERIES["conditional_instructions"], storage)
    expected = sum(1 for r in read(output, "instructions").to_pylist() if r["conditional"])
    assert conditional.num_rows == expected

    # the command: a named example as CSV, and an error for a wrong query
    proc = subprocess.run([MEDVLM, "query", "errors_by_type", "--output", str(output), "--format", "csv"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert list(csv.DictReader(io.StringIO(proc.stdout))) == [{"error_type": "not_found", "documents": "1", "pages": "1"}]
    proc = subprocess.run([MEDVLM, "query", "select nope from completions", "--output", str(output)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "query failed" in proc.stderr and "Traceback" not in proc.stderr
