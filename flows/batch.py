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

from medvlm.flows.prepare import prefect_hooks, run_name, start_run
from medvlm_core.errors import RunError
from medvlm_core.run.lifecycle import run_batch
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
        return run_batch(logger, start_run(output, model, mmproj, options), manifest, prefect_hooks())
    except RunError as exc:
        logger.error("run failed: %s", exc)
        return Failed(message=str(exc))
