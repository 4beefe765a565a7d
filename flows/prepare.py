"""The set-up every medvlm flow shares: how a Prefect flow run opens a run of the core's run API.

``start_run`` turns a flow run's parameters into a ``RunContext`` (``medvlm_core.run.lifecycle.start_run``) with
the credentials of a Prefect block and the flow run's id; ``prefect_hooks`` is what Prefect plugs into the run:
the mapped ``infer-chunk`` task, the ``publish-run`` task, progress and summary artifacts and the published event.
A problem is a ``RunError`` that the flow turns into one clear message.
"""

from __future__ import annotations

from typing import Any

from prefect.runtime import flow_run

from medvlm.flows.finish import RunArtifacts, emit_published
from medvlm.flows.inference import ChunkProgress, prefect_chunks
from medvlm.tasks.credentials import block_credentials
from medvlm.tasks.publish import publish_run
from medvlm_core.run import lifecycle
from medvlm_core.run.context import RunContext
from medvlm_core.run.lifecycle import RunHooks
from medvlm_core.run.options import RunOptions


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


def flow_run_id() -> str | None:
    """This flow run's id (None outside a flow run)."""
    return str(flow_run.id) if flow_run.id else None


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
    return lifecycle.start_run(output, model, mmproj, options, credentials=block_credentials, run_id=run_id,
                               source_id=flow_run_id())


def prefect_hooks() -> RunHooks:
    """What a Prefect flow run plugs into the core's run API; made inside the flow run (its artifacts belong to it).

    Returns:
        The hooks.
    """
    artifacts = RunArtifacts()
    return RunHooks(source_id=flow_run_id(), map_chunks=prefect_chunks, publish=publish_run, progress=ChunkProgress,
                    on_tables=artifacts.start, on_publish_end=artifacts.wait, on_published=emit_published)
