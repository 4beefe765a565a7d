"""Publishing's merge (medvlm_core.output.results.merge_parquet): one file per table holding every staged chunk's rows,
in the table's schema, whether it merges many chunk files or copies a run's only one."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from conftest import completion_row
from medvlm_core.output import results
from medvlm_core.storage import Storage


def _chunk(storage: Storage, url: str, first: int, count: int) -> list[str]:
    rows = [completion_row(document_id=f"doc-{i}", manifest_row=i + 1) for i in range(first, first + count)]
    results.write_rows(storage, url, "completions", rows)
    return [r["document_id"] for r in rows]


def _read(storage: Storage, url: str) -> pa.Table:
    return pq.read_table(pa.BufferReader(storage.read_bytes(url)))


def test_chunks_merge_into_one_file_in_the_table_schema(tmp_path):
    storage = Storage()
    chunks = [str(tmp_path / f"chunk-{c}.parquet") for c in range(3)]
    ids = [d for c, url in enumerate(chunks) for d in _chunk(storage, url, c * 5, 5)]
    out = str(tmp_path / "part.parquet")
    assert results.merge_parquet(storage, chunks, out, results.COMPLETIONS_SCHEMA) == 15
    table = _read(storage, out)
    assert table.schema.equals(results.COMPLETIONS_SCHEMA) and table["document_id"].to_pylist() == ids


def test_a_single_chunk_in_the_table_schema_is_copied_as_it_is(tmp_path, monkeypatch):
    # A one-chunk run (and every run's one runs row): the published file is the staged file, byte for byte, and
    # nothing is decoded or written row group by row group.
    storage = Storage()
    chunk, out = str(tmp_path / "chunk.parquet"), str(tmp_path / "part.parquet")
    ids = _chunk(storage, chunk, 0, 7)

    def no_rewrite(*args, **kwargs):
        raise AssertionError("a single chunk in the table's schema was rewritten")

    monkeypatch.setattr(pq, "ParquetWriter", no_rewrite)
    assert results.merge_parquet(storage, [chunk], out, results.COMPLETIONS_SCHEMA) == 7
    assert storage.read_bytes(out) == storage.read_bytes(chunk)
    assert _read(storage, out)["document_id"].to_pylist() == ids


def test_a_single_chunk_in_another_schema_is_cast_not_copied(tmp_path):
    # A staging written by an older medvlm and rolled forward: its columns in another type are cast to the table's.
    storage = Storage()
    chunk, out = str(tmp_path / "chunk.parquet"), str(tmp_path / "part.parquet")
    ids = _chunk(storage, chunk, 0, 4)
    old = _read(storage, chunk)
    old = old.set_column(old.schema.get_field_index("page"), "page", old["page"].cast(pa.int64()))
    with storage.open_atomic(chunk) as f:
        pq.write_table(old, f)
    assert results.merge_parquet(storage, [chunk], out, results.COMPLETIONS_SCHEMA) == 4
    table = _read(storage, out)
    assert table.schema.equals(results.COMPLETIONS_SCHEMA) and table["document_id"].to_pylist() == ids
