"""A chunk of manifest rows -> staged Parquet files: the unit of work an orchestrator maps over.

``stage_chunk`` runs an engine over a chunk's rows and stages the result rows (completions, and the
structured tables in structured mode) under the run's staging folder; ``stage_failed_rows`` records a chunk
or shard that failed as a whole as error rows, so no row is ever lost. Both return the chunk's counts.
"""

from __future__ import annotations

from medvlm_core import errors
from medvlm_core.codes.linking import link_structured
from medvlm_core.engine.types import Engine
from medvlm_core.errors import DocumentError, RunError
from medvlm_core.inputs.manifest import ManifestRow
from medvlm_core.inputs.prompts import SCHEMAS, get_prompt
from medvlm_core.output import results, status
from medvlm_core.output.paths import shard_prefix
from medvlm_core.output.structured import tables_for
from medvlm_core.run.accounting import ChunkSummary
from medvlm_core.run.documents import process_documents
from medvlm_core.run.pages import process_rows
from medvlm_core.run.result_rows import STRUCTURED_ROWS, completion_columns, error_row, row_prompt
from medvlm_core.run.spec import PageWork, RunSpec
from medvlm_core.storage import Storage


def stage_chunk(
    engine: Engine,
    chunk_index: int,
    rows: list[ManifestRow],
    spec: RunSpec,
    storage: Storage,
    done: results.DoneKeys | None = None,
    shard_index: int | None = None,
) -> ChunkSummary:
    """Run ``engine`` over a chunk's rows and stage the result rows as one Parquet file per table.

    Args:
        engine: a started engine.
        chunk_index: the chunk's number in its run (or shard): names its files.
        rows: the chunk's manifest rows.
        spec: the run.
        storage: where documents and the output are.
        done: result keys already answered: their pages are skipped (counted, not written) unless
            ``spec.force``.
        shard_index: the shard in a fan-out run.

    Returns:
        The chunk's counts.
    """
    url = spec.layout.staged_chunk(spec.run_id, "completions", chunk_index, shard_index)
    summary = ChunkSummary(chunk_index, url)
    process = process_documents if spec.documents.scope == "document" else process_rows
    out = [r for r in process(engine, rows, spec, storage, done, on_row=summary.add) if r["status"] != status.SKIPPED]
    results.write_rows(storage, url, "completions", [completion_columns(r) for r in out])
    stage_structured(spec, out, chunk_index, shard_index, storage)
    return summary


def stage_structured(spec: RunSpec, out: list[dict], chunk_index: int, shard_index: int | None, storage: Storage) -> None:
    """Stage the structured tables' rows of a chunk: one file per table of every extraction prompt used.

    Args:
        spec: the run.
        out: the chunk's written result rows.
        chunk_index: the chunk.
        shard_index: its shard in a fan-out run.
        storage: where the output is.
    """
    tables = structured_tables(spec, out)
    link_structured(tables, spec.run_id)  # the code columns of diagnoses and medications, and diagnosis_codes
    for table, (rows, schema) in tables.items():
        url = spec.layout.staged_chunk(spec.run_id, table, chunk_index, shard_index)
        results.write_rows(storage, url, table, rows, schema)


def structured_tables(spec: RunSpec, out: list[dict]) -> dict[str, tuple[list[dict], object]]:
    """The structured tables' rows of some result rows, with each table's Arrow schema.

    Every extraction used (and the run's default one) gets its tables even when empty, so its tables exist
    for queries when nothing was extracted or every answer was truncated.

    Args:
        spec: the run.
        out: result rows (``pipeline.process_rows``'s, skipped ones left out).

    Returns:
        Table name -> (rows, schema).
    """
    prompts = {spec.default_prompt.prompt_id: spec.default_prompt} if spec.default_prompt.schema else {}
    for row in out:
        if row["prompt_id"] not in prompts and row["prompt_id"] in SCHEMAS:
            prompts[row["prompt_id"]] = get_prompt(row["prompt_id"])
    tables: dict[str, tuple[list[dict], object]] = {}
    for prompt in prompts.values():
        for table, (_, arrow) in tables_for(prompt.prompt_id, prompt.schema).items():
            tables[table] = ([], arrow)
    for row in out:
        for table, rows in (row.get(STRUCTURED_ROWS) or {}).items():
            tables[table][0].extend(rows)
    return tables


def discard_staged_shard(storage: Storage, spec: RunSpec, shard_index: int) -> None:
    """Remove whatever a failed shard staged, in every table, before its rows are recorded as errors.

    Args:
        storage: where the output is.
        spec: the run.
        shard_index: the shard.
    """
    prefix = shard_prefix(shard_index)
    for url in storage.list_files(spec.layout.run_staging(spec.run_id), ".parquet"):
        if url.rsplit("/", 1)[-1].startswith(prefix):
            storage.remove_tree(url)


def stage_failed_rows(
    chunk_index: int, rows: list[ManifestRow], spec: RunSpec, storage: Storage, reason: str, shard_index: int | None = None
) -> ChunkSummary:
    """Record every row of a chunk (or shard) that failed as a whole as an error row: no row is lost.

    Args:
        chunk_index: the chunk (names its staged file, replacing whatever it staged).
        rows: its manifest rows.
        spec: the run.
        storage: where the output is.
        reason: why it failed (no document data), the rows' ``error_message``.
        shard_index: its shard in a fan-out run.

    Returns:
        The chunk's counts (every row a ``task_failed`` error).
    """
    summary = ChunkSummary(chunk_index, spec.layout.staged_chunk(spec.run_id, "completions", chunk_index, shard_index))
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
