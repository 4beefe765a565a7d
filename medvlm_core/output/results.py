"""Writing the result tables: rows to Arrow, validated Parquet files, merges at publish, the result key.

The tables' columns are defined once, in ``output/tables.py``; this module writes them.

The tables are hive-partitioned by ``run_date``, one file per table per run (``medvlm_core.output.paths`` names
every place under an output). Every published file is written atomically, so a reader sees all of a run's
rows in a table or none of them.
"""

from __future__ import annotations

import errno
import hashlib
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from medvlm_core.errors import RunError
from medvlm_core.output.tables import COMPLETIONS, QUARANTINE, RUN_TABLES, RUNS, rows_to_arrow, validate_table
from medvlm_core.storage import Storage

if TYPE_CHECKING:
    from medvlm_core.output.paths import OutputLayout

# The run tables' Arrow schemas, derived from their one definition (``output/tables.py``).
COMPLETIONS_SCHEMA = COMPLETIONS.arrow_schema()
RUNS_SCHEMA = RUNS.arrow_schema()
QUARANTINE_SCHEMA = QUARANTINE.arrow_schema()
TABLES = {name: table.arrow_schema() for name, table in RUN_TABLES.items()}


def utc_now() -> datetime:
    """Timezone-aware UTC now (all timestamps in the tables are UTC)."""
    return datetime.now(timezone.utc)


def result_key(
    document_id: str,
    image_sha256: str | None,
    page: int | None,
    model_sha256: str,
    mmproj_sha256: str,
    prompt_sha256: str,
    params_json: str,
) -> str:
    """Deterministic key of one page's result: same document page, model, prompt and parameters -> same key.

    The document id is part of the key: two manifest rows pointing at the same image under different ids
    (say, the same fax filed for two encounters) are two results that analytics must both see.
    """
    parts = [document_id, image_sha256 or "", str(page or 0), model_sha256, mmproj_sha256, prompt_sha256, params_json]
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


class DoneKeys:
    """The result keys that already have an ``ok`` row in the output: their pages are skipped.

    A plain wrapper on purpose: Prefect inspects task parameters for futures, and walking a set of a
    million keys for every mapped task would cost more than the lookup it serves.
    """

    def __init__(self, keys: frozenset[str] = frozenset()):
        self.keys = keys

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def __len__(self) -> int:
        return len(self.keys)


def to_table(rows: Iterable[dict[str, Any]], schema: pa.Schema, table_name: str = "") -> pa.Table:
    """Rows (dicts) as an Arrow table of exactly ``schema``: missing keys become nulls, and a key that is not
    a column is an error (``tables.UnknownColumnError``), so a misspelt column is never written as null.

    Args:
        rows: the rows.
        schema: the table's schema.
        table_name: named in the error.

    Returns:
        The Arrow table.
    """
    return rows_to_arrow(rows, schema, table_name)


@contextmanager
def no_space_is_a_run_error(url: str) -> Iterator[None]:
    """A full disk (or quota, or read-only mount) under ``url`` stops the run with one clear message."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
            raise RunError(f"{url}: cannot be written ({exc.strerror})") from None
        raise


def write_parquet(storage: Storage, url: str, table: pa.Table) -> None:
    """Write one Parquet file atomically (readers never see a partial file)."""
    with no_space_is_a_run_error(url):
        with storage.open_atomic(url) as f:
            pq.write_table(table, f, compression="zstd")


def write_rows(
    storage: Storage, url: str, table_name: str, rows: Iterable[dict[str, Any]], schema: pa.Schema | None = None
) -> int:
    """Check rows against the table's definition (``tables.validate_table``), then write them as one atomic
    Parquet file.

    ``schema`` is needed for structured tables (their columns come from the extraction's JSON schema).
    """
    table = to_table(rows, schema or TABLES[table_name], table_name)
    validate_table(table_name, table)
    write_parquet(storage, url, table)
    return table.num_rows


def merge_parquet(storage: Storage, sources: list[str], url: str, schema: pa.Schema | None = None) -> int:
    """Stream ``sources`` (same schema) into one Parquet file at ``url``, atomically. Returns rows written.

    Sources (chunk files: one chunk's rows each) are read whole, one at a time (so a retried read never
    repeats rows), and copied a row group at a time: memory stays at one chunk however long the run was.
    ``schema`` defaults to the first source's. A single source already in ``schema`` (a one-chunk run, the
    runs row) is copied byte for byte: the same file the merge would write, without decoding and re-encoding it.
    """
    def open_source(src: str) -> pq.ParquetFile:
        return pq.ParquetFile(pa.BufferReader(storage.read_bytes(src)))

    if len(sources) == 1:
        data = storage.read_bytes(sources[0])
        parquet = pq.ParquetFile(pa.BufferReader(data))
        if schema is None or parquet.schema_arrow.equals(schema):
            with no_space_is_a_run_error(url):
                storage.write_bytes_atomic(url, data)
            return parquet.metadata.num_rows

    if schema is None:
        schema = open_source(sources[0]).schema_arrow
    rows = 0
    with no_space_is_a_run_error(url), storage.open_atomic(url) as f:
        with pq.ParquetWriter(f, schema, compression="zstd") as writer:
            for src in sources:
                parquet = open_source(src)
                for i in range(parquet.num_row_groups):
                    group = parquet.read_row_group(i).cast(schema)
                    rows += group.num_rows
                    writer.write_table(group)
    return rows


def read_answers(storage: Storage, layout: "OutputLayout", keys: set[str]) -> dict[str, str]:
    """The completions of ``keys`` already published in an output (``ok`` rows; the latest when a key has
    several): the page answers a document's consolidation reuses instead of asking the pages again.

    Reads the completions table's files one at a time (three columns, the keys filtered as each is read).

    Args:
        storage: where the output is.
        layout: the output's layout.
        keys: the result keys wanted.

    Returns:
        Result key -> completion, for the keys found.
    """
    import pyarrow.compute as pc

    found: dict[str, tuple[Any, str]] = {}
    if not keys:
        return {}
    wanted = pa.array(sorted(keys))
    for url in storage.list_files(layout.table("completions"), ".parquet"):
        table = pq.read_table(pa.BufferReader(storage.read_bytes(url)),
                              columns=["result_key", "status", "completion", "created_at"])
        table = table.filter(pc.and_(pc.is_in(table["result_key"], value_set=wanted), pc.equal(table["status"], "ok")))
        for row in table.to_pylist():
            if row["result_key"] not in found or row["created_at"] > found[row["result_key"]][0]:
                found[row["result_key"]] = (row["created_at"], row["completion"])
    return {key: text for key, (_, text) in found.items()}
