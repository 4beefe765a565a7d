"""Manifest reading: formats, relative URIs, table-level errors and row parsing."""

from __future__ import annotations

import json
import os

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from conftest import write_manifest
from medvlm_core.errors import RunError
from medvlm_core.inputs.manifest import plan_manifest, read_manifest, read_manifest_frame, resolved_rows, rows_of
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


def test_batches_give_the_same_plan_as_one_pass(tmp_path):
    # duplicates and bad rows spread over several batches: the uniqueness check spans the whole manifest
    records = [{"document_id": f"d{i % 7}", "image_uri": f"x/{i}.png", "page": str(i // 7 + 1)} for i in range(30)]
    records += [{"document_id": "d1", "image_uri": "x/1.png", "page": "1"},  # exact duplicate of row 2
                {"document_id": "d3", "image_uri": "other.png", "page": "1"},  # conflicts with row 4
                {"document_id": "", "image_uri": "y.png"}]
    path = write_manifest(tmp_path / "m.csv", records)
    whole = plan_manifest(str(path), Storage())
    sunk = []
    batched = plan_manifest(str(path), Storage(), sink=sunk.append, batch_rows=4)
    assert len(sunk) == 9 and batched.rows == []
    assert rows_of(pl.concat(sunk)) == whole.rows
    assert list(batched.row_numbers) == [r.row_number for r in whole.rows]
    assert batched.quarantined == whole.quarantined and batched.total_rows == whole.total_rows == 33
    q = {r["row_number"]: r["reason"] for r in whole.quarantined}
    assert sorted(q) == [4, 31, 32, 33]
    assert "exact duplicate of row 2" in q[31] and "repeated in rows 4, 32" in q[4] and q[32] == q[4].replace("row 4", "row 32")


@settings(max_examples=200, deadline=None)
@given(
    hst.lists(hst.one_of(
        hst.sampled_from(["a.png", "../x.png", "./a/b.png", "a//b.png", "a/", "/abs/p.png", "/abs/../p.png", "//x",
                          "s3://b/k.png", "S3A://b/k.png", "s3a://b/../k.png", "file:///tmp/f.png", "~/f.png", ".", "..",
                          " spaced.png ", "a/./b", "dir/.hidden.png", "x..png"]),
        hst.text(alphabet="ab./~:", min_size=1, max_size=8),
    ), min_size=1, max_size=8),
    hst.sampled_from(["/data/in", "/", "s3://bucket/in", "s3://bucket"]),
)
def test_resolved_uris_are_what_storage_resolve_gives(uris, base_dir):
    from medvlm_core import storage as st
    from medvlm_core.inputs.manifest_checks import ROW

    frame = pl.DataFrame({ROW: list(range(1, len(uris) + 1)), "document_id": ["d"] * len(uris), "image_uri": uris,
                          **{c: [None] * len(uris) for c in ("page", "prompt_id", "prompt", "patient_id", "encounter_id", "sha256")}},
                         schema_overrides={c: pl.Utf8 for c in ("page", "prompt_id", "prompt", "patient_id", "encounter_id", "sha256")})
    frame = frame.filter(pl.col("image_uri").str.strip_chars().str.len_chars() > 0)
    got = resolved_rows(frame.with_columns(pl.col(ROW).cast(pl.Int64)), base_dir)["image_uri"].to_list()
    assert got == [st.resolve(u.strip(), base_dir) for u in frame["image_uri"].to_list()]


def test_a_manifest_saved_as_cp1252_says_so_and_where(tmp_path):
    """Excel on Windows saves CSV as cp1252: the error names the line and the fix, never the bytes."""
    path = tmp_path / "m.csv"
    path.write_bytes("document_id,image_uri\ndoc-1,a.png\ncaf\u00e9-2,b.png\n".encode("cp1252"))
    with pytest.raises(RunError) as info:
        read_manifest(str(path), Storage())
    message = str(info.value)
    assert str(path) in message and "not UTF-8" in message and "line 3" in message and "CSV UTF-8" in message
    assert "caf" not in message  # the document id is not repeated
    path.write_bytes("\ufeffdocument_id,image_uri\ndoc-1,a.png\ncaf\u00e9-2,b.png\n".encode("utf-8"))  # Excel's UTF-8
    assert read_manifest(str(path), Storage()).valid_rows == 2
