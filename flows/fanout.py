"""The ``medvlm-fanout`` flow: spread one manifest over GPU workers as ``medvlm-shard`` runs, then publish once.

The parent (on a CPU pool) validates the manifest a batch at a time and writes each shard's rows (shards sized
to amortise the model load) to its plan file in the run's staging, keeps at most ``max_concurrent_shards``
``medvlm-shard`` deployment runs in flight (they run in parallel on as many GPU workers as there are; a new one
is created as one finishes, so the Prefect server never holds thousands of scheduled runs), waits for all,
relaunches a failed or lost shard a bounded number of times, and publishes every shard's rows as one run. A shard that still failed has its rows recorded as
``task_failed`` error rows (nothing is lost) and the flow run fails, naming the shard and the reason.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prefect import flow, get_client, get_run_logger
from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact
from prefect.deployments import run_deployment
from prefect.flow_runs import wait_for_flow_run
from prefect.states import Cancelled, Failed

from medvlm.flows.prepare import prefect_hooks, run_name, start_run
from medvlm_core import storage as st
from medvlm_core.errors import RunError
from medvlm_core.run.context import RunContext, release_output
from medvlm_core.run.fanout import failed_message, plan_shards, publish_shards
from medvlm_core.run.lifecycle import guard_output
from medvlm_core.run.options import RunOptions
from medvlm_core.run.shards import read_shard_record

# Shard runs in flight per slot of the shard pool (so each worker has its next shard queued), and without a
# readable pool.
SHARDS_PER_SLOT = 2
UNKNOWN_POOL_SHARDS = 8


@flow(name="medvlm-fanout", flow_run_name=run_name("fanout"), log_prints=False, validate_parameters=False)
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
    max_concurrent_shards: int | None = None,
) -> Any:
    """Run ``manifest`` through ``shard_deployment`` runs in parallel and publish the results under ``output``.

    Args:
        manifest: the manifest URI.
        output: the output URI.
        model: the model URI.
        mmproj: the mmproj URI.
        options: the run options (``medvlm_core.run.options.RunOptions``), handed to every shard.
        shard_size: manifest rows per shard (each shard loads the model once).
        max_shard_attempts: launches per shard before its rows become ``task_failed`` error rows.
        shard_deployment: the ``medvlm-shard`` deployment to launch.
        shard_timeout_seconds: a shard lost with its worker is noticed after this long and relaunched.
        max_concurrent_shards: shard runs in flight at once (created as others finish); default
            ``default_concurrency``: twice the shard pool's capacity.

    Returns:
        The run's summary (with ``shards``), or a Failed state naming the shards that failed.
    """
    logger = get_run_logger()
    try:
        ctx = start_run(output, model, mmproj, options)
        try:  # _fan_out takes the output's lease (guard_output); the shards work under it
            return await _fan_out(logger, ctx, st.normalize(manifest), shard_size, max_shard_attempts, shard_deployment,
                                  shard_timeout_seconds, max_concurrent_shards)
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
                   timeout: float, max_concurrent: int | None) -> Any:
    storage, layout, run_id = ctx.storage, ctx.output, ctx.run_id
    guard_output(logger, ctx)
    # The manifest is validated a batch at a time and each shard's rows go straight to its plan file.
    plan, count = plan_shards(logger, ctx, manifest, shard_size)
    limit = max_concurrent or await default_concurrency(deployment)
    logger.info("run %s: %d shards, at most %d at a time", run_id, count, limit)

    pending = list(range(count))
    reasons: dict[int, str] = {}
    attempts = {i: 0 for i in pending}
    options = ctx.requested  # each shard resolves the same defaults (a model zip's saved parameters) itself
    progress = ShardProgress(logger, run_id, count)
    await progress.start()
    slots = asyncio.Semaphore(limit)  # a shard run is created only when a slot is free

    async def run_one(index: int) -> tuple[bool, str]:
        parameters = dict(manifest=manifest, output=layout.root, model=ctx.model, mmproj=ctx.mmproj, run_id=run_id,
                          shard_index=index, options=options)
        async with slots:
            ok, reason = await _run_shard(deployment, parameters, timeout)
        ok = ok and read_shard_record(storage, layout, run_id, index) is not None
        await progress.finished(index, ok)
        return ok, reason

    for attempt in range(1, max(1, max_attempts) + 1):
        if not pending:
            break
        for i in pending:
            attempts[i] = attempt
        outcomes = await asyncio.gather(*[run_one(i) for i in pending])
        failed = []
        for index, (ok, reason) in zip(pending, outcomes):
            if ok:
                reasons.pop(index, None)
            else:
                reasons[index] = reason or "finished without its record"
                failed.append(index)
                logger.warning("shard %d attempt %d failed: %s", index, attempt, reasons[index])
        pending = failed

    failed = {i: f"after {max_attempts} attempt(s): {reasons[i]}" for i in pending}
    summary = publish_shards(logger, ctx, manifest, plan, count, failed, prefect_hooks(),
                             audit={"shard_attempts": {str(i): n for i, n in attempts.items()},
                                    "max_concurrent_shards": limit})
    message = failed_message(summary, reasons)
    return Failed(message=message) if message else summary


async def default_concurrency(deployment: str) -> int:
    """How many shard runs a fan-out keeps in flight when ``max_concurrent_shards`` is not given:
    ``SHARDS_PER_SLOT`` x the shard pool's capacity (its concurrency limit, else its online workers), so every
    worker has its next shard queued while the Prefect server holds a bounded number of runs.

    Args:
        deployment: the shard deployment (``flow/deployment``).

    Returns:
        The limit (``UNKNOWN_POOL_SHARDS`` when the pool cannot be read).
    """
    try:
        async with get_client() as client:
            found = await client.read_deployment_by_name(deployment)
            pool = await client.read_work_pool(found.work_pool_name)
            capacity = pool.concurrency_limit
            if not capacity:
                workers = await client.read_workers_for_work_pool(found.work_pool_name)
                capacity = sum(1 for w in workers if str(getattr(w, "status", "")).upper().endswith("ONLINE"))
    except Exception:  # no such deployment or pool: the launch itself reports it, shard by shard
        return UNKNOWN_POOL_SHARDS
    return SHARDS_PER_SLOT * capacity if capacity else UNKNOWN_POOL_SHARDS


class ShardProgress:
    """The fan-out's progress while it runs: a log line and a Prefect progress artifact per finished shard.

    Args:
        logger: the flow run's logger.
        run_id: the run.
        shards: how many shards it has.
    """

    def __init__(self, logger: Any, run_id: str, shards: int):
        self.logger, self.run_id, self.shards = logger, run_id, shards
        self.done: set[int] = set()
        self.artifact_id: Any = None

    async def start(self) -> None:
        """Create the progress artifact (0 %)."""
        try:
            self.artifact_id = await acreate_progress_artifact(
                0.0, description=f"medvlm run {self.run_id}: shards finished of {self.shards}")
        except Exception:  # progress is a convenience: never fail a run over it
            self.artifact_id = None

    async def finished(self, index: int, ok: bool) -> None:
        """Record a shard's end (an ``ok`` one counts towards the progress).

        Args:
            index: the shard.
            ok: whether it finished with its record.
        """
        if ok:
            self.done.add(index)
        self.logger.info("run %s: shard %d %s; %d/%d shards done", self.run_id, index, "finished" if ok else "failed",
                         len(self.done), self.shards)
        if self.artifact_id is not None:
            try:
                await aupdate_progress_artifact(self.artifact_id, 100.0 * len(self.done) / max(1, self.shards))
            except Exception:
                pass
