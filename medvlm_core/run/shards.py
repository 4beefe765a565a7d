"""A fan-out's shard plans and shard records. The parent writes each shard's validated rows to the run's staging as it reads
the manifest, and each shard reads only its own rows, so a shard's start-up does not depend on the
manifest's length and the parent never holds all the rows.

The rows of ``SHARDS_PER_FILE`` consecutive shards share one Parquet file, one row group per shard: a shard
reads its file's footer and its own row group (ranged reads on S3), and a million-row plan is 62 files, not
3,907 (writing that many small files was most of the parent's planning time).

A shard that finishes leaves a ``ShardRecord`` (typed and versioned like every record, ``output/records.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import polars as pl
import pyarrow.parquet as pq

from medvlm_core.errors import RunError
from medvlm_core.inputs.manifest import PLAN_SCHEMA, ManifestRow, rows_of
from medvlm_core.output.paths import OutputLayout
from medvlm_core.output.records import JsonRecord
from medvlm_core.storage import Storage

SHARDS_PER_FILE = 64


class ShardPlanWriter:
    """A ``manifest.plan_manifest`` sink that cuts the valid rows into shards of ``shard_size`` rows, in
    manifest order, and writes each plan file (``SHARDS_PER_FILE`` shards, a row group each) as soon as it is full.

    At document scope (``keep_documents``) a shard never splits a document: it ends after the last of the
    adjacent rows of its last document (so a shard may hold a few more rows than ``shard_size``), and a
    document whose rows come back after other documents' rows, once its shard is written, stops the run
    (list a document's rows together).

    Args:
        storage: where the output is.
        layout: the output's layout.
        run_id: the fan-out run.
        shard_size: rows per shard.
        keep_documents: keep each document's rows in one shard (document scope).
    """

    def __init__(self, storage: Storage, layout: OutputLayout, run_id: str, shard_size: int,
                 keep_documents: bool = False):
        self.storage, self.layout, self.run_id = storage, layout, run_id
        self.shard_size = max(1, shard_size)
        self.keep_documents = keep_documents
        self.sizes: list[int] = []  # rows of each shard written so far
        self._pending: pl.DataFrame | None = None
        self._written_documents: set[str] = set()  # keep_documents: the documents of the shards written

    def __call__(self, rows: pl.DataFrame) -> None:
        """Take a batch of valid rows; write every plan file it completes.

        Args:
            rows: plan rows (``manifest.PLAN_SCHEMA``).
        """
        self._pending = rows if self._pending is None else pl.concat([self._pending, rows])
        while True:
            cuts = self._cuts(final=False)
            if len(cuts) < SHARDS_PER_FILE:
                return
            self._write(cuts[:SHARDS_PER_FILE])

    def close(self) -> int:
        """Write the last plan file (its last shard may be partial).

        Returns:
            The number of shards.
        """
        cuts = self._cuts(final=True)
        for start in range(0, len(cuts), SHARDS_PER_FILE):
            self._write(cuts[start : start + SHARDS_PER_FILE])
        return len(self.sizes)

    def _cuts(self, final: bool) -> list[tuple[int, int]]:
        """The (start, end) rows of the pending shards that are complete (all of them when ``final``)."""
        rows = self._pending
        if rows is None or rows.height == 0:
            return []
        ids = rows["document_id"].to_list() if self.keep_documents else None
        cuts, start, n = [], 0, rows.height
        while start < n:
            end = start + self.shard_size
            if end > n and not final:
                break
            end = min(end, n)
            if ids is not None:
                while end < n and ids[end] == ids[end - 1]:  # the document goes on: so does the shard
                    end += 1
                if end == n and not final:
                    break  # the next batch may hold more of this document
            cuts.append((start, end))
            start = end
        return cuts

    def _write(self, cuts: list[tuple[int, int]]) -> None:
        rows = self._pending
        shards = [rows.slice(start, end - start) for start, end in cuts]
        if self.keep_documents:
            for shard in shards:
                ids = set(shard["document_id"].to_list())
                again = sorted(ids & self._written_documents)
                if again:
                    raise RunError(f"manifest row {shard.filter(pl.col('document_id') == again[0])['row_number'][0]}: "
                                   f"document {again[0]!r} has rows apart from its others; at document scope a "
                                   "fan-out keeps a document's rows in one shard: list them together")
                self._written_documents |= ids
        url = self.layout.shard_plan(self.run_id, len(self.sizes) // SHARDS_PER_FILE)
        with self.storage.open_atomic(url) as f:
            with pq.ParquetWriter(f, PLAN_SCHEMA, compression="zstd") as writer:
                for shard in shards:  # a row group per shard: a shard reads its own
                    writer.write_table(shard.select(PLAN_SCHEMA.names).to_arrow().cast(PLAN_SCHEMA),
                                       row_group_size=max(1, shard.height))
        self.sizes += [shard.height for shard in shards]
        self._pending = rows.slice(cuts[-1][1])


def read_shard_rows(storage: Storage, layout: OutputLayout, run_id: str, shard_index: int) -> list[ManifestRow]:
    """A shard's rows, from the plan its parent wrote.

    Args:
        storage: where the output is.
        layout: the output's layout.
        run_id: the fan-out run.
        shard_index: the shard.

    Returns:
        Its rows.

    Raises:
        RunError: the plan file is missing, or holds no such shard.
    """
    url = layout.shard_plan(run_id, shard_index // SHARDS_PER_FILE)
    group = shard_index % SHARDS_PER_FILE
    fs, path = storage.filesystem(url)

    def read():
        with fs.open(path, "rb") as f:
            plan = pq.ParquetFile(f)
            return plan.read_row_group(group) if group < plan.num_row_groups else None

    try:
        table = storage.call(url, read)
    except FileNotFoundError:
        raise RunError(f"shard {shard_index}: its plan {url} is missing (was the run's staging cleared?)") from None
    if table is None:
        raise RunError(f"shard {shard_index}: not in its plan {url}")
    return rows_of(pl.from_arrow(table))


@dataclass(frozen=True)
class ShardWorker:
    """Which worker ran a shard (no document data).

    Attributes:
        hostname: the worker's host.
        pid: its process.
        cuda_visible_devices: the GPUs it was pinned to.
        flow_run_id: the shard's Prefect flow run, when it ran in one.
    """

    hostname: str
    pid: int
    cuda_visible_devices: str | None = None
    flow_run_id: str | None = None


@dataclass(frozen=True)
class ShardRecord(JsonRecord):
    """A finished shard's record (``_staging/<run_id>/shards/shard-NNNNN.json``): the parent run publishes the
    shards that left one, and reads their counts, model identity and workers from it.

    Attributes:
        shard_index: the shard.
        summary: its counts (``ChunkSummary.to_json``).
        identity: the model it ran (``ModelIdentity``'s fields).
        params_json: the parameters it ran with.
        memory: its engine's memory plan (``MemoryPlan.as_dict``), if one was made.
        worker: the worker that ran it.
        started_at: when it started (ISO 8601, UTC).
        finished_at: when it finished (ISO 8601, UTC).
    """

    KIND: ClassVar[str] = "shard"

    shard_index: int
    summary: str
    identity: dict[str, Any]
    params_json: str
    worker: ShardWorker
    started_at: str
    finished_at: str
    memory: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.worker, dict):  # read back from JSON; keys a later version added are ignored
            known = {f.name for f in dataclasses.fields(ShardWorker)}
            object.__setattr__(self, "worker", ShardWorker(**{k: v for k, v in self.worker.items() if k in known}))


def write_shard_record(storage: Storage, layout: OutputLayout, run_id: str, record: ShardRecord) -> None:
    """Write a finished shard's record (atomically: the parent sees all of it or none).

    Args:
        storage: where the output is.
        layout: the output's layout.
        run_id: the parent run.
        record: the record.
    """
    storage.write_bytes_atomic(layout.shard_record(run_id, record.shard_index), record.to_bytes())


def read_shard_record(storage: Storage, layout: OutputLayout, run_id: str, shard_index: int) -> ShardRecord | None:
    """A finished shard's record.

    Args:
        storage: where the output is.
        layout: the output's layout.
        run_id: the parent run.
        shard_index: the shard.

    Returns:
        The record, or None if the shard did not finish.

    Raises:
        RunError: a record written by a newer medvlm.
    """
    url = layout.shard_record(run_id, shard_index)
    if not storage.exists(url):
        return None
    return ShardRecord.from_bytes(storage.read_bytes(url), url)
