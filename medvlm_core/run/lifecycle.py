"""The run API every orchestrator calls: open a run, guard its output, infer chunks, publish.

The Prefect flows (``medvlm.flows``) and the Airflow operators (``medvlm.airflow``) are thin layers over these
functions, so the rules of a run (validation, quarantine, skipping done pages, the output's lease, staging,
publishing, accounting) are written once, here and in the modules it composes. What an orchestrator adds is a
``RunHooks``: how chunks are mapped (Prefect tasks, or in this process), how the publish step runs and what it
reports along the way (artifacts, events, progress). The defaults run everything in this process and report
nothing but log lines.

A batch run is ``start_run`` -> ``run_batch``. A fan-out is ``medvlm_core.run.fanout``: plan shards, run each
shard, publish them as one run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

from medvlm_core import storage as st
from medvlm_core.engine.registry import shared_engine
from medvlm_core.inputs.manifest import ManifestPlan, ManifestRow, read_manifest
from medvlm_core.model.files import ModelIdentity
from medvlm_core.output import done_index, publish, results
from medvlm_core.output.publish import run_date_of
from medvlm_core.output.results import utc_now
from medvlm_core.run.accounting import ChunkSummary, RunFacts, merge_summaries, run_row, run_summary
from medvlm_core.run.chunks import stage_chunk, stage_failed_rows
from medvlm_core.run.context import (
    CredentialsSource,
    RunContext,
    acquire_output,
    build_storage,
    check_output_writable,
    chunk_rows,
    ensure_output_held,
    make_run_id,
    make_spec,
    open_run,
    prepare_model,
    recover_output,
    release_output,
)
from medvlm_core.run.documents import document_chunks
from medvlm_core.run.options import RunOptions
from medvlm_core.run.spec import RunSpec
from medvlm_core.settings import Settings

# The counts of a run's summary that may go where document data must not (an orchestrator's XCom, events).
COUNT_KEYS = ("run_id", "scope", "manifest_rows", "quarantined_rows", "skipped_rows", "skipped_pages", "pages_ok",
              "pages_error", "pages_truncated", "documents_ok", "documents_error", "reconciled", "storage_retries",
              "wall_seconds", "pages_per_second", "completion_tokens_per_second", "error_types", "published", "output")


class ChunkMapper(Protocol):
    """Runs the inference of a run's chunks and yields, in chunk order, each chunk's counts or the exception
    that failed it (the caller turns a failed chunk's rows into error rows)."""

    def __call__(self, logger: Any, chunks: list[list[ManifestRow]], spec: RunSpec, storage: st.Storage,
                 done: results.DoneKeys, shard_index: int | None, log_phi: bool
                 ) -> Iterable[ChunkSummary | BaseException]: ...


def infer_chunk_here(logger: Any, index: int, rows: list[ManifestRow], spec: RunSpec, storage: st.Storage,
                     done: results.DoneKeys | None, shard_index: int | None, log_phi: bool) -> ChunkSummary:
    """One chunk in this process: the process's shared engine over its rows, their result rows staged, its counts
    logged (what an orchestrator's chunk task runs).

    Args:
        logger: where the chunk's counts are logged.
        index: the chunk's number in its run (or shard): names its files.
        rows: its manifest rows.
        spec: the run.
        storage: where documents and the output are.
        done: result keys already answered (their pages are skipped unless ``spec.force``).
        shard_index: the shard in a fan-out run.
        log_phi: the ``MEDVLM_LOG_PHI`` debug setting.

    Returns:
        The chunk's counts.
    """
    engine = shared_engine(spec.engine, spec.model.chat_format, log_phi)
    summary = stage_chunk(engine, index, rows, spec, storage, done, shard_index)
    logger.info("chunk %d: %d manifest rows -> %d ok, %d error, %d skipped pages", index, len(rows),
                summary.pages_ok, summary.pages_error, summary.pages_skipped)
    return summary


def in_process_chunks(logger: Any, chunks: list[list[ManifestRow]], spec: RunSpec, storage: st.Storage,
                      done: results.DoneKeys, shard_index: int | None, log_phi: bool
                      ) -> Iterator[ChunkSummary | Exception]:
    """The ``ChunkMapper`` of an orchestrator without tasks of its own: the chunks one after another, here.

    Args:
        logger: where each chunk's counts are logged.
        chunks: the chunks' rows.
        spec: the run.
        storage: where documents and the output are.
        done: result keys already answered.
        shard_index: the shard in a fan-out run.
        log_phi: the ``MEDVLM_LOG_PHI`` debug setting.

    Yields:
        Each chunk's counts, or the exception that failed it.
    """
    for index, rows in enumerate(chunks):
        try:
            yield infer_chunk_here(logger, index, rows, spec, storage, done, shard_index, log_phi)
        except Exception as exc:  # the caller records the chunk's rows as errors
            yield exc


@dataclass
class RunHooks:
    """What an orchestrator plugs into a run. The defaults run everything in this process and report only in the
    log.

    Attributes:
        source_id: the orchestrator's own run (a Prefect flow run id, an Airflow ``dag_id/run_id``): it seeds the
            run id and is recorded as the runs row's ``flow_run_id``.
        map_chunks: how chunks are run (``in_process_chunks``, or an orchestrator's mapped tasks).
        publish: the publish step (``medvlm_core.output.publish.publish_run`` or a task wrapping it).
        progress: makes a progress reporter for a run of several chunks (called with a description, returns a
            callable taking the percentage done), or None.
        on_tables: called with the run's summary (and a fan-out's ``shard_counts``) once every table is visible
            (before the done index and the commit record are written).
        on_publish_end: called when the publish step ends, whether it succeeded or not.
        on_published: called with the run's summary once it is published.
    """

    source_id: str | None = None
    map_chunks: ChunkMapper = in_process_chunks
    publish: Callable[..., dict[str, str]] = publish.publish_run
    progress: Callable[[str], Callable[[float], None]] | None = None
    on_tables: Callable[[dict[str, Any]], None] | None = None
    on_publish_end: Callable[[], None] | None = None
    on_published: Callable[[dict[str, Any]], None] | None = None


def start_run(
    output: str,
    model: str,
    mmproj: str | None,
    options: RunOptions | dict[str, Any] | None,
    credentials: CredentialsSource | None = None,
    run_id: str | None = None,
    source_id: str | None = None,
) -> RunContext:
    """Open a run from an orchestrator's parameters: options validated, settings read once, storage built.

    Args:
        output: the output URI.
        model: the model URI.
        mmproj: the mmproj URI.
        options: the run's options (an instance, a flat or nested dict, or None).
        credentials: resolves the S3 credentials for the run's storage options (a Prefect block, an Airflow
            connection); None: the AWS environment only.
        run_id: the run's id when it exists already (a shard or a publish step works under it); None makes one.
        source_id: the orchestrator's own run id (seeds a new run id).

    Returns:
        The run's context.

    Raises:
        RunError: bad options, locations outside the policy, unusable credentials or extraction.
    """
    opts = RunOptions.parse(options)
    settings = Settings()
    started = utc_now()
    storage = build_storage(opts.storage, settings, credentials)
    run_id = run_id or make_run_id(started, source_id)
    return open_run(run_id, started, output, model, mmproj, options, settings, storage)


def guard_output(logger: Any, ctx: RunContext) -> None:
    """Before a run decides what is done: check the output is writable, take its lease (one run at a time; wait
    for another run's, or fail, as ``on_busy`` says), finish interrupted publishes.

    The caller gives the lease back (``release_output``) in a ``finally``.

    Args:
        logger: the orchestrator's logger.
        ctx: the run.

    Raises:
        RunError: the output cannot be written, or another run holds its lease (the message names it).
    """
    check_output_writable(ctx)
    acquire_output(ctx, logger)
    for run_id in recover_output(ctx):
        logger.warning("output %s: finished publishing run %s, which was interrupted while publishing",
                       ctx.output.root, run_id)


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


def _log_memory_plan(logger: Any, ctx: RunContext, spec: RunSpec) -> None:
    plan = ctx.memory
    if plan is not None and plan.n_parallel < plan.requested_parallel:
        logger.warning("run %s: n_parallel %d needs about %.0f MiB more than the %.0f MiB of %s memory; decoding %d "
                       "pages together instead (weights %.0f MiB, KV cache %.0f MiB per page, compute %.0f MiB)",
                       spec.run_id, plan.requested_parallel,
                       plan.needed_mb + (plan.requested_parallel - plan.n_parallel) * plan.kv_mb_per_page - plan.budget_mb,
                       plan.budget_mb, plan.budget_source, plan.n_parallel, plan.weights_mb, plan.kv_mb_per_page,
                       plan.compute_mb)


def run_chunks(logger: Any, ctx: RunContext, spec: RunSpec, rows: list[ManifestRow], shard_index: int | None = None,
               hooks: RunHooks | None = None) -> list[ChunkSummary]:
    """Load the model (once per process), run the chunks through ``hooks.map_chunks``, account for failed chunks.

    Args:
        logger: the orchestrator's logger.
        ctx: the run.
        spec: the run spec every chunk receives.
        rows: the manifest rows to process.
        shard_index: the shard in a fan-out run.
        hooks: the orchestrator's hooks (default: in this process).

    Returns:
        One summary per chunk (a failed chunk's rows are ``task_failed`` error rows).
    """
    hooks = hooks or RunHooks()
    log_phi = ctx.settings.log_phi
    engine = shared_engine(spec.engine, spec.model.chat_format, log_phi)  # loads here: a bad model fails the run now
    logger.info("run %s: model %s (%s) ready, loaded in %.1f s", spec.run_id, spec.model.model_name,
                spec.model.chat_format, engine.load_seconds)
    _log_memory_plan(logger, ctx, spec)
    if ctx.saved_defaults:
        logger.info("run %s: options from the model zip's saved parameters: %s", spec.run_id,
                    ", ".join(sorted(ctx.saved_defaults)))
    documents = {r.document_id for r in rows}  # only their buckets of the done index are read
    done = results.DoneKeys() if spec.force else done_index.load_done_keys(ctx.storage, ctx.output, documents)
    if len(done):
        logger.info("run %s: %d pages already have ok results in the output and are skipped", spec.run_id, len(done))
    if spec.documents.scope == "document":  # a document's rows stay in one chunk
        chunks = document_chunks(rows, chunk_rows(ctx))
    else:
        chunks = split_chunks(rows, chunk_rows(ctx))
    # A run of one chunk goes from 0 to 100 % at its end, which its state already says: no progress reporter.
    report = None
    if hooks.progress is not None and len(chunks) > 1:
        report = hooks.progress(f"medvlm run {spec.run_id}" + (f" shard {shard_index}" if shard_index is not None else "")
                                + f": manifest rows done of {len(rows)}")
    summaries: list[ChunkSummary] = []
    finished_rows = 0
    outcomes = hooks.map_chunks(logger, chunks, spec, ctx.storage, done, shard_index, log_phi)
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, BaseException):  # the chunk's rows must still be accounted for
            reason = type(outcome).__name__
            logger.error("chunk %d failed (%s); recording its %d rows as errors", index, reason, len(chunks[index]))
            outcome = stage_failed_rows(index, chunks[index], spec, ctx.storage, f"inference task failed ({reason})",
                                        shard_index)
        summaries.append(outcome)
        finished_rows += len(chunks[index])
        logger.info("progress: %d/%d manifest rows done", finished_rows, len(rows))
        if report is not None:
            report(100.0 * finished_rows / max(1, len(rows)))
    return summaries


def finish_run(
    logger: Any,
    ctx: RunContext,
    manifest: str,
    plan: ManifestPlan,
    summaries: list[ChunkSummary],
    identity: ModelIdentity,
    params: str,
    audit: dict[str, Any] | None = None,
    memory: dict | None = None,
    hooks: RunHooks | None = None,
) -> dict[str, Any]:
    """Reconcile the counts and publish the run's tables atomically.

    Args:
        logger: the orchestrator's logger.
        ctx: the run.
        manifest: the manifest URI (normalised).
        plan: the validated manifest.
        summaries: the chunks' (or shards') counts.
        identity: the model's identity.
        params: the run's ``params_json``.
        audit: how the run ran (shards, workers), for the commit record.
        memory: the engine's memory plan (default: this process's, when it planned one).
        hooks: the orchestrator's hooks (the publish step, what it reports).

    Returns:
        The run's summary (``medvlm_core.run.accounting.run_summary``).

    Raises:
        RunError: the run lost the output's lease to another run (nothing is published); the lease is given
            back once the run is published.
    """
    hooks = hooks or RunHooks()
    total = merge_summaries(summaries)
    facts = RunFacts(
        run_id=ctx.run_id, flow_run_id=hooks.source_id, manifest=manifest, output=ctx.output.root,
        started=ctx.started, finished=utc_now(), identity=identity, params_json=params,
        default_prompt=ctx.default_prompt, storage_retries=ctx.storage.retries,
        memory=memory or (ctx.memory.as_dict() if ctx.memory else None), scope=ctx.options.documents.scope,
    )
    row = run_row(facts, plan, total)
    quarantine_rows = [dict(q, run_id=ctx.run_id, manifest_uri=manifest, created_at=facts.finished)
                       for q in plan.quarantined]
    ensure_output_held(ctx)  # a run whose lease was taken over must not publish: the other run does these pages
    shard_counts = (audit or {}).get("shard_counts")

    def tables_visible(tables: dict[str, str]) -> None:
        summary = run_summary(row, total, tables)
        hooks.on_tables(dict(summary, shard_counts=shard_counts) if shard_counts else summary)
    try:
        published = hooks.publish(ctx.storage, ctx.output, ctx.run_id, run_date_of(ctx.started), quarantine_rows, row,
                                  audit, on_tables=tables_visible if hooks.on_tables is not None else None)
        release_output(ctx)  # published: the next run on this output may start deciding what is done
    finally:
        if hooks.on_publish_end is not None:
            hooks.on_publish_end()
    summary = run_summary(row, total, published)
    if hooks.on_published is not None:
        hooks.on_published(summary)
    logger.info("run %s done: %d ok, %d error, %d skipped pages; %d quarantined rows; reconciled=%s", ctx.run_id,
                total.pages_ok, total.pages_error, total.pages_skipped, len(plan.quarantined), row["reconciled"])
    return summary


def run_batch(logger: Any, ctx: RunContext, manifest: str, hooks: RunHooks | None = None) -> dict[str, Any]:
    """A whole run in this process: read and validate the manifest, take the output's lease, load the model, run
    the chunks (skipping done pages), publish.

    Args:
        logger: the orchestrator's logger.
        ctx: the run (``start_run``).
        manifest: the manifest URI.
        hooks: the orchestrator's hooks.

    Returns:
        The run's summary.

    Raises:
        RunError: the run cannot start (unreadable manifest, missing model, busy output, ...): one clear message,
            before any document is touched.
    """
    manifest = st.normalize(manifest)
    plan = read_manifest(manifest, ctx.storage, ctx.policy)
    logger.info("run %s: %d manifest rows, %d quarantined", ctx.run_id, plan.total_rows, len(plan.quarantined))
    try:
        guard_output(logger, ctx)  # takes the output's lease: given back here whatever happens
        engine, identity = prepare_model(ctx)
        spec = make_spec(ctx, engine, identity)
        summaries = run_chunks(logger, ctx, spec, plan.rows, hooks=hooks)
        return finish_run(logger, ctx, manifest, plan, summaries, identity, spec.params_json, hooks=hooks)
    finally:
        release_output(ctx)


def counts_of(summary: dict[str, Any]) -> dict[str, Any]:
    """A run's summary without document data (no slowest pages' document ids): what may go into an
    orchestrator's XCom, events or a log line.

    Args:
        summary: a run's summary.

    Returns:
        Its counts and locations.
    """
    return {k: summary[k] for k in COUNT_KEYS if k in summary}
