"""Manifest reading: formats, relative URIs, table-level errors and row parsing."""

from __future__ import annotations

import json
import os

import pytest

from conftest import write_manifest
from medvlm_core.errors import RunError
from medvlm_core.manifest import read_manifest, read_manifest_frame
from medvlm_core.storage import Storage

RECORDS = [
    {"document_id": "00123", "image_uri": "docs/a.png", "patient_id": "P1", "encounter_id": "E1"},
    {"document_id": "d2", "image_uri": "/abs/b.png", "page": "2", "prompt_id": "transcribe"},
    {"document_id": "d3", "image_uri": "s3://bucket/c.png", "prompt": "Read the dose."},
]


@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".parquet"])
def test_formats_read_alike_and_relative_uris_resolve(tmp_path, ext):
    path = write_manifest(tmp_path / "in" / f"manifest{ext}", RECORDS)
    plan = read_manifest(str(path), Storage())
    rows = plan.rows
    assert plan.quarantined == [] and plan.total_rows == 3
    assert [r.document_id for r in rows] == ["00123", "d2", "d3"]  # ids stay strings
    assert rows[0].image_uri == os.path.join(str(tmp_path), "in", "docs", "a.png")
    assert rows[1].image_uri == "/abs/b.png" and rows[1].page == 2 and rows[1].prompt_id == "transcribe"
    assert rows[2].image_uri == "s3://bucket/c.png" and rows[2].prompt == "Read the dose."
    assert (rows[0].patient_id, rows[0].encounter_id) == ("P1", "E1")
    assert [r.row_number for r in rows] == [1, 2, 3]


def test_table_level_problems_are_one_clear_error(tmp_path):
    storage = Storage()
    with pytest.raises(RunError, match="missing required column.*image_uri"):
        read_manifest_frame(str(write_manifest(tmp_path / "m1.csv", [{"document_id": "x"}])), storage)
    empty = tmp_path / "m2.csv"
    empty.write_text("document_id,image_uri\n")
    with pytest.raises(RunError, match="has no rows"):
        read_manifest_frame(str(empty), storage)
    with pytest.raises(RunError, match="cannot be read"):
        read_manifest_frame(str(tmp_path / "missing.csv"), storage)
    with pytest.raises(RunError, match="unknown format"):
        read_manifest_frame(str(tmp_path / "m.xlsx"), storage)
    broken = tmp_path / "m3.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(RunError, match="not a readable parquet file"):
        read_manifest_frame(str(broken), storage)


def test_bad_rows_are_quarantined_with_every_reason(tmp_path):
    good_sha = "a" * 64
    path = write_manifest(
        tmp_path / "m.csv",
        [
            {"document_id": "ok", "image_uri": "a.png", "page": "", "prompt_id": "", "sha256": good_sha},
            {"document_id": "", "image_uri": "b.png", "page": "", "prompt_id": "", "sha256": ""},
            {"document_id": "p", "image_uri": "c.png", "page": "0", "prompt_id": "nope", "sha256": "xyz"},
            {"document_id": "q", "image_uri": "http://example.org/x.png", "page": "x", "prompt_id": "", "sha256": ""},
            {"document_id": "ok", "image_uri": "a.png", "page": "", "prompt_id": "", "sha256": good_sha},
            {"document_id": "twin", "image_uri": "1.png", "page": "1", "prompt_id": "", "sha256": ""},
            {"document_id": "twin", "image_uri": "2.png", "page": "1", "prompt_id": "", "sha256": ""},
            {"document_id": "twin", "image_uri": "2.png", "page": "2", "prompt_id": "transcribe", "sha256": ""},
        ],
    )
    plan = read_manifest(str(path), Storage())
    assert [(r.row_number, r.document_id, r.page) for r in plan.rows] == [(1, "ok", None), (8, "twin", 2)]
    assert plan.rows[0].sha256 == good_sha and plan.rows[1].prompt_id == "transcribe"
    q = {r["row_number"]: r for r in plan.quarantined}
    assert sorted(q) == [2, 3, 4, 5, 6, 7]
    assert q[2]["reason"] == "row 2: document_id is missing"
    assert q[3]["reason"] == (
        "row 3: page must be an integer >= 1; prompt_id is not in the prompt library; sha256 must be 64 hexadecimal characters"
    )
    assert q[3]["column"] == "page" and q[3]["check"] == "str_matches" and q[3]["failing_value"] == "0"
    assert "image_uri must be s3://" in q[4]["reason"] and "page must be an integer" in q[4]["reason"]
    assert q[5]["reason"] == "row 5: exact duplicate of row 1 (same document_id and page)"
    assert "repeated in rows 6, 7 with different content" in q[6]["reason"] and 7 in q
    assert json.loads(q[4]["row_json"])["image_uri"] == "http://example.org/x.png"
    assert plan.total_rows == len(plan.rows) + len(plan.quarantined)
