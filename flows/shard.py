"""The ``medvlm-shard`` flow: the unit of GPU work, one slice of a fan-out run on one GPU worker.

A shard reads its own rows from the plan file its parent wrote (``medvlm_core.run.shards``; never the whole
manifest), reads the done index for just its documents, loads the model once for all of them, stages their
result rows under the parent run's staging folder and writes a small JSON record (counts, model identity,
which worker ran it) there too. The parent run reads those records from storage, not Prefect results, so
nothing depends on result persistence, and it publishes all shards' rows at once.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from medvlm.flows.prepare import prefect_hooks, run_name, start_run
from medvlm_core.errors import RunError
from medvlm_core.run.fanout import run_shard
from medvlm_core.run.options import RunOptions


@flow(
    name="medvlm-shard", flow_run_name=run_name("shard"),
    task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=False, validate_parameters=False,
)
def medvlm_shard(
    manifest: str,
    output: str,
    model: str,
    run_id: str,
    shard_index: int,
    mmproj: str | None = None,
    options: RunOptions | None = None,
) -> Any:
    """Process shard ``shard_index`` of run ``run_id`` (the rows its parent planned for it) and stage their results.

    Args:
        manifest: the run's manifest URI (for the log; the shard reads its plan, not the manifest).
        output: the run's output.
        model: the model URI.
        run_id: the parent (fan-out) run.
        shard_index: this shard's number.
        mmproj: the mmproj URI.
        options: the run's options (``medvlm_core.run.options.RunOptions``).

    Returns:
        The shard's record (also written to the run's staging), or a Failed state.
    """
    logger = get_run_logger()
    try:
        ctx = start_run(output, model, mmproj, options, run_id=run_id)
        return asdict(run_shard(logger, ctx, shard_index, prefect_hooks()))
    except RunError as exc:
        logger.error("shard %d failed: %s", shard_index, exc)
        return Failed(message=str(exc))
