"""The set-up every medvlm flow shares: settings, storage, run id, locations and the output's guards.

``start_run`` is the one place a flow run turns its parameters into a ``RunContext``
(``medvlm_core.run.context``): the settings are read once here and passed down, and a problem is a ``RunError``
that the flow turns into one clear message.
"""

from __future__ import annotations

from typing import Any

from prefect.runtime import flow_run

from medvlm.tasks.credentials import build_storage
from medvlm_core.output.results import utc_now
from medvlm_core.run.context import (
    RunContext,
    acquire_output,
    check_output_writable,
    make_run_id,
    open_run,
    recover_output,
)
from medvlm_core.run.options import RunOptions
from medvlm_core.settings import Settings


def run_name(kind: str):
    """A ``flow_run_name`` callable: the flow runs show what they do (``batch discharge.csv a1b2c3d4``) instead
    of a random name. Only locations and ids, never document data.

    Args:
        kind: ``batch``, ``fanout``, ``shard`` or ``nightly``.

    Returns:
        The callable Prefect calls to name each run.
    """

    def name() -> str:
        params = flow_run.parameters or {}
        run = (str(flow_run.id) if flow_run.id else "").replace("-", "")[:8]
        if kind == "shard":
            return f"shard {params.get('shard_index', 0):05d} of {params.get('run_id', '?')}"
        source = str(params.get("input_prefix") if kind == "nightly" else params.get("manifest", "")).rstrip("/")
        return f"{kind} {source.rsplit('/', 1)[-1] or source} {run}".strip()

    return name


def start_run(
    output: str,
    model: str,
    mmproj: str | None,
    options: RunOptions | dict[str, Any] | None,
    run_id: str | None = None,
) -> RunContext:
    """Open a run from a flow's parameters.

    Args:
        output: the output URI.
        model: the model URI.
        mmproj: the mmproj URI.
        options: the flow's ``options`` parameter (an instance, a flat or nested dict, or None).
        run_id: the parent run's id (a shard works under it); None makes a new id from this flow run.

    Returns:
        The run's context.

    Raises:
        RunError: bad options, locations outside the policy, an unusable credentials block or extraction.
    """
    opts = RunOptions.parse(options)
    settings = Settings()
    started = utc_now()
    storage = build_storage(opts.storage, settings)
    run_id = run_id or make_run_id(started, str(flow_run.id) if flow_run.id else None)
    return open_run(run_id, started, output, model, mmproj, options, settings, storage)


def guard_output(logger: Any, ctx: RunContext) -> None:
    """Before a run decides what is done: check the output is writable, take its lease (one run at a time; wait
    for another run's, or fail, as ``on_busy`` says), finish interrupted publishes.

    The caller gives the lease back (``medvlm_core.run.context.release_output``) in a ``finally``.

    Args:
        logger: the flow run's logger.
        ctx: the run.

    Raises:
        RunError: the output cannot be written, or another run holds its lease (the message names it).
    """
    check_output_writable(ctx)
    acquire_output(ctx, logger)
    for run_id in recover_output(ctx):
        logger.warning("output %s: finished publishing run %s, which was interrupted while publishing",
                       ctx.output.root, run_id)
