"""The mapped inference task: one chunk of manifest rows -> one staged Parquet file of result rows."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from medvlm_core import errors, results
from medvlm_core.engine import shared_runner
from medvlm_core.errors import DocumentError, RunError
from medvlm_core.manifest import ManifestRow
from medvlm_core.pipeline import PageWork, RunSpec, error_row, process_rows, row_prompt
from medvlm_core.prompts import SCHEMAS, get_prompt
from medvlm_core.storage import Storage
from medvlm_core.structured import tables_for


@dataclass
class ChunkSummary:
    """What a chunk produced: counts only (no document data), for progress, the run row and the artifact."""

    chunk_index: int
    staged_url: str
    written_rows: set[int] = field(default_factory=set)  # manifest rows with at least one written row
    skipped_rows: set[int] = field(default_factory=set)  # manifest rows with at least one skipped page
    pages_ok: int = 0
    pages_error: int = 0
    pages_skipped: int = 0
    pages_truncated: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_types: dict[str, int] = field(default_factory=dict)
    slowest: list[tuple[float, str, int | None]] = field(default_factory=list)  # (latency_ms, document_id, page)
    storage_retries: int = 0  # object-store calls retried (set per shard; a flow adds its own Storage's count)

    def add(self, row: dict) -> None:
        """Count one result row."""
        if row["status"] == results.STATUS_SKIPPED:
            self.pages_skipped += 1
            self.skipped_rows.add(row["manifest_row"])
            return
        self.written_rows.add(row["manifest_row"])
        if row["status"] == results.STATUS_TRUNCATED:
            self.pages_truncated += 1
        if row["status"] in (results.STATUS_OK, results.STATUS_TRUNCATED):
            self.pages_ok += 1
            self.prompt_tokens += row.get("prompt_tokens") or 0
            self.completion_tokens += row.get("completion_tokens") or 0
            self.slowest.append((row.get("latency_ms") or 0.0, row["document_id"], row.get("page")))
            self.slowest = sorted(self.slowest, reverse=True)[:5]
        else:
            self.pages_error += 1
            self.error_types[row["error_type"]] = self.error_types.get(row["error_type"], 0) + 1

    def merge(self, other: "ChunkSummary") -> None:
        """Add another summary's counts to this one (a shard's chunks, a run's shards)."""
        self.written_rows |= other.written_rows
        self.skipped_rows |= other.skipped_rows
        for name in ("pages_ok", "pages_error", "pages_skipped", "pages_truncated", "prompt_tokens", "completion_tokens",
                     "storage_retries"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for key, value in other.error_types.items():
            self.error_types[key] = self.error_types.get(key, 0) + value
        self.slowest = sorted(self.slowest + other.slowest, reverse=True)[:5]

    def to_json(self) -> str:
        """JSON (sets as sorted lists): how a shard hands its counts to the parent run."""
        data = asdict(self)
        data["written_rows"] = sorted(self.written_rows)
        data["skipped_rows"] = sorted(self.skipped_rows)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "ChunkSummary":
        """The inverse of ``to_json``."""
        data = json.loads(text)
        data["written_rows"] = set(data["written_rows"])
        data["skipped_rows"] = set(data["skipped_rows"])
        data["slowest"] = [tuple(x) for x in data["slowest"]]
        return cls(**data)


def chunk_file_name(chunk_index: int, shard_index: int | None = None) -> str:
    """Staged file name of a chunk (deterministic: a retried chunk or shard overwrites its own file)."""
    prefix = "" if shard_index is None else f"shard-{shard_index:05d}-"
    return f"{prefix}chunk-{chunk_index:06d}.parquet"


def staged_chunk_url(spec: RunSpec, chunk_index: int, shard_index: int | None) -> str:
    """Where a chunk's result rows are staged until the run is published."""
    return results.staging_url(spec.output, spec.run_id, "completions", chunk_file_name(chunk_index, shard_index))


@task(name="infer-chunk", cache_policy=NO_CACHE)
def infer_chunk(
    chunk_index: int,
    rows: list[ManifestRow],
    spec: RunSpec,
    storage: Storage,
    done: results.DoneKeys | None = None,
    shard_index: int | None = None,
) -> ChunkSummary:
    """Run the shared engine over a chunk's rows and stage the result rows as one Parquet file.

    Pages whose key is in ``done`` are skipped (counted, not written) unless ``spec.force``.
    """
    logger = get_run_logger()
    engine, batched = shared_runner(spec.engine, spec.model.chat_format)
    summary = ChunkSummary(chunk_index, staged_chunk_url(spec, chunk_index, shard_index))
    out = [r for r in process_rows(engine, rows, spec, storage, done, on_row=summary.add, batched=batched) if r["status"] != results.STATUS_SKIPPED]
    results.write_rows(storage, summary.staged_url, "completions", out)
    stage_structured(spec, out, chunk_index, shard_index, storage)
    logger.info(
        "chunk %d: %d manifest rows -> %d ok, %d error, %d skipped pages",
        chunk_index, len(rows), summary.pages_ok, summary.pages_error, summary.pages_skipped,
    )
    return summary


def stage_structured(spec: RunSpec, out: list[dict], chunk_index: int, shard_index: int | None, storage: Storage) -> None:
    """Stage the structured tables' rows of a chunk: one file per table of every extraction prompt used.

    Every extraction used (and the run's default one) gets its files even when empty, so its tables
    exist for queries when nothing was extracted or every answer was truncated.
    """
    prompts = {spec.default_prompt.prompt_id: spec.default_prompt} if spec.default_prompt.schema else {}
    for row in out:
        if row["prompt_id"] not in prompts and row["prompt_id"] in SCHEMAS:
            prompts[row["prompt_id"]] = get_prompt(row["prompt_id"])
    tables: dict[str, list[dict]] = {}
    schemas: dict[str, object] = {}
    for prompt in prompts.values():
        for table, (_, arrow) in tables_for(prompt.prompt_id, prompt.schema).items():
            tables[table] = []
            schemas[table] = arrow
    for row in out:
        for table, rows in (row.get("structured") or {}).items():
            tables[table].extend(rows)
    for table, rows in tables.items():
        url = results.staging_url(spec.output, spec.run_id, table, chunk_file_name(chunk_index, shard_index))
        results.write_rows(storage, url, table, rows, schemas[table])


def discard_staged_shard(storage: Storage, output: str, run_id: str, shard_index: int) -> None:
    """Remove whatever a failed shard staged, in every table, before its rows are recorded as errors."""
    prefix = chunk_file_name(0, shard_index).split("chunk-")[0]
    for url in storage.list_files(results.staging_root(output, run_id), ".parquet"):
        if url.rsplit("/", 1)[-1].startswith(prefix):
            storage.remove_tree(url)


def stage_failed_rows(
    chunk_index: int, rows: list[ManifestRow], spec: RunSpec, storage: Storage, reason: str, shard_index: int | None = None
) -> ChunkSummary:
    """Record every row of a chunk (or shard) that failed as a whole as an error row: no row is lost."""
    summary = ChunkSummary(chunk_index, staged_chunk_url(spec, chunk_index, shard_index))
    error = DocumentError(errors.TASK_FAILED, reason)
    out = []
    for row in rows:
        try:
            prompt = row_prompt(row, spec.default_prompt)
        except RunError:
            prompt = spec.default_prompt
        item = error_row(PageWork(row=row, page=row.page), spec, prompt, error)
        summary.add(item)
        out.append(item)
    results.write_rows(storage, summary.staged_url, "completions", out)
    return summary
