"""The output as the review server reads it, fast enough for every page view, on S3 too.

Binding DuckDB views over an output reads every file's footer (through s3fs on S3: 1.5 to 3.5 s for a small output
on the test machine), which a page view must not pay each time. So the server keeps one DuckDB database with the
output's views (``analytics.register_views``: history and current views), made again only when the published
files of the model's tables change (a run or an evaluation published): one listing per request tells. The review
tables are not read through views: ``corrections`` is kept in memory, each new submission file read once, and
registered on each request's cursor (so a request sees every correction published before it); ``access_log`` is
written, never read here. Each request gets its own cursor (DuckDB connections are not shared between threads).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from medvlm_core.analytics import register_views, table_files
from medvlm_core.output.tables import CORRECTIONS, REVIEW_TABLES
from medvlm_core.review.corrections import CORRECTIONS_TABLE, empty_corrections
from medvlm_core.storage import Storage


class OutputStore:
    """The output's views (remade when a run publishes) and its corrections (read incrementally)."""

    def __init__(self, output: str, storage: Storage):
        self.output, self.storage = output, storage
        self._lock = threading.Lock()
        self._fingerprint: tuple[str, ...] | None = None
        self._con: duckdb.DuckDBPyConnection | None = None
        self._corrections: dict[str, pa.Table] = {}

    @property
    def fingerprint(self) -> tuple[str, ...] | None:
        """The published files of the model's tables the views were made over (None before the first request)."""
        return self._fingerprint

    def _database(self, files: dict[str, list[str]]) -> duckdb.DuckDBPyConnection:
        fingerprint = tuple(u for t, urls in files.items() if t not in REVIEW_TABLES for u in urls)
        with self._lock:
            if self._con is None or fingerprint != self._fingerprint:
                con = duckdb.connect()
                con.execute("set parquet_metadata_cache = true")
                register_views(con, self.output, self.storage)
                for name in REVIEW_TABLES:  # read apart (corrections) or never (access_log)
                    con.execute(f"drop view if exists {name}")
                # an older database stays open while a request still holds a cursor on it
                self._con, self._fingerprint = con, fingerprint
            return self._con

    def _read_corrections(self, urls: list[str]) -> pa.Table:
        schema = CORRECTIONS.arrow_schema()
        for url in urls:
            if url not in self._corrections:  # a published file never changes: read each once
                self._corrections[url] = _complete(pq.read_table(pa.BufferReader(self.storage.read_bytes(url))), schema)
        for url in set(self._corrections) - set(urls):
            del self._corrections[url]
        tables = [self._corrections[u] for u in urls]
        return pa.concat_tables(tables) if tables else empty_corrections()

    @contextmanager
    def cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor with the output's views and ``corrections`` as of now.

        Yields:
            The cursor (closed after the block).
        """
        files = table_files(self.storage, self.output)
        con = self._database(files)
        with self._lock:
            corrections = self._read_corrections(files.get(CORRECTIONS_TABLE, []))
        cursor = con.cursor()
        try:
            cursor.register(CORRECTIONS_TABLE, corrections)
            yield cursor
        finally:
            cursor.close()


def _complete(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` in ``schema``: its columns in that order and type, a missing one null."""
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)
