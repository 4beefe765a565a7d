"""The ``medvlm-batch`` flow: one manifest -> completions (and quarantine, runs) Parquet tables, in one process.

Steps: read and validate the manifest; check the output is writable; fetch (if remote), identify and
load the model once; map the inference task over chunks of manifest rows, skipping pages already done;
turn any failed chunk into error rows; publish the run's tables atomically; write a summary artifact.
A problem that stops the run before any document is processed (unreadable manifest, missing model, ...)
ends the flow run Failed with one clear message and no traceback.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from medvlm.flows.finish import finish_run
from medvlm.flows.inference import run_chunks
from medvlm.flows.prepare import guard_output, run_name, start_run
from medvlm_core import storage as st
from medvlm_core.errors import RunError
from medvlm_core.inputs.manifest import read_manifest
from medvlm_core.run.context import RunContext, make_spec, prepare_model, release_output
from medvlm_core.run.options import RunOptions


# validate_parameters=False: the options are validated by RunOptions.parse, whose error names the bad
# option in one line (Prefect's own validation error would be a wall of pydantic text before the flow starts).
@flow(
    name="medvlm-batch", flow_run_name=run_name("batch"),
    task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=False, validate_parameters=False,
)
def medvlm_batch(
    manifest: str,
    output: str,
    model: str,
    mmproj: str | None = None,
    options: RunOptions | None = None,
) -> Any:
    """Run a VLM over every page of the manifest's documents and publish the result tables under ``output``.

    Every manifest row ends as a result row, an error row or a quarantine row; ``reconciled`` in the summary
    and the runs row says the counts add up.

    Any URI may be local or ``s3://``. ``model`` may be a ``.zip`` holding both GGUFs (then no ``mmproj``);
    remote models are cached locally once and checked against ``model_sha256`` / ``mmproj_sha256``.
    S3 credentials come from the AWS environment or the Prefect Secret block ``credentials_block``; put no
    secrets in ``storage_options`` (parameters are stored with the flow run).

    Pages whose result key already has an ``ok`` row under ``output`` are skipped (counted in the runs
    row) unless ``force``: a run killed at any point and started again completes the rest, exactly once.

    Structured mode: ``prompt_id="clinical_extraction"`` (or an ``extraction`` definition of your own)
    constrains the answer to a JSON schema and fills the diagnoses / medications / instructions tables
    (or a table named after the extraction's prompt id).

    Args:
        manifest: the manifest URI (.csv, .jsonl or .parquet).
        output: the output folder or ``s3://`` prefix.
        model: the text GGUF (or a .zip bundle of both files).
        mmproj: the vision projector GGUF.
        options: the run's options (``medvlm_core.run.options.RunOptions``; a flat dict such as
            ``{"max_tokens": 64}`` works too).

    Returns:
        The run's summary (run id, counts, published URLs), or a Failed state with one clear message when
        the run cannot start.
    """
    logger = get_run_logger()
    try:
        return run_batch(logger, start_run(output, model, mmproj, options), manifest)
    except RunError as exc:
        logger.error("run failed: %s", exc)
        return Failed(message=str(exc))


def run_batch(logger: Any, ctx: RunContext, manifest: str) -> dict:
    """The whole run in this process (also used by the nightly flow for each new manifest).

    Args:
        logger: the flow run's logger.
        ctx: the run (``flows.prepare.start_run``).
        manifest: the manifest URI.

    Returns:
        The run's summary.
    """
    manifest = st.normalize(manifest)
    # Set-up runs in the flow itself, not in tasks: a problem here is one clean message and a Failed flow
    # run, before any document is touched (a failing task would log a traceback for a user error).
    plan = read_manifest(manifest, ctx.storage, ctx.policy)
    logger.info("run %s: %d manifest rows, %d quarantined", ctx.run_id, plan.total_rows, len(plan.quarantined))
    try:
        guard_output(logger, ctx)  # takes the output's lease: given back here whatever happens
        engine, identity = prepare_model(ctx)
        spec = make_spec(ctx, engine, identity)
        summaries = run_chunks(logger, ctx, spec, plan.rows)
        return finish_run(logger, ctx, manifest, plan, summaries, identity, spec.params_json)
    finally:
        release_output(ctx)
