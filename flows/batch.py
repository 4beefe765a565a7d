"""The ``medvlm-batch`` flow: one manifest -> completions (and quarantine, runs) Parquet tables.

Steps: read and check the manifest; identify and load the model (once per process); map the inference
task over chunks of manifest rows; turn any failed chunk into error rows; publish the run's tables
atomically; write a summary artifact. A problem that stops the run before any document is processed
(unreadable manifest, missing model, ...) ends the flow run Failed with one clear message.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

import medvlm_core
from medvlm_core import results
from medvlm_core import storage as st
from medvlm_core.config import EngineConfig, GenerationParams, ImageOptions, Settings, params_json
from medvlm_core.engine import shared_engine
from medvlm_core.errors import RunError
from medvlm_core.manifest import read_manifest
from medvlm_core.models import identify_model
from medvlm_core.pipeline import RunSpec
from medvlm_core.prompts import get_prompt
from medvlm_core.results import utc_now
from medvlm_core.model_cache import resolve_model_files
from medvlm_core.storage import Storage
from tasks.credentials import build_storage
from tasks.inference import ChunkSummary, infer_chunk, stage_failed_chunk
from tasks.publish import publish_run, run_date_of


def make_run_id(started) -> str:
    """Sortable, unique run id: UTC start time + the flow run id (so Prefect and tables join)."""
    source = (flow_run.id or uuid.uuid4().hex).replace("-", "")
    return f"{started:%Y%m%dT%H%M%SZ}-{source[:8]}"


def split_chunks(items: list, size: int) -> list[list]:
    """Consecutive chunks of at most ``size`` items."""
    size = max(1, size)
    return [items[i : i + size] for i in range(0, len(items), size)]


@flow(name="medvlm-batch", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=False)
def medvlm_batch(
    manifest: str,
    output: str,
    model: str,
    mmproj: str | None = None,
    prompt_id: str | None = None,
    prompt: str | None = None,
    max_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 0.95,
    top_k: int = 40,
    min_p: float = 0.05,
    repeat_penalty: float = 1.0,
    seed: int = 0,
    stop: list[str] | None = None,
    n_gpu_layers: int = -1,
    n_ctx: int = 8192,
    n_threads: int | None = None,
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
    """
    logger = get_run_logger()
    try:
        settings = Settings.from_env()
        generation = GenerationParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
            repeat_penalty=repeat_penalty, seed=seed, stop=tuple(stop or ()),
        )
        images = ImageOptions(
            max_pixels=max_pixels, pdf_dpi=pdf_dpi, max_bytes=max_bytes, max_source_pixels=max_source_pixels,
            max_pages=max_pages,
        )
        default_prompt = get_prompt(prompt_id, prompt)
        storage = build_storage(s3_endpoint, storage_options, credentials_block)
        model_path, mmproj_path = resolve_model_files(
            model, mmproj, storage, settings.cache_dir, model_sha256, mmproj_sha256
        )
        engine = EngineConfig(
            model_path=model_path, mmproj_path=mmproj_path, chat_format=chat_format,
            n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=n_threads,
        )
        return _run(
            logger, settings, storage, st.normalize(manifest), st.normalize(output), engine, generation, images,
            default_prompt, chunk_size or settings.chunk_size, force,
        )
    except RunError as exc:
        logger.error("run failed: %s", exc)
        return Failed(message=str(exc))


def _run(logger, settings, storage, manifest, output, engine, generation, images, default_prompt, chunk_size, force) -> dict:
    started = utc_now()
    run_id = make_run_id(started)
    logger.info("run %s: reading manifest", run_id)
    # Set-up runs in the flow itself, not in tasks: a problem here is one clean message and a Failed flow
    # run, before any document is touched (a failing task would log a traceback for a user error).
    plan = read_manifest(manifest, storage)
    _check_output_writable(storage, output, run_id)
    identity = identify_model(engine.model_path, engine.mmproj_path, engine.chat_format, settings.cache_dir)
    load_seconds = shared_engine(engine, identity.chat_format).load_seconds
    logger.info(
        "run %s: %d manifest rows (%d quarantined); model %s (%s) loaded in %.1f s",
        run_id, plan.total_rows, len(plan.quarantined), identity.model_name, identity.chat_format, load_seconds,
    )
    spec = RunSpec(
        run_id=run_id, output=output, engine=engine, model=identity, generation=generation, images=images,
        default_prompt=default_prompt, params_json=params_json(generation, images, identity.chat_format),
        log_phi=settings.log_phi, force=force,
    )
    done = results.DoneKeys() if force else results.load_done_keys(storage, output)
    if len(done):
        logger.info("run %s: %d pages already have ok results under the output and will be skipped", run_id, len(done))
    chunks = split_chunks(plan.rows, chunk_size)
    futures = infer_chunk.map(list(range(len(chunks))), chunks, unmapped(spec), unmapped(storage), unmapped(done))
    summaries: list[ChunkSummary] = []
    done_rows = 0
    for index, future in enumerate(futures):
        try:
            summary = future.result()
        except Exception as exc:  # the chunk's rows must still be accounted for
            logger.error("chunk %d failed (%s); recording its %d rows as errors", index, type(exc).__name__, len(chunks[index]))
            summary = stage_failed_chunk(index, chunks[index], spec, storage, f"inference task failed ({type(exc).__name__})")
        summaries.append(summary)
        done_rows += len(chunks[index])
        logger.info("progress: %d/%d manifest rows processed", done_rows, len(plan.rows))

    finished = utc_now()
    run_row = _run_row(spec, manifest, output, plan, summaries, started, finished, default_prompt, generation, images)
    quarantine_rows = [dict(q, run_id=run_id, manifest_uri=manifest, created_at=finished) for q in plan.quarantined]
    published = publish_run(
        output, run_id, run_date_of(started), [s.staged_url for s in summaries], quarantine_rows, run_row, storage
    )
    summary = {
        "run_id": run_id,
        "manifest_rows": run_row["manifest_rows"],
        "quarantined_rows": run_row["quarantined_rows"],
        "skipped_rows": run_row["skipped_rows"],
        "skipped_pages": run_row["skipped_pages"],
        "pages_ok": run_row["pages_ok"],
        "pages_error": run_row["pages_error"],
        "reconciled": run_row["reconciled"],
        "error_types": _merge_counts(s.error_types for s in summaries),
        "wall_seconds": run_row["wall_seconds"],
        "pages_per_second": run_row["pages_per_second"],
        "completion_tokens_per_second": run_row["completion_tokens_per_second"],
        "slowest": sorted((x for s in summaries for x in s.slowest), reverse=True)[:5],
        "published": published,
        "output": output,
    }
    _publish_artifact(summary)
    logger.info(
        "run %s done: %d ok, %d error pages, %d quarantined rows, reconciled=%s",
        run_id, summary["pages_ok"], summary["pages_error"], summary["quarantined_rows"], summary["reconciled"],
    )
    return summary


def _check_output_writable(storage: Storage, output: str, run_id: str) -> None:
    """Fail before any inference if the output location refuses writes (a full run lost at publish is worse)."""
    probe = st.join(results.staging_root(output, run_id), ".write-probe")
    try:
        storage.write_bytes_atomic(probe, b"ok")
        storage.remove_tree(probe)
    except PermissionError:
        raise RunError(f"output {output}: access denied (check the credentials and the bucket policy)") from None
    except OSError as exc:
        raise RunError(f"output {output}: cannot be written ({exc.strerror or type(exc).__name__})") from None


def _merge_counts(counts) -> dict[str, int]:
    merged: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            merged[k] = merged.get(k, 0) + v
    return dict(sorted(merged.items()))


def _run_row(spec, manifest, output, plan, summaries, started, finished, default_prompt, generation, images) -> dict:
    wall = max((finished - started).total_seconds(), 1e-9)
    pages_ok = sum(s.pages_ok for s in summaries)
    written = set().union(*(s.written_rows for s in summaries))
    skipped = set().union(*(s.skipped_rows for s in summaries)) - written
    expected = {r.row_number for r in plan.rows}
    reconciled = written | skipped == expected and len(plan.quarantined) + len(skipped) + len(written) == plan.total_rows
    completion_tokens = sum(s.completion_tokens for s in summaries)
    return {
        "run_id": spec.run_id,
        "flow_run_id": str(flow_run.id) if flow_run.id else None,
        "status": "completed",
        "started_at": started,
        "finished_at": finished,
        "wall_seconds": wall,
        "manifest_uri": manifest,
        "output_uri": output,
        "model_name": spec.model.model_name,
        "model_sha256": spec.model.model_sha256,
        "mmproj_sha256": spec.model.mmproj_sha256,
        "chat_format": spec.model.chat_format,
        "prompt_id": default_prompt.prompt_id,
        "prompt_sha256": default_prompt.sha256,
        "params_json": spec.params_json,
        "manifest_rows": plan.total_rows,
        "quarantined_rows": len(plan.quarantined),
        "skipped_rows": len(skipped),
        "skipped_pages": sum(s.pages_skipped for s in summaries),
        "processed_rows": len(written),
        "pages_ok": pages_ok,
        "pages_error": sum(s.pages_error for s in summaries),
        "reconciled": reconciled,
        "prompt_tokens": sum(s.prompt_tokens for s in summaries),
        "completion_tokens": completion_tokens,
        "pages_per_second": pages_ok / wall,
        "completion_tokens_per_second": completion_tokens / wall,
        "medvlm_version": medvlm_core.__version__,
    }


def _publish_artifact(summary: dict) -> None:
    """A markdown artifact with the counts a person checks first (no document data)."""
    lines = [
        f"# medvlm run {summary['run_id']}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| manifest rows | {summary['manifest_rows']} |",
        f"| pages ok | {summary['pages_ok']} |",
        f"| pages error | {summary['pages_error']} |",
        f"| quarantined rows | {summary['quarantined_rows']} |",
        f"| skipped rows | {summary['skipped_rows']} |",
        f"| reconciled | {summary['reconciled']} |",
        f"| pages/s | {summary['pages_per_second']:.3f} |",
        f"| completion tokens/s | {summary['completion_tokens_per_second']:.1f} |",
        "",
        "| error type | pages |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in summary["error_types"].items()],
        "",
        "Tables: " + ", ".join(f"`{k}`: {v}" for k, v in summary["published"].items()),
    ]
    try:
        create_markdown_artifact(markdown="\n".join(lines), key="medvlm-run-summary", description="medvlm run summary")
    except Exception:  # an artifact is a convenience: never fail a finished run over it
        pass
