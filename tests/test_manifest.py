"""Manifest reading: formats, relative URIs, table-level errors and row parsing."""

from __future__ import annotations

import os

import pytest

from conftest import write_manifest
from medvlm_core.errors import RunError
from medvlm_core.manifest import parse_rows, read_manifest_frame
from medvlm_core.storage import Storage

RECORDS = [
    {"document_id": "00123", "image_uri": "docs/a.png", "patient_id": "P1", "encounter_id": "E1"},
    {"document_id": "d2", "image_uri": "/abs/b.png", "page": "2", "prompt_id": "transcribe"},
    {"document_id": "d3", "image_uri": "s3://bucket/c.png", "prompt": "Read the dose."},
]


@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".parquet"])
def test_formats_read_alike_and_relative_uris_resolve(tmp_path, ext):
    path = write_manifest(tmp_path / "in" / f"manifest{ext}", RECORDS)
    frame = read_manifest_frame(str(path), Storage())
    rows, refused = parse_rows(frame, str(tmp_path / "in"))
    assert refused == []
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


def test_bad_rows_are_refused_with_reasons(tmp_path):
    path = write_manifest(
        tmp_path / "m.csv",
        [
            {"document_id": "ok", "image_uri": "a.png", "page": ""},
            {"document_id": "", "image_uri": "b.png", "page": ""},
            {"document_id": "p", "image_uri": "c.png", "page": "0"},
            {"document_id": "q", "image_uri": "", "page": "x"},
        ],
    )
    rows, refused = parse_rows(read_manifest_frame(str(path), Storage()), str(tmp_path))
    assert [r.document_id for r in rows] == ["ok"]
    assert [(q.row_number, q.column) for q in refused] == [(2, "document_id"), (3, "page"), (4, "image_uri")]
    assert all(q.reason.startswith(f"row {q.row_number}:") for q in refused)
