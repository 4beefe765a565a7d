"""The reviewed pages as a gold file (``medvlm review export``): every review session grows the labelled set.

A page is in the file when a reviewer marked it done for a table (the ``reviewed`` action). Its items are that
answer's items with the corrections applied (``corrections.verified_sql``): kept, edited and added items, not the
deleted ones. The gold format says that a page it lists is labelled exhaustively for every table the file names,
so a page reviewed for some of the file's tables only, while its answers fill the others too (a page asked both
``clinical_extraction`` and ``vitals``, reviewed for vitals only), is left out and counted in the notes; export
such tables apart with ``--table``. When a page was reviewed in several answers (a re-run), the latest review
counts. Fields written: every item field but the model's ``reasoning`` (an explanation, not a fact on the page);
booleans as ``true``/``false``; an empty value is a field not labelled. An item with an empty key field (``name``,
``text``) cannot be matched and is left out (counted). Document types come from the runs' manifests when they have
a ``document_type`` column. The export is recorded in ``access_log``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from medvlm_core import storage as st
from medvlm_core.analytics import connect, table_names_of
from medvlm_core.errors import RunError
from medvlm_core.evals.answers import System, document_types_from_manifests
from medvlm_core.inputs.manifest import manifest_format
from medvlm_core.output.results import utc_now
from medvlm_core.review.corrections import CORRECTIONS_TABLE, verified_sql, write_access
from medvlm_core.review.pages import (
    answers_sql,
    key_field,
    prompt_tables,
    register_keys,
)
from medvlm_core.review.submit import as_text
from medvlm_core.storage import Storage

LEFT_OUT_FIELDS = ("reasoning",)
GOLD_KEYS = ("document_id", "page", "document_type", "table")


@dataclass
class ExportResult:
    """What an export wrote.

    Attributes:
        url: the gold file.
        pages: the pages in it.
        items: the items in it.
        tables: the tables it names.
        notes: what was left out, and why.
    """

    url: str
    pages: int
    items: int
    tables: list[str]
    notes: list[str] = field(default_factory=list)


def gold_rows(con: duckdb.DuckDBPyConnection, storage: Storage, tables: list[str] | None = None
              ) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """The gold rows of the reviewed pages (module docstring).

    Args:
        con: a connection with the output's history views and ``corrections``.
        storage: reads the runs' manifests (document types).
        tables: only these tables (None: every reviewed table).

    Returns:
        ``(rows, tables named, notes)``; rows have ``document_id``, ``page``, ``document_type``, ``table`` and
        the field values as text.
    """
    # the latest review of each page and table, and the answer it was made on
    latest = con.execute(f"""
        select document_id, page, table_name, arg_max(result_key, created_at), arg_max(run_id, created_at),
            arg_max(prompt_id, created_at)
        from {CORRECTIONS_TABLE} where action = 'reviewed' and page is not null
        group by document_id, page, table_name order by document_id, page, table_name""").fetchall()
    if tables:
        latest = [r for r in latest if r[2] in tables]
    reviewed: dict[tuple[str, int], dict[str, tuple[str, str]]] = {}
    by_table: dict[tuple[str, str | None], list[tuple[str, str]]] = {}  # (table, prompt): a prompt's own fields
    for document, page, table, key, run, prompt in latest:
        reviewed.setdefault((document, page), {})[table] = (key, run)
        by_table.setdefault((table, prompt), []).append((key, run))
    items: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    skipped_items = 0
    for (table, prompt), keys in by_table.items():
        found = prompt_tables(con, prompt).get(table)
        if found is None:  # the table's prompt no longer says so (a renamed extraction): nothing to export
            continue
        relation, fields = found
        names = [f for f, _ in fields if f not in LEFT_OUT_FIELDS]
        key = key_field(table, [f for f, _ in fields])
        register_keys(con, "_reviewed_keys", keys)
        chosen = "result_key || '/' || run_id in (select result_key || '/' || run_id from _reviewed_keys)"
        sql = verified_sql(table, fields, f"(select * from {relation} where {chosen})", answers_sql(chosen),
                           CORRECTIONS_TABLE)
        for row in con.sql(f"select * from ({sql}) order by document_id, page, item_index nulls last, "
                           "verified_at").to_arrow_table().to_pylist():
            values = {f: as_text(row.get(f)) for f in names}
            values = {f: v.strip() for f, v in values.items() if v is not None and v.strip()}
            if not values.get(key):
                skipped_items += 1
                continue
            items.setdefault((row["document_id"], row["page"], table), []).append(values)
        con.unregister("_reviewed_keys")
    named = sorted({t for (_, _, t) in items})
    fills = _tables_filled(con, [d for d, _ in reviewed])
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    partial = 0
    types = document_types_from_manifests(con, storage, [System("current", None, None, "structured", [])])
    for (document, page), done in sorted(reviewed.items()):
        if any(t not in done and t in fills.get((document, page), set()) for t in named):
            partial += 1
            continue
        base = {"document_id": document, "page": str(page), "document_type": types.get(document, "")}
        page_items = [(t, values) for t in named for values in items.get((document, page, t), [])]
        if not page_items:
            rows.append(dict(base, table=""))
        rows += [dict(base, table=t, **values) for t, values in page_items]
    if partial:
        notes.append(f"{partial} page(s) left out: reviewed for only some of the file's tables while their answers "
                     "fill the others (export those tables apart with --table)")
    if skipped_items:
        notes.append(f"{skipped_items} item(s) left out: their key field is empty")
    return rows, named, notes


def _tables_filled(con: duckdb.DuckDBPyConnection, documents: list[str]) -> dict[tuple[str, int], set[str]]:
    """The tables each page's answers (any run) fill, from their prompt ids."""
    out: dict[tuple[str, int], set[str]] = {}
    if not documents:
        return out
    cache: dict[str | None, set[str]] = {}
    for document, page, prompt in con.execute(
            "select distinct document_id, page, prompt_id from completions "
            "where page is not null and list_contains($docs, document_id)", {"docs": sorted(set(documents))}).fetchall():
        if prompt not in cache:
            cache[prompt] = set(prompt_tables(con, prompt))
        out.setdefault((document, page), set()).update(cache[prompt])
    return out


def gold_bytes(rows: list[dict[str, Any]], fmt: str) -> bytes:
    """The gold rows as a file of ``fmt`` (csv, jsonl or parquet), every cell text.

    Args:
        rows: the gold rows.
        fmt: the file's format.

    Returns:
        The file's bytes.
    """
    columns = list(GOLD_KEYS)
    for row in rows:
        columns += [c for c in row if c not in columns]
    table = [{c: row.get(c) or "" for c in columns} for row in rows]
    if fmt == "csv":
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
        return text.getvalue().encode("utf-8")
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in table).encode("utf-8")
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(table) if table else pa.table({c: pa.array([], pa.string()) for c in columns}),
                   sink)
    return sink.getvalue()


def export_gold(output: str, storage: Storage, gold_uri: str, tables: list[str] | None = None,
                reviewer: str = "export") -> ExportResult:
    """Write the reviewed pages of ``output`` as a gold file ``medvlm eval`` accepts.

    Args:
        output: the output folder or ``s3://`` prefix.
        storage: reads the output, writes the gold file.
        gold_uri: where to write it (.csv, .jsonl or .parquet, by extension).
        tables: only these tables (None: every reviewed table).
        reviewer: who exports (recorded in ``access_log``).

    Returns:
        What was written.

    Raises:
        RunError: no corrections, nothing reviewed, or an unknown file format.
    """
    fmt = manifest_format(gold_uri, "gold file")
    con = connect(output, storage, current=False)
    try:
        if CORRECTIONS_TABLE not in table_names_of(con):
            raise RunError(f"output {output}: no corrections yet (nothing was reviewed with medvlm review)")
        rows, named, notes = gold_rows(con, storage, tables)
    finally:
        con.close()
    if not rows:
        raise RunError("no reviewed page to export" + (f" ({'; '.join(notes)})" if notes else "")
                       + ": mark pages done in medvlm review (key d)")
    url = st.normalize(gold_uri)
    storage.write_bytes_atomic(url, gold_bytes(rows, fmt))
    now = utc_now()
    write_access(storage, output, {"accessed_at": now, "reviewer": reviewer, "action": "export"}, now)
    pages = {(r["document_id"], r["page"]) for r in rows}
    return ExportResult(url, len(pages), sum(1 for r in rows if r["table"]), named, notes)
