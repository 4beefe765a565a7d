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

from flows.common import (
    RunOptions, check_output_writable, finish_run, make_run_id, make_spec, merge_summaries, prepare_model, recover_output, run_chunks,
)
from medvlm_core import storage as st
from medvlm_core.config import EngineConfig, GenerationParams, ImageOptions, Settings
from medvlm_core.errors import RunError
from medvlm_core.manifest import read_manifest
from medvlm_core.results import utc_now


@flow(name="medvlm-batch", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=False)
def medvlm_batch(
    manifest: str,
    output: str,
    model: str,
    mmproj: str | None = None,
    prompt_id: str | None = None,
    prompt: str | None = None,
    max_tokens: int = GenerationParams.max_tokens,
    temperature: float = GenerationParams.temperature,
    top_p: float = GenerationParams.top_p,
    top_k: int = GenerationParams.top_k,
    min_p: float = GenerationParams.min_p,
    repeat_penalty: float = GenerationParams.repeat_penalty,
    seed: int = GenerationParams.seed,
    stop: list[str] | None = None,
    n_gpu_layers: int = EngineConfig.n_gpu_layers,
    n_ctx: int = EngineConfig.n_ctx,
    n_threads: int | None = None,
    n_parallel: int = EngineConfig.n_parallel,
    image_min_tokens: int | None = None,
    image_max_tokens: int | None = None,
    overlap_encode: bool = EngineConfig.overlap_encode,
    flash_attn: bool = EngineConfig.flash_attn,
    isolate: bool = EngineConfig.isolate,
    chat_format: str | None = None,
    max_pixels: int = ImageOptions.max_pixels,
    pdf_dpi: int = ImageOptions.pdf_dpi,
    max_bytes: int = ImageOptions.max_bytes,
    max_source_pixels: int = ImageOptions.max_source_pixels,
    max_pages: int = ImageOptions.max_pages,
    chunk_size: int | None = None,
    model_sha256: str | None = None,
    mmproj_sha256: str | None = None,
    s3_endpoint: str | None = None,
    storage_options: dict[str, Any] | None = None,
    credentials_block: str | None = None,
    force: bool = False,
    extraction: str | None = None,
    allowed_locations: list[str] | None = None,
    sse: str | None = None,
    sse_kms_key_id: str | None = None,
) -> Any:
    """Run a VLM over every page of the manifest's documents and publish the result tables under ``output``.

    Returns a summary dict (run id, counts, published URLs). Every manifest row ends as a result row, an
    error row or a quarantine row; ``reconciled`` in the summary and the runs row says the counts add up.

    Any URI may be local or ``s3://``. ``model`` may be a ``.zip`` holding both GGUFs (then no ``mmproj``);
    remote models are cached locally once and checked against ``model_sha256`` / ``mmproj_sha256``.
    S3 credentials come from the AWS environment or the Prefect Secret block ``credentials_block``; put no
    secrets in ``storage_options`` (parameters are stored with the flow run).

    Pages whose result key already has an ``ok`` row under ``output`` are skipped (counted in the runs
    row) unless ``force``: a run killed at any point and started again completes the rest, exactly once.

    Structured mode: ``prompt_id="clinical_extraction"`` (or an ``extraction`` definition of your own)
    constrains the answer to a JSON schema and fills the diagnoses / medications / instructions tables
    (or a table named after the extraction's prompt id).
    """
    values = dict(locals())
    logger = get_run_logger()
    try:
        options = RunOptions.from_dict({k: v for k, v in values.items() if k not in ("manifest", "output", "model", "mmproj")})
        return run_batch(logger, manifest, output, model, mmproj, options)
    except RunError as exc:
        logger.error("run failed: %s", exc)
        return Failed(message=str(exc))


def run_batch(logger, manifest: str, output: str, model: str, mmproj: str | None, options: RunOptions) -> dict:
    """The whole run in this process (also used by the nightly flow for each new manifest)."""
    settings = Settings.from_env()
    storage = options.storage()
    manifest, output = st.normalize(manifest), st.normalize(output)
    started = utc_now()
    run_id = make_run_id(started)
    # Set-up runs in the flow itself, not in tasks: a problem here is one clean message and a Failed flow
    # run, before any document is touched (a failing task would log a traceback for a user error).
    policy = options.check_locations(output, model, mmproj)
    options.register_extraction(storage)
    plan = read_manifest(manifest, storage, policy)
    logger.info("run %s: %d manifest rows, %d quarantined", run_id, plan.total_rows, len(plan.quarantined))
    check_output_writable(storage, output, run_id)
    recover_output(logger, storage, output)
    engine, identity = prepare_model(model, mmproj, options, storage, settings)
    spec = make_spec(run_id, output, engine, identity, options)
    summaries = run_chunks(logger, spec, plan.rows, storage, options.chunk_size or settings.chunk_rows(options.n_parallel))
    return finish_run(
        logger, run_id=run_id, manifest=manifest, output=output, plan=plan, total=merge_summaries(summaries),
        started=started, identity=identity, params=spec.params_json,
        default_prompt=spec.default_prompt, storage=storage,
    )
