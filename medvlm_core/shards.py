"""A fan-out's shard plans: the parent writes each shard's validated rows to the run's staging as it reads
the manifest, and each shard reads only its own file, so a shard's start-up does not depend on the
manifest's length and the parent never holds all the rows.
"""

from __future__ import annotations

import polars as pl

from medvlm_core.layout import OutputLayout
from medvlm_core.manifest import ManifestRow, read_plan, write_plan
from medvlm_core.storage import Storage


class ShardPlanWriter:
    """A ``manifest.plan_manifest`` sink that cuts the valid rows into shards of ``shard_size`` rows, in
    manifest order, and writes each shard's plan file as soon as it is full.

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
        while self._pending_rows >= self.shard_size:
            self._write(self.shard_size)

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
        shard, rest = rows.head(size), rows.slice(size)
        write_plan(self.storage, self.layout.shard_plan(self.run_id, len(self.sizes)), shard)
        self.sizes.append(shard.height)
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
        RunError: the plan file is missing.
    """
    return read_plan(storage, layout.shard_plan(run_id, shard_index))
