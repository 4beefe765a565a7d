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

from flows.common import (
    RunOptions, check_output_writable, finish_run, make_run_id, make_spec, merge_summaries, prepare_model, recover_output, split_chunks,
)
from flows.shard import read_shard_record
from medvlm_core import storage as st
from medvlm_core.config import Settings
from medvlm_core.errors import RunError
from medvlm_core.manifest import read_manifest
from medvlm_core.models import ModelIdentity
from medvlm_core.results import utc_now
from tasks.inference import ChunkSummary, discard_staged_shard, stage_failed_rows


@flow(name="medvlm-fanout", log_prints=False)
async def medvlm_fanout(
    manifest: str,
    output: str,
    model: str,
    mmproj: str | None = None,
    options: dict[str, Any] | None = None,
    shard_size: int = 256,
    max_shard_attempts: int = 2,
    shard_deployment: str = "medvlm-shard/medvlm-shard",
    shard_timeout_seconds: float = 6 * 3600,
) -> Any:
    """Run ``manifest`` through ``shard_deployment`` runs in parallel and publish the results under ``output``.

    ``options`` are the run options (flows.common.RunOptions: prompt, generation, limits, S3 settings).
    A shard lost with its worker is noticed after ``shard_timeout_seconds`` and relaunched.
    """
    logger = get_run_logger()
    try:
        opts = RunOptions.from_dict(options)
        return await _fan_out(
            logger, st.normalize(manifest), st.normalize(output), model, mmproj, opts, shard_size,
            max_shard_attempts, shard_deployment, shard_timeout_seconds,
        )
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


async def _fan_out(logger, manifest, output, model, mmproj, opts, shard_size, max_attempts, deployment, timeout) -> Any:
    settings = Settings.from_env()
    storage = opts.storage()
    started = utc_now()
    run_id = make_run_id(started)
    policy = opts.check_locations(output, model, mmproj)
    opts.register_extraction(storage)
    plan = read_manifest(manifest, storage, policy)
    check_output_writable(storage, output, run_id)
    recover_output(logger, storage, output)
    shards = split_chunks([r.row_number for r in plan.rows], shard_size)
    logger.info("run %s: %d manifest rows (%d quarantined) in %d shards", run_id, plan.total_rows, len(plan.quarantined), len(shards))

    pending = list(range(len(shards)))
    reasons: dict[int, str] = {}
    attempts = {i: 0 for i in pending}
    for attempt in range(1, max(1, max_attempts) + 1):
        if not pending:
            break
        for i in pending:
            attempts[i] = attempt
        parameters = [
            dict(manifest=manifest, output=output, model=model, mmproj=mmproj, run_id=run_id, shard_index=i,
                 row_numbers=shards[i], options=opts.to_dict())
            for i in pending
        ]
        outcomes = await asyncio.gather(*[_run_shard(deployment, p, timeout) for p in parameters])
        failed = []
        for index, (ok, reason) in zip(pending, outcomes):
            if ok and read_shard_record(storage, output, run_id, index) is not None:
                reasons.pop(index, None)
            else:
                reasons[index] = reason or "finished without its record"
                failed.append(index)
                logger.warning("shard %d attempt %d failed: %s", index, attempt, reasons[index])
        pending = failed

    records = [r for i in range(len(shards)) if (r := read_shard_record(storage, output, run_id, i)) is not None]
    summaries = [ChunkSummary.from_json(r["summary"]) for r in records]
    if records:
        identity, params = ModelIdentity(**records[0]["identity"]), records[0]["params_json"]
    else:  # no shard finished: identify the model here so the error rows still say which model was asked for
        engine, identity = prepare_model(model, mmproj, opts, storage, settings)
        params = make_spec(run_id, output, engine, identity, opts).params_json
    if pending:
        spec = make_spec(run_id, output, _placeholder_engine(), identity, opts)
        by_number = {r.row_number: r for r in plan.rows}
        for index in pending:
            rows = [by_number[n] for n in shards[index]]
            discard_staged_shard(storage, output, run_id, index)  # a lost attempt may have staged part of it
            summaries.append(
                stage_failed_rows(0, rows, spec, storage, f"shard {index} failed after {max_attempts} attempt(s): {reasons[index]}", index)
            )
    summary = finish_run(
        logger, run_id=run_id, manifest=manifest, output=output, plan=plan, total=merge_summaries(summaries),
        started=started, identity=identity, params=params, default_prompt=opts.default_prompt(),
        storage=storage,
        audit={"shards": [
            {k: r[k] for k in ("shard_index", "worker", "started_at", "finished_at")} for r in records
        ], "failed_shards": {str(i): reasons[i] for i in pending}, "shard_attempts": {str(i): n for i, n in attempts.items()}},
    )
    summary["shards"] = len(shards)
    if pending:
        detail = "; ".join(f"shard {i}: {reasons[i]}" for i in pending)
        return Failed(message=f"{len(pending)} of {len(shards)} shard(s) failed ({detail}); their rows are error rows in run {run_id}")
    return summary


def _placeholder_engine():
    """An engine config for building a spec where no model is loaded (recording failed shards)."""
    from medvlm_core.config import EngineConfig

    return EngineConfig(model_path="", mmproj_path="")
