"""What the medvlm flows share: run options, set-up, the chunk loop, and finishing (publish, run row, artifact).

``medvlm-batch`` (one process), ``medvlm-shard`` (one slice of a run on a GPU worker), ``medvlm-fanout``
(the parent that spreads a run over shards) and ``medvlm-nightly`` are built from these pieces, so a run
looks the same in the tables whichever way it was executed.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any

from prefect import unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

import medvlm_core
from medvlm_core import results
from medvlm_core import storage as st
from medvlm_core.config import EngineConfig, GenerationParams, ImageOptions, Settings, params_json
from medvlm_core.engine import shared_runner
from medvlm_core.errors import DocumentError, RunError
from medvlm_core.manifest import ManifestPlan, ManifestRow
from medvlm_core.model_cache import resolve_model_files
from medvlm_core.models import ModelIdentity, identify_model
from medvlm_core.pipeline import RunSpec
from medvlm_core.policy import LocationPolicy
from medvlm_core.prompts import Prompt, get_prompt, register_extraction
from medvlm_core.results import utc_now
from medvlm_core.storage import Storage
from medvlm_core.structured import load_extraction
from tasks.credentials import build_storage
from tasks.inference import ChunkSummary, infer_chunk, stage_failed_rows
from tasks.publish import publish_run, recover_interrupted_publishes, run_date_of


@dataclass
class RunOptions:
    """Every knob of a run besides its locations. Flow parameters map onto these one to one."""

    prompt_id: str | None = None
    prompt: str | None = None
    max_tokens: int = GenerationParams.max_tokens
    temperature: float = GenerationParams.temperature
    top_p: float = GenerationParams.top_p
    top_k: int = GenerationParams.top_k
    min_p: float = GenerationParams.min_p
    repeat_penalty: float = GenerationParams.repeat_penalty
    seed: int = GenerationParams.seed
    stop: list[str] | None = None
    n_gpu_layers: int = EngineConfig.n_gpu_layers
    n_ctx: int = EngineConfig.n_ctx
    n_threads: int | None = None
    n_parallel: int = EngineConfig.n_parallel
    image_min_tokens: int | None = None
    image_max_tokens: int | None = None
    overlap_encode: bool = EngineConfig.overlap_encode
    flash_attn: bool = EngineConfig.flash_attn
    isolate: bool = EngineConfig.isolate
    chat_format: str | None = None
    max_pixels: int = ImageOptions.max_pixels
    pdf_dpi: int = ImageOptions.pdf_dpi
    max_bytes: int = ImageOptions.max_bytes
    max_source_pixels: int = ImageOptions.max_source_pixels
    max_pages: int = ImageOptions.max_pages
    chunk_size: int | None = None
    model_sha256: str | None = None
    mmproj_sha256: str | None = None
    s3_endpoint: str | None = None
    storage_options: dict[str, Any] | None = field(default=None)
    credentials_block: str | None = None
    force: bool = False
    # URI of a user extraction definition (JSON: prompt_id, prompt, schema); see medvlm_core.structured.
    extraction: str | None = None
    # Allow-list of S3 prefixes and local roots the run may read from and write to (None: anywhere).
    allowed_locations: list[str] | None = None
    # Server-side encryption of the objects the run writes to S3: "AES256" (SSE-S3) or "aws:kms" (SSE-KMS).
    sse: str | None = None
    sse_kms_key_id: str | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "RunOptions":
        """Options from a parameter dict; RunError naming any unknown key."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RunError(f"unknown run option(s): {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, e.g. to pass to a shard's flow run."""
        return asdict(self)

    def generation(self) -> GenerationParams:
        """The sampling parameters."""
        return GenerationParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, repeat_penalty=self.repeat_penalty, seed=self.seed, stop=tuple(self.stop or ()),
        )

    def images(self) -> ImageOptions:
        """The document decoding limits."""
        return ImageOptions(
            max_pixels=self.max_pixels, pdf_dpi=self.pdf_dpi, max_bytes=self.max_bytes,
            max_source_pixels=self.max_source_pixels, max_pages=self.max_pages,
        )

    def storage(self) -> Storage:
        """Storage with this run's S3 settings (credentials from the environment or the block)."""
        return build_storage(self.s3_endpoint, self.storage_options, self.credentials_block, self.sse, self.sse_kms_key_id)

    def register_extraction(self, storage: Storage) -> None:
        """Load the user extraction (if any) into the prompt library; before the manifest is validated."""
        if not self.extraction:
            return
        try:
            text = storage.read_bytes(self.extraction, max_bytes=1024 * 1024).decode("utf-8")
            prompt_id, prompt_text, schema = load_extraction(text, self.extraction)
        except DocumentError as exc:
            raise RunError(f"extraction definition cannot be read: {exc.message}") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise RunError(str(exc)) from None
        register_extraction(prompt_id, prompt_text, schema)
        if self.prompt_id is None and self.prompt is None:
            self.prompt_id = prompt_id

    def policy(self) -> LocationPolicy:
        """The run's location policy."""
        return LocationPolicy(self.allowed_locations)

    def check_locations(self, output: str, model: str, mmproj: str | None) -> LocationPolicy:
        """RunError if the output, model or mmproj is outside the allowed locations; the policy."""
        policy = self.policy()
        policy.require(output, "output")
        policy.require(model, "model")
        if mmproj:
            policy.require(mmproj, "mmproj")
        if self.extraction:
            policy.require(self.extraction, "extraction definition")
        return policy

    def default_prompt(self) -> Prompt:
        """The prompt for rows that do not bring their own."""
        return get_prompt(self.prompt_id, self.prompt)


def make_run_id(started: datetime) -> str:
    """Sortable, unique run id: UTC start time + the flow run id (so Prefect and tables join)."""
    source = (flow_run.id or uuid.uuid4().hex).replace("-", "")
    return f"{started:%Y%m%dT%H%M%SZ}-{source[:8]}"


def split_chunks(items: list, size: int) -> list[list]:
    """Consecutive chunks of at most ``size`` items."""
    size = max(1, size)
    return [items[i : i + size] for i in range(0, len(items), size)]


def check_output_writable(storage: Storage, output: str, run_id: str) -> None:
    """Fail before any inference if the output location refuses writes (a full run lost at publish is worse)."""
    probe = st.join(results.staging_root(output, run_id), ".write-probe")
    try:
        storage.write_bytes_atomic(probe, b"ok")
        storage.remove_tree(probe)
    except PermissionError:
        raise RunError(f"output {output}: access denied (check the credentials and the bucket policy)") from None
    except OSError as exc:
        raise RunError(f"output {output}: cannot be written ({exc.strerror or type(exc).__name__})") from None


def recover_output(logger, storage: Storage, output: str) -> None:
    """Finish publishing runs on this output that were killed half-way through it (see tasks.publish)."""
    for run_id in recover_interrupted_publishes(storage, output):
        logger.warning("output %s: finished publishing run %s, which was interrupted while publishing", output, run_id)


def prepare_model(model: str, mmproj: str | None, options: RunOptions, storage: Storage, settings: Settings) -> tuple[EngineConfig, ModelIdentity]:
    """Local model files (downloaded once if remote), their identity, and the engine config."""
    model_path, mmproj_path = resolve_model_files(
        model, mmproj, storage, settings.cache_dir, options.model_sha256, options.mmproj_sha256
    )
    engine = EngineConfig(
        model_path=model_path, mmproj_path=mmproj_path, chat_format=options.chat_format,
        n_ctx=options.n_ctx, n_gpu_layers=options.n_gpu_layers, n_threads=options.n_threads,
        n_parallel=options.n_parallel, image_min_tokens=options.image_min_tokens,
        image_max_tokens=options.image_max_tokens, overlap_encode=options.overlap_encode,
        flash_attn=options.flash_attn, isolate=options.isolate,
    )
    identity = identify_model(engine.model_path, engine.mmproj_path, engine.chat_format, settings.cache_dir)
    return engine, identity


def make_spec(run_id: str, output: str, engine: EngineConfig, identity: ModelIdentity, options: RunOptions) -> RunSpec:
    """The plain-data description of a run that every chunk receives."""
    generation, images = options.generation(), options.images()
    return RunSpec(
        run_id=run_id, output=output, engine=engine, model=identity, generation=generation, images=images,
        default_prompt=options.default_prompt(), params_json=params_json(generation, images, identity.chat_format, engine),
        force=options.force,
    )


def run_chunks(
    logger, spec: RunSpec, rows: list[ManifestRow], storage: Storage, chunk_size: int, shard_index: int | None = None
) -> list[ChunkSummary]:
    """Load the model (once per process), map the inference task over chunks, account for failed chunks."""
    engine, runner = shared_runner(spec.engine, spec.model.chat_format)  # loads here: a bad model fails the run now
    load_seconds = engine.load_seconds if engine is not None else runner.load_seconds
    logger.info("run %s: model %s (%s) ready, loaded in %.1f s", spec.run_id, spec.model.model_name, spec.model.chat_format, load_seconds)
    done = results.DoneKeys() if spec.force else results.load_done_keys(storage, spec.output)
    if len(done):
        logger.info("run %s: %d pages already have ok results in the output and are skipped", spec.run_id, len(done))
    chunks = split_chunks(rows, chunk_size)
    futures = infer_chunk.map(
        list(range(len(chunks))), chunks, unmapped(spec), unmapped(storage), unmapped(done), unmapped(shard_index)
    )
    summaries: list[ChunkSummary] = []
    finished_rows = 0
    for index, future in enumerate(futures):
        try:
            summary = future.result()
        except Exception as exc:  # the chunk's rows must still be accounted for
            logger.error("chunk %d failed (%s); recording its %d rows as errors", index, type(exc).__name__, len(chunks[index]))
            summary = stage_failed_rows(
                index, chunks[index], spec, storage, f"inference task failed ({type(exc).__name__})", shard_index
            )
        summaries.append(summary)
        finished_rows += len(chunks[index])
        logger.info("progress: %d/%d manifest rows done", finished_rows, len(rows))
    return summaries


def merge_summaries(summaries: list[ChunkSummary]) -> ChunkSummary:
    """One summary with the counts of all."""
    total = ChunkSummary(chunk_index=-1, staged_url="")
    for s in summaries:
        total.merge(s)
    return total


def finish_run(
    logger,
    *,
    run_id: str,
    manifest: str,
    output: str,
    plan: ManifestPlan,
    total: ChunkSummary,
    started: datetime,
    identity: ModelIdentity,
    params: str,
    default_prompt: Prompt,
    storage: Storage,
    audit: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Reconcile the counts, publish the run's tables atomically, write the artifact; the run's summary."""
    finished = utc_now()
    wall = max((finished - started).total_seconds(), 1e-9)
    skipped = total.skipped_rows - total.written_rows
    expected = {r.row_number for r in plan.rows}
    reconciled = (total.written_rows | skipped) == expected and (
        len(plan.quarantined) + len(skipped) + len(total.written_rows) == plan.total_rows
    )
    run_row = {
        "run_id": run_id,
        "flow_run_id": str(flow_run.id) if flow_run.id else None,
        "status": "completed",
        "started_at": started,
        "finished_at": finished,
        "wall_seconds": wall,
        "manifest_uri": manifest,
        "output_uri": output,
        "model_name": identity.model_name,
        "model_sha256": identity.model_sha256,
        "mmproj_sha256": identity.mmproj_sha256,
        "chat_format": identity.chat_format,
        "prompt_id": default_prompt.prompt_id,
        "prompt_sha256": default_prompt.sha256,
        "params_json": params,
        "manifest_rows": plan.total_rows,
        "quarantined_rows": len(plan.quarantined),
        "skipped_rows": len(skipped),
        "skipped_pages": total.pages_skipped,
        "processed_rows": len(total.written_rows),
        "pages_ok": total.pages_ok,
        "pages_error": total.pages_error,
        "pages_truncated": total.pages_truncated,
        "reconciled": reconciled,
        "prompt_tokens": total.prompt_tokens,
        "completion_tokens": total.completion_tokens,
        "pages_per_second": total.pages_ok / wall,
        "completion_tokens_per_second": total.completion_tokens / wall,
        # the flow's Storage also served its in-process tasks; shards report theirs in their records
        "storage_retries": total.storage_retries + storage.retries,
        "medvlm_version": medvlm_core.__version__,
    }
    quarantine_rows = [dict(q, run_id=run_id, manifest_uri=manifest, created_at=finished) for q in plan.quarantined]
    published = publish_run(output, run_id, run_date_of(started), quarantine_rows, run_row, storage, audit)
    summary = {
        "run_id": run_id,
        "manifest_rows": plan.total_rows,
        "quarantined_rows": len(plan.quarantined),
        "skipped_rows": len(skipped),
        "skipped_pages": total.pages_skipped,
        "pages_ok": total.pages_ok,
        "pages_error": total.pages_error,
        "pages_truncated": total.pages_truncated,
        "reconciled": reconciled,
        "storage_retries": run_row["storage_retries"],
        "error_types": dict(sorted(total.error_types.items())),
        "wall_seconds": wall,
        "pages_per_second": run_row["pages_per_second"],
        "completion_tokens_per_second": run_row["completion_tokens_per_second"],
        "slowest": total.slowest,
        "published": published,
        "output": output,
    }
    publish_artifact(summary)
    logger.info(
        "run %s done: %d ok, %d error, %d skipped pages; %d quarantined rows; reconciled=%s",
        run_id, total.pages_ok, total.pages_error, total.pages_skipped, len(plan.quarantined), reconciled,
    )
    return summary


def publish_artifact(summary: dict) -> None:
    """A markdown artifact with what a person checks first: counts, speed, slowest pages, locations."""
    lines = [
        f"# medvlm run {summary['run_id']}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| manifest rows | {summary['manifest_rows']} |",
        f"| pages ok | {summary['pages_ok']} |",
        f"| pages error | {summary['pages_error']} |",
        f"| pages skipped (already done) | {summary['skipped_pages']} |",
        f"| quarantined rows | {summary['quarantined_rows']} |",
        f"| reconciled | {summary['reconciled']} |",
        f"| storage retries | {summary.get('storage_retries', 0)} |",
        f"| pages/s | {summary['pages_per_second']:.3f} |",
        f"| completion tokens/s | {summary['completion_tokens_per_second']:.1f} |",
        "",
        "| error type | pages |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in summary["error_types"].items()],
        "",
        "| slowest pages (document id, page) | ms |",
        "|---|---|",
        *[f"| {doc} p{page or '-'} | {ms:.0f} |" for ms, doc, page in summary["slowest"]],
        "",
        "Tables: " + ", ".join(f"`{k}`: {v}" for k, v in summary["published"].items()),
    ]
    try:
        # _sync: this function is also called from the async fan-out flow, where Prefect would otherwise hand
        # back an un-awaited coroutine and no artifact would be written.
        create_markdown_artifact(
            markdown="\n".join(lines), key="medvlm-run-summary", description="medvlm run summary", _sync=True
        )
    except Exception:  # an artifact is a convenience: never fail a finished run over it
        pass
