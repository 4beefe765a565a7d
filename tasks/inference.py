"""The mapped inference task: one chunk of manifest rows -> staged Parquet files
(``medvlm_core.run.lifecycle.infer_chunk_here``)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from medvlm_core.inputs.manifest import ManifestRow
from medvlm_core.output import results
from medvlm_core.run.accounting import ChunkSummary
from medvlm_core.run.lifecycle import infer_chunk_here
from medvlm_core.run.spec import RunSpec
from medvlm_core.storage import Storage


@task(name="infer-chunk", cache_policy=NO_CACHE)
def infer_chunk(
    chunk_index: int,
    rows: list[ManifestRow],
    spec: RunSpec,
    storage: Storage,
    done: results.DoneKeys | None = None,
    shard_index: int | None = None,
    log_phi: bool = False,
) -> ChunkSummary:
    """Run the process's shared engine over a chunk's rows and stage their result rows.

    Args:
        chunk_index: the chunk's number in its run (or shard).
        rows: its manifest rows.
        spec: the run.
        storage: where documents and the output are.
        done: result keys already answered (their pages are skipped unless ``spec.force``).
        shard_index: the shard in a fan-out run.
        log_phi: the ``MEDVLM_LOG_PHI`` debug setting.

    Returns:
        The chunk's counts.
    """
    return infer_chunk_here(get_run_logger(), chunk_index, rows, spec, storage, done, shard_index, log_phi)
