"""The ``medvlm-fanout`` flow: spread one manifest over GPU workers as ``medvlm-shard`` runs, then publish once.

The parent (on a CPU pool) validates the manifest, splits the valid rows into shards sized to amortise the
model load, launches one ``medvlm-shard`` deployment run per shard (they run in parallel on as many GPU
workers as there are), waits for all of them, relaunches a failed or lost shard a bounded number of times,
and publishes every shard's rows as one run. A shard that still failed has its rows recorded as
``task_failed`` error rows (nothing is lost) and the flow run fails, naming the shard and the reason.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prefect import flow, get_client, get_run_logger
from prefect.deployments import run_deployment
from prefect.flow_runs import wait_for_flow_run
from prefect.states import Cancelled, Failed

from flows.execute import split_chunks
from flows.finish import finish_run
from flows.setup import guard_output, start_run
from flows.shard import read_shard_record
from medvlm_core import storage as st
from medvlm_core.accounting import ChunkSummary
from medvlm_core.chunks import discard_staged_shard, stage_failed_rows
from medvlm_core.config import EngineConfig
from medvlm_core.errors import RunError
from medvlm_core.manifest import read_manifest
from medvlm_core.models import ModelIdentity
from medvlm_core.options import RunOptions
from medvlm_core.run import RunContext, make_spec, prepare_model, release_output


@flow(name="medvlm-fanout", log_prints=False, validate_parameters=False)
async def medvlm_fanout(
    manifest: str,
    output: str,
    model: str,
    mmproj: str | None = None,
    options: RunOptions | None = None,
    shard_size: int = 256,
    max_shard_attempts: int = 2,
    shard_deployment: str = "medvlm-shard/medvlm-shard",
    shard_timeout_seconds: float = 6 * 3600,
) -> Any:
    """Run ``manifest`` through ``shard_deployment`` runs in parallel and publish the results under ``output``.

    Args:
        manifest: the manifest URI.
        output: the output URI.
        model: the model URI.
        mmproj: the mmproj URI.
        options: the run options (``medvlm_core.options.RunOptions``), handed to every shard.
        shard_size: manifest rows per shard (each shard loads the model once).
        max_shard_attempts: launches per shard before its rows become ``task_failed`` error rows.
        shard_deployment: the ``medvlm-shard`` deployment to launch.
        shard_timeout_seconds: a shard lost with its worker is noticed after this long and relaunched.

    Returns:
        The run's summary (with ``shards``), or a Failed state naming the shards that failed.
    """
    logger = get_run_logger()
    try:
        ctx = start_run(output, model, mmproj, options)
        try:  # _fan_out takes the output's lease (guard_output); the shards work under it
            return await _fan_out(logger, ctx, st.normalize(manifest), shard_size, max_shard_attempts, shard_deployment,
                                  shard_timeout_seconds)
        finally:
            release_output(ctx)
    except RunError as exc:
        logger.error("run failed: %s", exc)
        return Failed(message=str(exc))


async def _run_shard(deployment: str, parameters: dict, timeout: float) -> tuple[bool, str]:
    """Launch one shard run and wait for it. (succeeded, reason)."""
    try:
        child = await run_deployment(name=deployment, parameters=parameters, timeout=0, as_subflow=True)
    except Exception as exc:  # unknown deployment, server unreachable: this shard failed, the others go on
        return False, f"could not launch {deployment} ({type(exc).__name__})"
    try:
        final = await wait_for_flow_run(child.id, timeout=timeout, poll_interval=2)
    except Exception as exc:  # FlowRunWaitTimeout: the worker was probably lost with its run
        async with get_client() as client:
            try:
                await client.set_flow_run_state(child.id, Cancelled(message="medvlm: shard timed out"), force=True)
            except Exception:
                pass
        return False, f"no result within {timeout:.0f} s ({type(exc).__name__})"
    if final.state is not None and final.state.is_completed():
        return True, ""
    state = final.state
    return False, f"{state.type.value.lower() if state else 'unknown'}: {state.message if state else ''}"


async def _fan_out(logger: Any, ctx: RunContext, manifest: str, shard_size: int, max_attempts: int, deployment: str,
                   timeout: float) -> Any:
    storage, layout, run_id = ctx.storage, ctx.output, ctx.run_id
    plan = read_manifest(manifest, storage, ctx.policy)
    guard_output(logger, ctx)
    shards = split_chunks([r.row_number for r in plan.rows], shard_size)
    logger.info("run %s: %d manifest rows (%d quarantined) in %d shards", run_id, plan.total_rows, len(plan.quarantined), len(shards))

    pending = list(range(len(shards)))
    reasons: dict[int, str] = {}
    attempts = {i: 0 for i in pending}
    options = ctx.requested  # each shard resolves the same defaults (a model zip's saved parameters) itself
    for attempt in range(1, max(1, max_attempts) + 1):
        if not pending:
            break
        for i in pending:
            attempts[i] = attempt
        parameters = [
            dict(manifest=manifest, output=layout.root, model=ctx.model, mmproj=ctx.mmproj, run_id=run_id,
                 shard_index=i, row_numbers=shards[i], options=options)
            for i in pending
        ]
        outcomes = await asyncio.gather(*[_run_shard(deployment, p, timeout) for p in parameters])
        failed = []
        for index, (ok, reason) in zip(pending, outcomes):
            if ok and read_shard_record(storage, layout, run_id, index) is not None:
                reasons.pop(index, None)
            else:
                reasons[index] = reason or "finished without its record"
                failed.append(index)
                logger.warning("shard %d attempt %d failed: %s", index, attempt, reasons[index])
        pending = failed

    records = [r for i in range(len(shards)) if (r := read_shard_record(storage, layout, run_id, i)) is not None]
    summaries = [ChunkSummary.from_json(r["summary"]) for r in records]
    if records:
        identity, params = ModelIdentity(**records[0]["identity"]), records[0]["params_json"]
    else:  # no shard finished: identify the model here so the error rows still say which model was asked for
        engine, identity = prepare_model(ctx)
        params = make_spec(ctx, engine, identity).params_json
    if pending:
        # No model is loaded here: the spec only labels the error rows (its engine config is a placeholder).
        spec = make_spec(ctx, EngineConfig.of("", "", ctx.options.engine), identity)
        by_number = {r.row_number: r for r in plan.rows}
        for index in pending:
            rows = [by_number[n] for n in shards[index]]
            discard_staged_shard(storage, spec, index)  # a lost attempt may have staged part of it
            summaries.append(
                stage_failed_rows(0, rows, spec, storage, f"shard {index} failed after {max_attempts} attempt(s): {reasons[index]}", index)
            )
    summary = finish_run(
        logger, ctx, manifest, plan, summaries, identity, params,
        audit={"shards": [
            {k: r[k] for k in ("shard_index", "worker", "started_at", "finished_at")} for r in records
        ], "failed_shards": {str(i): reasons[i] for i in pending}, "shard_attempts": {str(i): n for i, n in attempts.items()}},
        memory=next((r["memory"] for r in records if r.get("memory")), None),
    )
    summary["shards"] = len(shards)
    if pending:
        detail = "; ".join(f"shard {i}: {reasons[i]}" for i in pending)
        return Failed(message=f"{len(pending)} of {len(shards)} shard(s) failed ({detail}); their rows are error rows in run {run_id}")
    return summary
