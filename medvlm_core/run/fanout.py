"""A fan-out run, free of orchestration: plan shards, run each shard, publish every shard's rows as one run.

The orchestrator launches and retries the shards (Prefect deployment runs, Airflow mapped tasks); these functions
hold the rules around them. ``plan_shards`` validates the manifest a batch at a time into shard plan files
(``medvlm_core.run.shards``); ``run_shard`` runs one shard under its parent's run id and leaves a record;
``publish_shards`` reads the records, turns each shard that never finished into ``task_failed`` error rows (no
row is lost) and publishes the run.

An orchestrator whose planning and publishing steps are separate processes (Airflow) saves the plan's counts and
quarantined rows with ``save_fanout_plan`` and reads them back with ``load_fanout_plan``, and hands the output's
lease from step to step (``medvlm_core.run.context.hand_over_output``).
"""

from __future__ import annotations

import os
import socket
from array import array
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import pyarrow.parquet as pq

from medvlm_core.errors import RunError
from medvlm_core.inputs.manifest import ManifestPlan, plan_manifest
from medvlm_core.model.files import ModelIdentity
from medvlm_core.output.records import JsonRecord
from medvlm_core.output.results import utc_now
from medvlm_core.run.accounting import ChunkSummary, merge_summaries
from medvlm_core.run.chunks import discard_staged_shard, stage_failed_rows
from medvlm_core.run.context import RunContext, make_spec, prepare_model
from medvlm_core.run.lifecycle import RunHooks, finish_run, run_chunks
from medvlm_core.run.params import EngineConfig
from medvlm_core.run.shards import (
    SHARDS_PER_FILE,
    ShardPlanWriter,
    ShardRecord,
    ShardWorker,
    read_shard_record,
    read_shard_rows,
    write_shard_record,
)


def plan_shards(logger: Any, ctx: RunContext, manifest: str, shard_size: int) -> tuple[ManifestPlan, int]:
    """Validate the manifest a batch at a time and write each shard's rows to its plan file in the run's staging.

    The caller holds the output's lease (``lifecycle.guard_output``) before it plans.

    Args:
        logger: the orchestrator's logger.
        ctx: the fan-out run.
        manifest: the manifest URI (normalised).
        shard_size: manifest rows per shard (each shard loads the model once).

    Returns:
        The plan (its rows went to the plan files) and the number of shards.

    Raises:
        RunError: the manifest cannot be read, or a document's rows are apart at document scope.
    """
    writer = ShardPlanWriter(ctx.storage, ctx.output, ctx.run_id, shard_size,
                             keep_documents=ctx.options.documents.scope == "document")
    plan = plan_manifest(manifest, ctx.storage, ctx.policy, sink=writer)
    count = writer.close()
    logger.info("run %s: %d manifest rows (%d quarantined) in %d shards", ctx.run_id, plan.total_rows,
                len(plan.quarantined), count)
    return plan, count


def run_shard(logger: Any, ctx: RunContext, shard_index: int, hooks: RunHooks | None = None,
              retry: bool = False) -> ShardRecord:
    """Process one shard (the rows its parent planned for it), stage its results and write its record.

    Args:
        logger: the orchestrator's logger.
        ctx: the shard's context, under its parent's run id (``start_run(..., run_id=parent)``).
        shard_index: the shard.
        hooks: the orchestrator's hooks (``source_id`` is recorded as the shard's worker run).
        retry: an earlier attempt of this shard may have staged part of it: remove that first.

    Returns:
        The shard's record (also written to the run's staging).

    Raises:
        RunError: the shard's plan is missing, or the model cannot be used.
    """
    hooks = hooks or RunHooks()
    rows = read_shard_rows(ctx.storage, ctx.output, ctx.run_id, shard_index)
    engine, identity = prepare_model(ctx)
    spec = make_spec(ctx, engine, identity)
    if retry:
        discard_staged_shard(ctx.storage, spec, shard_index)
    logger.info("shard %d of run %s: %d manifest rows", shard_index, ctx.run_id, len(rows))
    total = merge_summaries(run_chunks(logger, ctx, spec, rows, shard_index, hooks))
    total.storage_retries += ctx.storage.retries  # this worker's object-store retries, for the run row
    worker = ShardWorker(socket.gethostname(), os.getpid(), ctx.settings.cuda_visible_devices, hooks.source_id)
    record = ShardRecord(shard_index, total.to_json(), asdict(identity), spec.params_json, worker,
                         ctx.started.isoformat(), utc_now().isoformat(), ctx.memory.as_dict() if ctx.memory else None)
    write_shard_record(ctx.storage, ctx.output, ctx.run_id, record)
    return record


def publish_shards(
    logger: Any,
    ctx: RunContext,
    manifest: str,
    plan: ManifestPlan,
    count: int,
    failed: dict[int, str],
    hooks: RunHooks | None = None,
    audit: dict[str, Any] | None = None,
    otherwise: str = "without leaving its record",
) -> dict[str, Any]:
    """Publish a fan-out: every finished shard's staged rows, and ``task_failed`` error rows for every shard
    without a record, as one run.

    The caller holds the output's lease.

    Args:
        logger: the orchestrator's logger.
        ctx: the fan-out run.
        manifest: the manifest URI (normalised).
        plan: the run's plan (``plan_shards`` or ``load_fanout_plan``).
        count: the number of shards.
        failed: why each shard that failed for good failed, as the end of "shard N failed ..." (``after 2
            attempt(s): could not launch ...``).
        hooks: the orchestrator's hooks.
        audit: how the orchestrator ran the shards (attempts, concurrency), for the commit record.
        otherwise: why a shard without a record and not in ``failed`` failed.

    Returns:
        The run's summary, with ``shards`` and ``failed_shards`` (their indexes).
    """
    records = [r for i in range(count) if (r := read_shard_record(ctx.storage, ctx.output, ctx.run_id, i)) is not None]
    summaries = [ChunkSummary.from_json(r.summary) for r in records]
    finished = {r.shard_index for r in records}
    missing = [i for i in range(count) if i not in finished]
    reasons = {i: failed.get(i) or otherwise for i in missing}
    if records:
        identity, params = ModelIdentity(**records[0].identity), records[0].params_json
    else:  # no shard finished: identify the model here so the error rows still say which model was asked for
        engine, identity = prepare_model(ctx)
        params = make_spec(ctx, engine, identity).params_json
    if missing:
        # No model is loaded here: the spec only labels the error rows (its engine config is a placeholder).
        spec = make_spec(ctx, EngineConfig.of("", "", ctx.options.engine), identity)
        for index in missing:
            rows = read_shard_rows(ctx.storage, ctx.output, ctx.run_id, index)
            discard_staged_shard(ctx.storage, spec, index)  # a lost attempt may have staged part of it
            logger.error("shard %d failed (%s); recording its %d rows as errors", index, reasons[index], len(rows))
            summaries.append(stage_failed_rows(0, rows, spec, ctx.storage,
                                               f"shard {index} failed {reasons[index]}", index))
    shard_counts = [{"shard": r.shard_index, "worker": r.worker.hostname, "pages_ok": s.pages_ok,
                     "pages_error": s.pages_error, "pages_skipped": s.pages_skipped}
                    for r, s in zip(records, summaries)]
    audit = {
        "shards": [{"shard_index": r.shard_index, "worker": asdict(r.worker), "started_at": r.started_at,
                    "finished_at": r.finished_at} for r in records],
        "failed_shards": {str(i): reasons[i] for i in missing},
        "shard_counts": shard_counts,
        **(audit or {}),
    }
    summary = finish_run(logger, ctx, manifest, plan, summaries, identity, params, audit=audit,
                         memory=next((r.memory for r in records if r.memory), None), hooks=hooks)
    summary["shards"] = count
    summary["failed_shards"] = missing
    return summary


def failed_message(summary: dict[str, Any], reasons: dict[int, str],
                   otherwise: str = "finished without its record") -> str | None:
    """The one-line failure of a fan-out that published some shards as error rows, or None when none failed.

    Args:
        summary: the run's summary (``publish_shards``).
        reasons: why each shard failed, by shard.
        otherwise: why a shard not in ``reasons`` failed.

    Returns:
        The message (shard indexes and reasons only).
    """
    missing = summary.get("failed_shards") or []
    if not missing:
        return None
    detail = "; ".join(f"shard {i}: {reasons.get(i, otherwise)}" for i in missing)
    return (f"{len(missing)} of {summary['shards']} shard(s) failed ({detail}); their rows are error rows in run "
            f"{summary['run_id']}")


@dataclass(frozen=True)
class FanoutPlanRecord(JsonRecord):
    """What the publishing step of a fan-out in separate processes needs from its planning step
    (``_staging/<run_id>/plans/plan.json``). The valid rows' numbers are read back from the plan files.

    Attributes:
        run_id: the fan-out run.
        manifest: the manifest URI.
        started_at: when the run started (ISO 8601, UTC).
        shards: how many shards it has.
        total_rows: the manifest's rows.
        quarantined: the refused rows (quarantine records, without run id and time).
    """

    KIND: ClassVar[str] = "fanout-plan"

    run_id: str
    manifest: str
    started_at: str
    shards: int
    total_rows: int
    quarantined: list[dict[str, Any]]


def save_fanout_plan(ctx: RunContext, manifest: str, plan: ManifestPlan, shards: int) -> None:
    """Write the plan's record for the run's publishing step.

    Args:
        ctx: the fan-out run.
        manifest: the manifest URI (normalised).
        plan: the plan (``plan_shards``).
        shards: the number of shards.
    """
    record = FanoutPlanRecord(ctx.run_id, manifest, ctx.started.isoformat(), shards, plan.total_rows, plan.quarantined)
    ctx.storage.write_bytes_atomic(ctx.output.fanout_plan(ctx.run_id), record.to_bytes())


def load_fanout_plan(ctx: RunContext) -> tuple[FanoutPlanRecord, ManifestPlan]:
    """The plan a run's planning step saved, with its valid row numbers read back from the shard plan files.

    Args:
        ctx: the fan-out run (its run id).

    Returns:
        The record and the plan (without rows: they are in the plan files).

    Raises:
        RunError: the record is missing (was the run's staging cleared?) or from a newer medvlm.
    """
    url = ctx.output.fanout_plan(ctx.run_id)
    if not ctx.storage.exists(url):
        raise RunError(f"run {ctx.run_id}: its plan {url} is missing (was the run's staging cleared?)")
    record = FanoutPlanRecord.from_bytes(ctx.storage.read_bytes(url), url)
    numbers = array("q")
    for part in range((record.shards + SHARDS_PER_FILE - 1) // SHARDS_PER_FILE):
        part_url = ctx.output.shard_plan(ctx.run_id, part)
        fs, path = ctx.storage.filesystem(part_url)

        def read(fs=fs, path=path):
            with fs.open(path, "rb") as f:
                return pq.read_table(f, columns=["row_number"]).column("row_number").to_pylist()

        numbers.extend(ctx.storage.call(part_url, read))
    return record, ManifestPlan(quarantined=record.quarantined, total_rows=record.total_rows, row_numbers=numbers)
