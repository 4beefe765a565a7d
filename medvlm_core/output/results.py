"""The result tables: their schemas (the contract downstream queries use), row builders and the writers.

The tables are hive-partitioned by ``run_date``, one file per table per run (``medvlm_core.output.paths`` names
every place under an output). Every published file is written atomically, so a reader sees all of a run's
rows in a table or none of them.
"""

from __future__ import annotations

import errno
import hashlib
import json
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from medvlm_core.output import status
from medvlm_core.errors import RunError
from medvlm_core.output.paths import OutputLayout
from medvlm_core.storage import Storage


TIMESTAMP = pa.timestamp("us", tz="UTC")

COMPLETIONS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("result_key", pa.string()),
        ("document_id", pa.string()),
        ("page", pa.int32()),
        ("page_count", pa.int32()),
        ("manifest_row", pa.int64()),
        ("image_uri", pa.string()),
        ("image_sha256", pa.string()),
        ("image_format", pa.string()),
        ("image_width", pa.int32()),
        ("image_height", pa.int32()),
        ("patient_id", pa.string()),
        ("encounter_id", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt_sha256", pa.string()),
        ("model_name", pa.string()),
        ("model_sha256", pa.string()),
        ("mmproj_sha256", pa.string()),
        ("chat_format", pa.string()),
        ("params_json", pa.string()),
        ("completion", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("fetch_ms", pa.float64()),
        ("preprocess_ms", pa.float64()),
        ("latency_ms", pa.float64()),
        # Reasoning models: the thinking block (completion is then the answer alone), its tokens, and whether
        # medvlm's reasoning budget closed it.
        ("reasoning", pa.string()),
        ("reasoning_tokens", pa.int32()),
        ("reasoning_budget_hit", pa.bool_()),
        # Confidence of the answer: mean and least log-probability of its tokens under the model; with
        # --top-logprobs N, the alternatives per token as JSON [[[token, logprob], ...], ...].
        ("mean_logprob", pa.float64()),
        ("min_logprob", pa.float64()),
        ("top_logprobs", pa.string()),
        ("status", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("created_at", TIMESTAMP),
    ]
)

RUNS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("flow_run_id", pa.string()),
        ("status", pa.string()),
        ("started_at", TIMESTAMP),
        ("finished_at", TIMESTAMP),
        ("wall_seconds", pa.float64()),
        ("manifest_uri", pa.string()),
        ("output_uri", pa.string()),
        ("model_name", pa.string()),
        ("model_sha256", pa.string()),
        ("mmproj_sha256", pa.string()),
        ("chat_format", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt_sha256", pa.string()),
        ("params_json", pa.string()),
        ("manifest_rows", pa.int64()),
        ("quarantined_rows", pa.int64()),
        ("skipped_rows", pa.int64()),
        ("skipped_pages", pa.int64()),
        ("processed_rows", pa.int64()),
        ("pages_ok", pa.int64()),
        ("pages_error", pa.int64()),
        ("pages_truncated", pa.int64()),
        ("reconciled", pa.bool_()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("pages_per_second", pa.float64()),
        ("completion_tokens_per_second", pa.float64()),
        # Object-store calls repeated after a transient failure (throttling, 5xx, resets) up to the publish.
        ("storage_retries", pa.int64()),
        # The engine's memory plan: the pages decoded together (lowered to fit), its estimate and the budget.
        ("n_parallel", pa.int64()),
        ("memory_needed_mb", pa.float64()),
        ("memory_budget_mb", pa.float64()),
        ("medvlm_version", pa.string()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("manifest_uri", pa.string()),
        ("row_number", pa.int64()),
        ("row_json", pa.string()),
        ("column", pa.string()),
        ("check", pa.string()),
        ("failing_value", pa.string()),
        ("reason", pa.string()),
        ("created_at", TIMESTAMP),
    ]
)

TABLES = {"completions": COMPLETIONS_SCHEMA, "runs": RUNS_SCHEMA, "quarantine": QUARANTINE_SCHEMA}


def utc_now() -> datetime:
    """Timezone-aware UTC now (all timestamps in the tables are UTC)."""
    return datetime.now(timezone.utc)


def result_key(
    document_id: str,
    image_sha256: str | None,
    page: int | None,
    model_sha256: str,
    mmproj_sha256: str,
    prompt_sha256: str,
    params_json: str,
) -> str:
    """Deterministic key of one page's result: same document page, model, prompt and parameters -> same key.

    The document id is part of the key: two manifest rows pointing at the same image under different ids
    (say, the same fax filed for two encounters) are two results that analytics must both see.
    """
    parts = [document_id, image_sha256 or "", str(page or 0), model_sha256, mmproj_sha256, prompt_sha256, params_json]
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


class DoneKeys:
    """The result keys that already have an ``ok`` row in the output: their pages are skipped.

    A plain wrapper on purpose: Prefect inspects task parameters for futures, and walking a set of a
    million keys for every mapped task would cost more than the lookup it serves.
    """

    def __init__(self, keys: frozenset[str] = frozenset()):
        self.keys = keys

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def __len__(self) -> int:
        return len(self.keys)


def to_table(rows: Iterable[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts) as an Arrow table of exactly ``schema`` (missing keys become nulls)."""
    names = schema.names
    return pa.Table.from_pylist([{n: r.get(n) for n in names} for r in rows], schema=schema)


@contextmanager
def no_space_is_a_run_error(url: str) -> Iterator[None]:
    """A full disk (or quota, or read-only mount) under ``url`` stops the run with one clear message."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
            raise RunError(f"{url}: cannot be written ({exc.strerror})") from None
        raise


def write_parquet(storage: Storage, url: str, table: pa.Table) -> None:
    """Write one Parquet file atomically (readers never see a partial file)."""
    with no_space_is_a_run_error(url):
        with storage.open_atomic(url) as f:
            pq.write_table(table, f, compression="zstd")


def write_rows(
    storage: Storage, url: str, table_name: str, rows: Iterable[dict[str, Any]], schema: pa.Schema | None = None
) -> int:
    """Validate rows against the table's pandera model, then write them as one atomic Parquet file.

    ``schema`` is needed for structured tables (their columns come from the extraction's JSON schema).
    """
    from medvlm_core.validation import validate_output

    table = to_table(rows, schema or TABLES[table_name])
    validate_output(table_name, table)
    write_parquet(storage, url, table)
    return table.num_rows


def merge_parquet(storage: Storage, sources: list[str], url: str, schema: pa.Schema | None = None) -> int:
    """Stream ``sources`` (same schema) into one Parquet file at ``url``, atomically. Returns rows written.

    Sources (chunk files: one chunk's rows each) are read whole, one at a time (so a retried read never
    repeats rows), and copied a row group at a time: memory stays at one chunk however long the run was.
    ``schema`` defaults to the first source's. A single source already in ``schema`` (a one-chunk run, the
    runs row) is copied byte for byte: the same file the merge would write, without decoding and re-encoding it.
    """
    def open_source(src: str) -> pq.ParquetFile:
        return pq.ParquetFile(pa.BufferReader(storage.read_bytes(src)))

    if len(sources) == 1:
        data = storage.read_bytes(sources[0])
        parquet = pq.ParquetFile(pa.BufferReader(data))
        if schema is None or parquet.schema_arrow.equals(schema):
            with no_space_is_a_run_error(url):
                storage.write_bytes_atomic(url, data)
            return parquet.metadata.num_rows

    if schema is None:
        schema = open_source(sources[0]).schema_arrow
    rows = 0
    with no_space_is_a_run_error(url), storage.open_atomic(url) as f:
        with pq.ParquetWriter(f, schema, compression="zstd") as writer:
            for src in sources:
                parquet = open_source(src)
                for i in range(parquet.num_row_groups):
                    group = parquet.read_row_group(i).cast(schema)
                    rows += group.num_rows
                    writer.write_table(group)
    return rows


def commit_record(run_id: str, tables: dict[str, str], audit: dict[str, Any] | None = None) -> bytes:
    """The JSON body of a commit record: the run's published files and how it ran (no document data)."""
    body = {"run_id": run_id, "committed_at": utc_now().isoformat(), "tables": tables, **(audit or {})}
    return json.dumps(body, sort_keys=True, default=str).encode()
