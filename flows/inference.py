"""The inference stage of a Prefect flow run: the mapped ``infer-chunk`` task over a run's chunks, and the progress
artifact of a run of several chunks (both plugged into ``medvlm_core.run.lifecycle.run_chunks``)."""

from __future__ import annotations

from typing import Any, Iterator

from prefect import unmapped
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from medvlm.tasks.inference import infer_chunk
from medvlm_core.inputs.manifest import ManifestRow
from medvlm_core.output import results
from medvlm_core.run.accounting import ChunkSummary
from medvlm_core.run.spec import RunSpec
from medvlm_core.storage import Storage


def prefect_chunks(logger: Any, chunks: list[list[ManifestRow]], spec: RunSpec, storage: Storage,
                   done: results.DoneKeys, shard_index: int | None, log_phi: bool
                   ) -> Iterator[ChunkSummary | Exception]:
    """The ``ChunkMapper`` of a Prefect flow run: ``infer-chunk`` mapped over the chunks (two at a time on the
    flow's thread pool), each chunk's counts or exception in chunk order.

    Args:
        logger: the flow run's logger (each task logs its own counts).
        chunks: the chunks' rows.
        spec: the run.
        storage: where documents and the output are.
        done: result keys already answered.
        shard_index: the shard in a fan-out run.
        log_phi: the ``MEDVLM_LOG_PHI`` debug setting.

    Yields:
        Each chunk's counts, or the exception that failed its task.
    """
    futures = infer_chunk.map(
        list(range(len(chunks))), chunks, unmapped(spec), unmapped(storage), unmapped(done),
        unmapped(shard_index), unmapped(log_phi),
    )
    for future in futures:
        try:
            yield future.result()
        except Exception as exc:  # the run records the chunk's rows as errors
            yield exc


class ChunkProgress:
    """A Prefect progress artifact for a flow run of several chunks, updated as its chunks finish (a convenience:
    an artifact the server refuses never fails the run). Called with a percentage.

    Args:
        description: what the percentage counts (no document data).
    """

    def __init__(self, description: str):
        try:
            self.artifact_id = create_progress_artifact(0.0, description=description)
        except Exception:
            self.artifact_id = None

    def __call__(self, percent: float) -> None:
        """Set the artifact to ``percent`` (0 to 100).

        Args:
            percent: the share of the run's rows done.
        """
        if self.artifact_id is not None:
            try:
                update_progress_artifact(self.artifact_id, percent)
            except Exception:
                pass
