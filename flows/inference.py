"""The inference stage of a flow: load the model once, map the inference task over chunks of rows."""

from __future__ import annotations

from typing import Any

from prefect import unmapped
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from medvlm.tasks.inference import infer_chunk
from medvlm_core.engine.registry import shared_engine
from medvlm_core.inputs.manifest import ManifestRow
from medvlm_core.output import done_index, results
from medvlm_core.run.accounting import ChunkSummary
from medvlm_core.run.chunks import stage_failed_rows
from medvlm_core.run.context import RunContext, chunk_rows
from medvlm_core.run.documents import document_chunks
from medvlm_core.run.spec import RunSpec


def split_chunks(items: list, size: int) -> list[list]:
    """Consecutive chunks of at most ``size`` items.

    Args:
        items: what to split.
        size: the most items per chunk.

    Returns:
        The chunks.
    """
    size = max(1, size)
    return [items[i : i + size] for i in range(0, len(items), size)]


def run_chunks(logger: Any, ctx: RunContext, spec: RunSpec, rows: list[ManifestRow],
               shard_index: int | None = None) -> list[ChunkSummary]:
    """Load the model (once per process), map the inference task over chunks, account for failed chunks.

    Args:
        logger: the flow run's logger.
        ctx: the run.
        spec: the run spec every chunk receives.
        rows: the manifest rows to process.
        shard_index: the shard in a fan-out run.

    Returns:
        One summary per chunk (a failed chunk's rows are ``task_failed`` error rows).
    """
    log_phi = ctx.settings.log_phi
    engine = shared_engine(spec.engine, spec.model.chat_format, log_phi)  # loads here: a bad model fails the run now
    logger.info("run %s: model %s (%s) ready, loaded in %.1f s", spec.run_id, spec.model.model_name,
                spec.model.chat_format, engine.load_seconds)
    plan = ctx.memory
    if plan is not None and plan.n_parallel < plan.requested_parallel:
        logger.warning("run %s: n_parallel %d needs about %.0f MiB more than the %.0f MiB of %s memory; decoding %d "
                       "pages together instead (weights %.0f MiB, KV cache %.0f MiB per page, compute %.0f MiB)",
                       spec.run_id, plan.requested_parallel,
                       plan.needed_mb + (plan.requested_parallel - plan.n_parallel) * plan.kv_mb_per_page - plan.budget_mb,
                       plan.budget_mb, plan.budget_source, plan.n_parallel, plan.weights_mb, plan.kv_mb_per_page,
                       plan.compute_mb)
    if ctx.saved_defaults:
        logger.info("run %s: options from the model zip's saved parameters: %s", spec.run_id, ", ".join(sorted(ctx.saved_defaults)))
    documents = {r.document_id for r in rows}  # only their buckets of the done index are read
    done = results.DoneKeys() if spec.force else done_index.load_done_keys(ctx.storage, ctx.output, documents)
    if len(done):
        logger.info("run %s: %d pages already have ok results in the output and are skipped", spec.run_id, len(done))
    if spec.documents.scope == "document":  # a document's rows stay in one chunk
        chunks = document_chunks(rows, chunk_rows(ctx))
    else:
        chunks = split_chunks(rows, chunk_rows(ctx))
    futures = infer_chunk.map(
        list(range(len(chunks))), chunks, unmapped(spec), unmapped(ctx.storage), unmapped(done),
        unmapped(shard_index), unmapped(log_phi),
    )
    # A run of one chunk goes from 0 to 100 % at its end, which its state already says: no artifact (two API
    # calls saved on every small run).
    progress = ChunkProgress(f"medvlm run {spec.run_id}" + (f" shard {shard_index}" if shard_index is not None else "")
                             + f": manifest rows done of {len(rows)}") if len(chunks) > 1 else None
    summaries: list[ChunkSummary] = []
    finished_rows = 0
    for index, future in enumerate(futures):
        try:
            summary = future.result()
        except Exception as exc:  # the chunk's rows must still be accounted for
            logger.error("chunk %d failed (%s); recording its %d rows as errors", index, type(exc).__name__, len(chunks[index]))
            summary = stage_failed_rows(
                index, chunks[index], spec, ctx.storage, f"inference task failed ({type(exc).__name__})", shard_index
            )
        summaries.append(summary)
        finished_rows += len(chunks[index])
        logger.info("progress: %d/%d manifest rows done", finished_rows, len(rows))
        if progress is not None:
            progress.update(100.0 * finished_rows / max(1, len(rows)))
    return summaries


class ChunkProgress:
    """A Prefect progress artifact for a flow run of several chunks, updated as its chunks finish (a convenience:
    an artifact the server refuses never fails the run).

    Args:
        description: what the percentage counts (no document data).
    """

    def __init__(self, description: str):
        try:
            self.artifact_id = create_progress_artifact(0.0, description=description)
        except Exception:
            self.artifact_id = None

    def update(self, percent: float) -> None:
        """Set the artifact to ``percent`` (0 to 100).

        Args:
            percent: the share of the run's rows done.
        """
        if self.artifact_id is not None:
            try:
                update_progress_artifact(self.artifact_id, percent)
            except Exception:
                pass
