"""Reading what an output answered, with DuckDB over its views: the systems to score, their page answers, their
extracted items (a batch at a time) and document types from the runs' manifests."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator

import duckdb
import polars as pl

from medvlm_core.analytics import CURRENT_SUFFIX, table_names_of
from medvlm_core.errors import RunError
from medvlm_core.evals.gold import BUILTIN_FIELDS, GoldSet
from medvlm_core.inputs.manifest import manifest_format, parse_table
from medvlm_core.output.structured import CLINICAL_PROMPT_IDS, KEY_FIELDS
from medvlm_core.storage import Storage

STRUCTURED_PROMPT = "clinical_extraction"
# The prompts that fill the built-in tables (clinical_extraction_coded adds codes and traits: docs/codes.md).
STRUCTURED_PROMPTS = CLINICAL_PROMPT_IDS
# Tables the evaluation itself writes into the output (never scored as extractions).
EVAL_TABLES = ("evals", "review")
# Columns of an extraction table that are not item fields (keys, provenance).
ITEM_COLUMNS = {name for name, _ in KEY_FIELDS} | {"section", "run_date"}


@dataclass
class System:
    """What is scored: one run's answers to one prompt id (``run_id`` None: the output's current answers)."""

    label: str
    run_id: str | None
    prompt_id: str | None
    kind: str  # "structured" or "free_text"
    tables: list[str]
    model_name: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Answer:
    """A page's answer row in a system (the latest of the run for the page)."""

    document_id: str
    page: int | None
    status: str
    error_type: str | None
    result_key: str | None
    run_id: str | None
    completion: str | None = None


def extraction_tables_of(con: duckdb.DuckDBPyConnection) -> dict[str, dict[str, str]]:
    """Structured tables of the output and the type of each item field.

    Args:
        con: a connection with the output's views.

    Returns:
        Table -> item field -> Arrow-ish type name (``bool``, ``int64``, ``double``, ``string``; the item columns
        only, not ``ITEM_COLUMNS``).
    """
    names = table_names_of(con)
    out = {}
    for name in sorted(names):
        if name.endswith(CURRENT_SUFFIX) or name in EVAL_TABLES or name in ("completions", "runs", "quarantine",
                                                                               "document_status"):
            continue
        columns = {r[0]: r[1] for r in con.execute(f"select column_name, column_type from (describe {name})").fetchall()}
        if {"document_id", "result_key", "run_id", "item_index"} <= set(columns):
            out[name] = {c: _type_name(t) for c, t in columns.items() if c not in ITEM_COLUMNS}
    return out


def _type_name(duckdb_type: str) -> str:
    t = duckdb_type.upper()
    if t == "BOOLEAN":
        return "bool"
    if t in ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT"):
        return "int64"
    if t in ("FLOAT", "DOUBLE", "REAL") or t.startswith("DECIMAL"):
        return "double"
    return "string"


def _system_filter(system: System) -> tuple[str, dict[str, Any]]:
    source = "completions" if system.run_id else "completions" + CURRENT_SUFFIX
    where = "prompt_id is not distinct from $prompt"
    params: dict[str, Any] = {"prompt": system.prompt_id}
    if system.run_id:
        where += " and run_id = $run"
        params["run"] = system.run_id
    return f"select * from {source} where {where}", params


def latest_rows_sql(system: System, extra_where: str = "") -> tuple[str, dict[str, Any]]:
    """SQL for a system's latest completion row of each document page (newest ``created_at``, then ``run_id``,
    then ``manifest_row``).

    Args:
        system: the system.
        extra_where: a ``where`` clause applied before picking the latest row (``""``: none).

    Returns:
        ``(sql, parameters)``.
    """
    rows, params = _system_filter(system)
    return (f"select * from ({rows}) {extra_where} qualify row_number() over (partition by document_id, page "
            f"order by created_at desc, run_id desc, manifest_row desc) = 1"), params


def find_systems(con: duckdb.DuckDBPyConnection, gold: GoldSet, run_ids: list[str] | None,
                 extraction_tables: dict[str, dict[str, str]]) -> tuple[list[System], list[str]]:
    """The systems to score: each named run's prompt ids (in the order given), or the current answers'.

    Args:
        con: a connection with the output's views.
        gold: the gold set.
        run_ids: runs to score; None or empty: the current answers.
        extraction_tables: the output's user extraction tables.

    Returns:
        ``(systems, notes)``; a note says why a system was left out.

    Raises:
        RunError: a named run has no completion rows in the output.
    """
    runs: list[tuple[str | None, list[str | None]]] = []
    if run_ids:
        for run_id in run_ids:
            found = con.execute("select distinct prompt_id from completions where run_id = $run order by prompt_id",
                                {"run": run_id}).fetchall()
            if not found:
                raise RunError(f"run {run_id} has no completion rows in the output")
            runs.append((run_id, [r[0] for r in found]))
    else:
        found = con.execute(f"select distinct prompt_id from completions{CURRENT_SUFFIX} order by prompt_id").fetchall()
        runs.append((None, [r[0] for r in found]))
    systems, notes = [], []
    for run_id, prompts in runs:
        for prompt_id in prompts:
            base = run_id or "current"
            label = base if len(prompts) == 1 else f"{base} {prompt_id}"
            if prompt_id in STRUCTURED_PROMPTS:
                kind, tables = "structured", [t for t in gold.tables if t in BUILTIN_FIELDS]
            elif prompt_id in extraction_tables:
                kind, tables = "structured", [t for t in gold.tables if t == prompt_id]
            else:
                kind, tables = "free_text", list(gold.tables)
            if not tables:
                notes.append(f"{label}: left out, its prompt {prompt_id} fills none of the gold file's tables")
                continue
            system = System(label, run_id, prompt_id, kind, tables)
            rows, params = _system_filter(system)
            meta = con.execute(f"select any_value(model_name), any_value(params_json) from ({rows})", params).fetchone()
            system.model_name = meta[0]
            try:
                system.params = json.loads(meta[1]) if meta[1] else {}
            except ValueError:
                system.params = {}
            systems.append(system)
    return systems, notes


def load_answers(con: duckdb.DuckDBPyConnection, system: System) -> tuple[dict[tuple[str, int], Answer], dict[str, Answer]]:
    """The system's answers on the labelled documents (a registered ``_gold_documents`` relation).

    Args:
        con: a connection with the output's views and ``_gold_documents``.
        system: the system.

    Returns:
        ``(page answers by (document, page), document-level rows by document)`` (a document-level row: the
        file could not be fetched or opened).
    """
    sql, params = latest_rows_sql(system, "where document_id in (select document_id from _gold_documents)")
    columns = "document_id, page, status, error_type, result_key, run_id, completion"
    pages, documents = {}, {}
    for row in con.execute(f"select {columns} from ({sql})", params).fetchall():
        answer = Answer(*row)
        if answer.page is None:
            documents[answer.document_id] = answer
        else:
            pages[(answer.document_id, int(answer.page))] = answer
    return pages, documents


def iter_items(con: duckdb.DuckDBPyConnection, system: System, table: str, gold_only: bool = True,
               batch_rows: int = 50_000) -> Iterator[dict[str, Any]]:
    """The extracted items of one table of a system, read a batch at a time (a big run is never held whole).

    Args:
        con: a connection with the output's views (and ``_gold_documents`` when ``gold_only``).
        system: the system.
        table: the table.
        gold_only: read only the labelled documents' rows.
        batch_rows: rows converted to Python at a time.

    Yields:
        Items (all columns, as dicts).
    """
    if table not in table_names_of(con):
        return
    source = table if system.run_id else table + CURRENT_SUFFIX
    where = ["run_id = $run"] if system.run_id else []
    if gold_only:
        where.append("document_id in (select document_id from _gold_documents)")
    sql = f"select * from {source}" + (" where " + " and ".join(where) if where else "") + " order by item_index"
    reader = con.sql(sql, params={"run": system.run_id} if system.run_id else {}).to_arrow_reader(batch_rows)
    for batch in reader:
        yield from batch.to_pylist()


def load_items(con: duckdb.DuckDBPyConnection, system: System, table: str,
               keys: set[tuple[str, str]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The extracted items of one table on the labelled documents, for the given answers, in item order.

    Args:
        con: a connection with the output's views and ``_gold_documents``.
        system: the system.
        table: the table.
        keys: ``(result_key, run_id)`` of the answers whose items are wanted.

    Returns:
        ``(result_key, run_id)`` -> items (all columns, as dicts).
    """
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    if not keys:
        return out
    for item in iter_items(con, system, table):
        key = (item["result_key"], item["run_id"])
        if key in keys:
            if item.get("icd10cm_code") and not item.get("icd10cm_category"):
                item["icd10cm_category"] = item["icd10cm_code"][:3]  # scored like the gold's (gold.py)
            out.setdefault(key, []).append(item)
    return out


def document_types_from_manifests(con: duckdb.DuckDBPyConnection, storage: Storage, systems: list[System]) -> dict[str, str]:
    """Document types from a ``document_type`` column of the scored runs' manifests, where they have one.

    Args:
        con: a connection with the output's views.
        storage: reads the manifests.
        systems: the scored systems (their runs name the manifests; the current answers: every run's).

    Returns:
        Document id -> type; manifests that cannot be read or have no such column add nothing.
    """
    run_ids = sorted({s.run_id for s in systems if s.run_id})
    sql, params = "select distinct manifest_uri from runs where manifest_uri is not null", {}
    if all(s.run_id for s in systems):  # named runs: their manifests; the current answers: every run's
        sql, params = sql + " and list_contains($runs, run_id)", {"runs": run_ids}
    try:
        uris = [r[0] for r in con.execute(sql, params).fetchall()]
    except duckdb.Error:
        return {}
    types: dict[str, str] = {}
    for uri in uris:
        try:
            fmt = manifest_format(uri)
            frame = parse_table(storage.read_bytes(uri), fmt, uri)
        except Exception:  # an unknown format, an unreadable or moved manifest: no types from it
            continue
        if "document_type" not in frame.columns or "document_id" not in frame.columns:
            continue
        for doc, doc_type in frame.select(pl.col("document_id").cast(pl.Utf8), pl.col("document_type").cast(pl.Utf8)).iter_rows():
            if doc and doc_type and str(doc_type).strip():
                types.setdefault(str(doc).strip(), str(doc_type).strip())
    return types
