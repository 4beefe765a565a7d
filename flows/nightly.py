"""The ``medvlm-nightly`` flow: every night, process only what is new under an input prefix.

New means not processed by an earlier successful nightly run: a manifest file whose fingerprint (size and
ETag or mtime) has not been seen, or, when the prefix holds no manifests, document files not seen before
(a manifest is then generated for them: document_id = the file's path under the prefix). What a run
processed is recorded under ``<output>/_state/nightly/`` only when it succeeded, so a failed night is
simply picked up again the next night (pages already done are skipped by their result keys).
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment
from prefect.states import Failed

from medvlm.flows.prepare import prefect_hooks, run_name, start_run
from medvlm_core import storage as st
from medvlm_core.errors import RunError
from medvlm_core.inputs.images import DOCUMENT_EXTENSIONS
from medvlm_core.inputs.manifest import FORMATS, write_manifest
from medvlm_core.output.paths import OutputLayout
from medvlm_core.output.results import utc_now
from medvlm_core.run.context import RunContext, make_run_id
from medvlm_core.run.lifecycle import run_batch
from medvlm_core.run.options import RunOptions
from medvlm_core.storage import Storage


def seen_inputs(storage: Storage, layout: OutputLayout) -> set[str]:
    """What earlier successful nightly runs processed.

    Args:
        storage: where the output is.
        layout: the output's layout.

    Returns:
        ``url|fingerprint`` of every input processed.
    """
    seen: set[str] = set()
    for url in storage.list_files(layout.nightly_state(), ".json"):
        seen.update(json.loads(storage.read_bytes(url))["inputs"])
    return seen


def _relative(url: str, prefix: str) -> str:
    return posixpath.relpath(url.split("://", 1)[-1], prefix.split("://", 1)[-1].rstrip("/"))


@flow(name="medvlm-nightly", flow_run_name=run_name("nightly"), log_prints=False, validate_parameters=False)
def medvlm_nightly(
    input_prefix: str,
    output: str,
    model: str,
    mmproj: str | None = None,
    options: RunOptions | None = None,
    fan_out: bool = True,
    fanout_deployment: str = "medvlm-fanout/medvlm-fanout",
    shard_size: int = 256,
) -> Any:
    """Find the manifests (or documents) under ``input_prefix`` that are new since the last good night, run them.

    Args:
        input_prefix: the folder or ``s3://`` prefix where manifests (or documents) arrive.
        output: the output URI.
        model: the model URI.
        mmproj: the mmproj URI.
        options: the run options (``medvlm_core.run.options.RunOptions``) of every run.
        fan_out: run each manifest through the ``medvlm-fanout`` deployment (GPU pool); otherwise in this
            process.
        fanout_deployment: the fan-out deployment's name.
        shard_size: manifest rows per shard.

    Returns:
        What was processed and the runs' summaries, or a Failed state naming the runs that failed.
    """
    logger = get_run_logger()
    try:
        ctx = start_run(output, model, mmproj, options)
        storage, layout = ctx.storage, ctx.output
        input_prefix = st.normalize(input_prefix)
        seen = seen_inputs(storage, layout)
        files = storage.list_fingerprints(input_prefix)
        manifests = {u: f for u, f in files.items() if any(u.lower().endswith(ext) for ext in FORMATS)}
        if manifests:
            new = {u: f for u, f in manifests.items() if f"{u}|{f}" not in seen}
            work = [(u, [f"{u}|{f}"]) for u, f in new.items()]
        else:
            new = {u: f for u, f in files.items() if u.lower().endswith(DOCUMENT_EXTENSIONS) and f"{u}|{f}" not in seen}
            work = [(_write_generated_manifest(storage, layout, input_prefix, new), [f"{u}|{f}" for u, f in new.items()])] if new else []
        logger.info("nightly: %d new %s under the input prefix", len(new), "manifests" if manifests else "documents")

        summaries, processed, failures = [], [], []
        for manifest, inputs in work:
            summary, error = _run_one(ctx, manifest, fan_out, fanout_deployment, shard_size, logger)
            if error is None:
                summaries.append(summary)
                processed.extend(inputs)
            else:
                failures.append(error)
        if processed:
            record = {"inputs": processed, "recorded_at": utc_now().isoformat()}
            name = make_run_id(utc_now()) + ".json"
            storage.write_bytes_atomic(st.join(layout.nightly_state(), name), json.dumps(record).encode())
        if failures:
            return Failed(message=f"{len(failures)} of {len(work)} nightly run(s) failed: {'; '.join(failures)}")
        return {"new_inputs": len(new), "runs": summaries}
    except RunError as exc:
        logger.error("nightly run failed: %s", exc)
        return Failed(message=str(exc))


def _write_generated_manifest(storage: Storage, layout: OutputLayout, input_prefix: str, documents: dict[str, str]) -> str:
    """A manifest for loose documents: one row per file, its path under the prefix as document_id."""
    rows = [{"document_id": _relative(u, input_prefix), "image_uri": u} for u in documents]
    url = st.join(layout.nightly_state(), "manifests", make_run_id(utc_now()) + ".parquet")
    write_manifest(storage, url, rows)
    return url


def _run_one(ctx: RunContext, manifest: str, fan_out: bool, deployment: str, shard_size: int,
             logger: Any) -> tuple[dict | None, str | None]:
    """One manifest, in this process or through the fan-out deployment. (summary, error message)."""
    if not fan_out:
        try:
            run = ctx.next_run(utc_now())  # a random id part: two manifests may start within one second
            return run_batch(logger, run, manifest, prefect_hooks()), None
        except RunError as exc:
            return None, str(exc)
    child = run_deployment(
        name=deployment, as_subflow=True,
        parameters=dict(manifest=manifest, output=ctx.output.root, model=ctx.model, mmproj=ctx.mmproj,
                        options=ctx.requested, shard_size=shard_size),
    )
    if child.state is not None and child.state.is_completed():
        return {"flow_run_id": str(child.id)}, None
    return None, f"{manifest}: {child.state.message if child.state else 'no state'}"
