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
    manifest order, and writes each plan file (``SHARDS_PER_FILE`` shards) as soon as it is full.

    Args:
        storage: where the output is.
        layout: the output's layout.
        run_id: the fan-out run.
        shard_size: rows per shard.
    """

    def __init__(self, storage: Storage, layout: OutputLayout, run_id: str, shard_size: int):
        self.storage, self.layout, self.run_id = storage, layout, run_id
        self.shard_size = max(1, shard_size)
        self.sizes: list[int] = []  # rows of each shard written so far
        self._pending: list[pl.DataFrame] = []
        self._pending_rows = 0

    def __call__(self, rows: pl.DataFrame) -> None:
        """Take a batch of valid rows; write every shard it completes.

        Args:
            rows: plan rows (``manifest.PLAN_SCHEMA``).
        """
        self._pending.append(rows)
        self._pending_rows += rows.height
        while self._pending_rows >= self.shard_size * SHARDS_PER_FILE:
            self._write(self.shard_size * SHARDS_PER_FILE)

    def close(self) -> int:
        """Write the last, partial shard.

        Returns:
            The number of shards.
        """
        if self._pending_rows:
            self._write(self._pending_rows)
        return len(self.sizes)

    def _write(self, size: int) -> None:
        rows = pl.concat(self._pending) if len(self._pending) > 1 else self._pending[0]
        part, rest = rows.head(size), rows.slice(size)
        url = self.layout.shard_plan(self.run_id, len(self.sizes) // SHARDS_PER_FILE)
        table = part.select(PLAN_SCHEMA.names).to_arrow().cast(PLAN_SCHEMA)
        with self.storage.open_atomic(url) as f:
            pq.write_table(table, f, row_group_size=self.shard_size, compression="zstd")  # a row group per shard
        self.sizes += [min(self.shard_size, part.height - start) for start in range(0, part.height, self.shard_size)]
        self._pending, self._pending_rows = ([rest] if rest.height else []), rest.height


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
