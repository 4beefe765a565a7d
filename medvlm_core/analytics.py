"""DuckDB over the output tables: the full history of every table, and current views that tell what is true now.

Works offline on local folders and on S3 (DuckDB reads through the s3fs filesystem registered with it, so
its httpfs extension, which would be downloaded at run time, is not needed).

Views made by ``connect`` / ``register_views``:

* ``completions``, ``runs``, ``quarantine``, ``diagnoses``, ``medications``, ``instructions`` and every user
  extraction: the **history**, every row every published run wrote (exactly what is on disk). Use them for
  audits, throughput, "how often did this fail before it worked", model comparisons.
* ``completions_current``: one row per document page and prompt id, the current one (rule below).
* ``<structured table>_current`` (``diagnoses_current``, ...): the rows whose completion row is current
  (joined on ``result_key`` and ``run_id``): a structured row follows its completion row's currency.
* ``quarantine_current``: refused manifest rows that no later attempt has superseded.
* ``document_status``: per document, its pages, how many current rows are ok / error / truncated, how many
  current quarantine rows it has, and the latest run that wrote a row for it ("what is still failing?").

``runs`` has no current view: each of its rows is one run, a fact that stays true.

The current rule (``current_slots_sql`` is its only implementation; the README shows it):

1. A *slot* is ``(document_id, prompt_id, page)``: one page may be asked several questions (prompt ids),
   and each question has one current answer. A changed model, prompt text or parameter under the same
   prompt id is a new attempt at the same slot (a new ``result_key``).
2. Attempts are ordered by ``created_at``; ties (the same microsecond) are broken by ``run_id``, then
   ``manifest_row``, so the choice is deterministic.
3. The current row of a slot is its latest attempt, **except** that a failed attempt (``error`` or
   ``truncated``) does not displace the slot's latest ``ok`` answer unless it re-ran that answer's own
   ``result_key``. Why: a run skips the result keys that already have an ``ok`` (or ``truncated``) row, so
   a later row under the answer's key exists only when ``--force`` produced it (the tables do not record
   ``--force``; this is how it shows). A later failure under another key (a file that went missing, a new
   model, prompt text or parameters that fail) is a new attempt that failed: the answer already obtained
   stays current and the failure stays in the history. A later ``ok`` under any key replaces the answer.
   Once a forced re-run has failed the answer's key, the slot's latest attempt is current (an older answer
   does not come back). Equivalently, replaying the rows in time order: a row replaces the current one
   unless it is a failure under another key while the current one is ok (tests replay exactly this).
4. A *document-level* row (``page`` null: the file could not be fetched or opened, so its pages are not
   known) is its own slot per document and prompt id, superseded by any later row of that document and
   prompt id with a page. It never displaces page rows: a document whose file went missing after it was
   answered shows its ok pages and the current fetch error.
5. Quarantine rows name their document through ``row_json``'s ``document_id``. Such a row is current while
   it belongs to the latest run that quarantined that document and no completion row of a later run exists
   for the document. A quarantine row without a document id is current while its run is the latest run of
   the same ``manifest_uri`` (the runs table).

Consequences: a page whose error was retried and fixed shows only its ok row; an error retried that fails
again shows once (the latest); ``--force`` re-runs make the new rows current; counts over the current views
count each page and prompt id once, however many runs touched it. Known limit: two runs of one manifest
started together may both write a key; the later row is then current even if it is a transient failure
(as a ``--force`` failure would be).

Cost (bench/analytics_scale.py, BENCHMARKS.md): the rule sorts the history twice; on ~1M history rows and
2 cores the current views of every document take 2.4-5.6 s; one document through ``document_status(output,
storage, document_id)`` 0.5-0.7 s (its rows are read once), through a ``WHERE document_id = ...`` on the
views 1-2.7 s (DuckDB pushes the filter into every scan, but scans several times). A connection lists the
output once: its views read that snapshot of files.
"""

from __future__ import annotations

import re

import duckdb
import pyarrow as pa

from medvlm_core import storage as st
from medvlm_core.errors import RunError
from medvlm_core.storage import Storage

_IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
# Tables written by every run; any other table holding document_id, result_key and run_id is structured.
_CORE_TABLES = ("completions", "runs", "quarantine")
CURRENT_SUFFIX = "_current"
DOCUMENT_STATUS = "document_status"

_RULE_COLUMNS = "document_id, prompt_id, page, result_key, run_id, manifest_row, created_at, status, error_type"


def current_slots_sql(completions: str = "completions") -> str:
    """The current rule (module docstring), the only place it is written: the current row of every slot.

    Plain subqueries, no materialized CTEs, so that DuckDB pushes a ``document_id = ...`` filter on the
    result into every scan of ``completions``.

    Args:
        completions: the relation holding the completions history (a view or CTE name).

    Returns:
        SQL of a SELECT giving, per slot (document_id, prompt_id, page), its current row's document_id,
        prompt_id, page, result_key, run_id, manifest_row, created_at, status and error_type.
    """
    return f"""
select s.* from (
    select {_RULE_COLUMNS}
    from (
        select *,
            row_number() over by_slot as _rn,
            max(_key_ok_at) over by_slot as _last_ok_at,
            first_value(case when status = 'ok' then result_key end ignore nulls) over by_slot as _answer_key,
            first_value(case when status = 'ok' then created_at end ignore nulls) over by_slot as _answer_at
        from (
            -- the latest row of each result key (an older row of a key is never current), with the
            -- latest time the key was ok, over all its rows
            select *,
                max(case when status = 'ok' then created_at end)
                    over (partition by document_id, prompt_id, page, result_key) as _key_ok_at
            from (select {_RULE_COLUMNS} from {completions})
            qualify row_number() over (partition by document_id, prompt_id, page, result_key
                                       order by created_at desc, run_id desc, manifest_row desc) = 1
        )
        window by_slot as (partition by document_id, prompt_id, page
                           order by created_at desc, run_id desc, manifest_row desc
                           rows between unbounded preceding and unbounded following)
    )
    -- the slot's latest ok answer stands while its key's latest row is still that ok (no --force re-run
    -- of that key failed since); otherwise the slot's latest attempt is current
    where case when _answer_at = _last_ok_at then result_key = _answer_key else _rn = 1 end
) s
left join (
    -- a document-level row (page null) gives way to any later row of its document and prompt id with a page
    select document_id, prompt_id, max(created_at) filter (where page is not null) as _last_page_row_at
    from {completions} group by document_id, prompt_id
) l using (document_id, prompt_id)
where s.page is not null or l._last_page_row_at is null or s.created_at > l._last_page_row_at
"""


def current_rows_sql(table: str, completions: str = "completions") -> str:
    """The rows of ``table`` that belong to current completion rows (``completions_current`` itself when
    ``table`` is the completions relation).

    An inner join on document_id (at most one current row per history row), so a document filter reaches
    both sides.

    Args:
        table: a relation with document_id, result_key and run_id (completions or a structured table).
        completions: the relation holding the completions history.

    Returns:
        SQL of a SELECT of ``table``'s columns.
    """
    extra = " and t.created_at = c.created_at" if table == completions else ""
    keys = "*" if extra else "distinct document_id, result_key, run_id"
    return f"""
select t.* from {table} t join (select {keys} from ({current_slots_sql(completions)})) c
    on t.document_id = c.document_id and t.result_key = c.result_key and t.run_id = c.run_id{extra}
"""


def _document_history_sql(completions: str) -> str:
    # per document: the latest row any run wrote for it (history, current or not)
    return f"""
select document_id, max(created_at) as last_at, max_by(run_id, created_at) as last_run_id
from {completions} group by document_id
"""


def _quarantine_documents_sql(quarantine: str) -> str:
    return f"select *, json_extract_string(row_json, '$.document_id') as document_id from {quarantine}"


def current_quarantine_sql(quarantine: str = "quarantine", completions: str = "completions",
                           document_history: str | None = None) -> str:
    """Rule 5 of the module docstring: the quarantine rows no later attempt has superseded.

    Args:
        quarantine: the relation holding the quarantine history.
        completions: the relation holding the completions history.
        document_history: a relation shaped like the per-document history (document_id, last_at,
            last_run_id), if the caller already has one.

    Returns:
        SQL of a SELECT of the quarantine columns plus ``document_id`` (from ``row_json``; null if absent).
    """
    history = document_history or f"({_document_history_sql(completions)})"
    q = _quarantine_documents_sql(quarantine)
    return f"""
select b.* exclude (_latest_quarantine_run)
from (
    select *, max_by(run_id, created_at) over (partition by document_id) as _latest_quarantine_run
    from ({q}) where document_id is not null
) b left join {history} h using (document_id)
where b.run_id = b._latest_quarantine_run
  and (h.last_at is null or h.last_at <= b.created_at or h.last_run_id = b.run_id)
union all by name
select q.* from ({q}) q
join (select manifest_uri, max_by(run_id, started_at) as _run from runs group by manifest_uri) m
  on q.manifest_uri = m.manifest_uri and q.run_id = m._run
where q.document_id is null
"""


def document_status_sql(completions: str = "completions", quarantine: str = "quarantine") -> str:
    """The document status: one row per document that has completion or quarantine rows.

    Args:
        completions: the relation holding the completions history.
        quarantine: the relation holding the quarantine history.

    Returns:
        SQL of a SELECT of document_id, pages (distinct pages with a current row), prompts (distinct prompt
        ids), ok, error, truncated (current rows: one per page and prompt id; a document-level error counts
        one), quarantined (current quarantine rows), error_types (of the current errors), latest_run_id and
        latest_at (the latest run that wrote a completion or quarantine row for it).
    """
    return f"""
with history as not materialized ({_document_history_sql(completions)}),
quarantined as (
    select document_id, count(*) as quarantined, max(created_at) as quarantined_at,
        max_by(run_id, created_at) as quarantine_run_id
    from ({current_quarantine_sql(quarantine, completions, document_history="history")})
    where document_id is not null group by document_id
),
counts as (
    select document_id,
        count(distinct page) as pages,
        count(distinct prompt_id) as prompts,
        count(*) filter (where status = 'ok') as ok,
        count(*) filter (where status = 'error') as error,
        count(*) filter (where status = 'truncated') as truncated,
        list(distinct error_type order by error_type) filter (where status = 'error') as error_types
    from ({current_slots_sql(completions)}) group by document_id
),
documents as (select document_id from history union select document_id from quarantined)
select d.document_id,
    coalesce(c.pages, 0) as pages, coalesce(c.prompts, 0) as prompts,
    coalesce(c.ok, 0) as ok, coalesce(c.error, 0) as error, coalesce(c.truncated, 0) as truncated,
    coalesce(q.quarantined, 0) as quarantined,
    coalesce(c.error_types, []) as error_types,
    case when h.last_at is null or q.quarantined_at > h.last_at then q.quarantine_run_id
         else h.last_run_id end as latest_run_id,
    greatest(h.last_at, q.quarantined_at) as latest_at
from documents d
left join history h using (document_id)
left join counts c using (document_id)
left join quarantined q using (document_id)
"""


# The questions analysts ask first (also in the README; tests run them on real pipeline output). They read
# the current views, except throughput_per_run (each run row is its own fact).
EXAMPLE_QUERIES = {
    "medications_per_diagnosis": """
        select d.name as diagnosis, m.name as medication, count(*) as pages
        from diagnoses_current d join medications_current m using (result_key, run_id)
        group by all order by pages desc, diagnosis, medication limit 20""",
    "conditional_instructions": """
        select document_id, page, text, condition, follow_up_interval
        from instructions_current where conditional order by document_id, page, item_index""",
    "errors_by_type": """
        select error_type, count(distinct document_id) as documents, count(*) as pages
        from completions_current where status = 'error' group by error_type order by pages desc, error_type""",
    "still_failing": """
        select document_id, pages, ok, error, truncated, quarantined, error_types, latest_run_id, latest_at
        from document_status where error > 0 or quarantined > 0 order by latest_at desc, document_id""",
    "document_status": """
        select * from document_status order by document_id""",
    "throughput_per_run": """
        select run_id, pages_ok, pages_error, skipped_pages, round(wall_seconds, 2) as seconds,
               round(pages_per_second, 3) as pages_per_second,
               round(completion_tokens_per_second, 1) as tokens_per_second
        from runs order by started_at""",
}


def table_files(storage: Storage, output: str) -> dict[str, list[str]]:
    """The published Parquet files of each table under ``output``: ``<table>/<partition>/<file>.parquet``,
    where no part starts with ``_`` (internal: staging, commits, state) or ``.`` (temporary files).

    Args:
        storage: the storage that reads ``output``.
        output: the output folder or ``s3://`` prefix of medvlm runs.

    Returns:
        Table name -> its files' URLs, sorted.
    """
    base = st.normalize(output).rstrip("/")
    tables: dict[str, list[str]] = {}
    for url in storage.list_files(base, ".parquet"):
        parts = url[len(base) :].lstrip("/").split("/")
        if len(parts) == 3 and _IDENTIFIER.match(parts[0]) and not any(p.startswith(("_", ".")) for p in parts[1:]):
            tables.setdefault(parts[0], []).append(url)
    return dict(sorted(tables.items()))


def table_names(storage: Storage, output: str) -> list[str]:
    """The tables under ``output``: its folders that hold published Parquet files.

    Args:
        storage: the storage that reads ``output``.
        output: the output folder or ``s3://`` prefix of medvlm runs.

    Returns:
        The table names, sorted.
    """
    return list(table_files(storage, output))


# Empty stand-ins for tables the current rule reads, in an output that has none of their files.
_PLACEHOLDERS = {
    "quarantine": "null::varchar as run_id, null::varchar as manifest_uri, null::varchar as row_json, "
                  "null::timestamptz as created_at",
    "runs": "null::varchar as run_id, null::varchar as manifest_uri, null::timestamptz as started_at",
}


def table_names_of(con: duckdb.DuckDBPyConnection) -> set[str]:
    """The views and tables a connection has.

    Args:
        con: the connection.

    Returns:
        Their names.
    """
    return {r[0] for r in con.execute("select view_name from duckdb_views() where not internal "
                                      "union select table_name from duckdb_tables()").fetchall()}


def _columns(con: duckdb.DuckDBPyConnection, view: str) -> set[str]:
    return {row[0] for row in con.execute(f"select column_name from (describe {view})").fetchall()}


def register_views(con: duckdb.DuckDBPyConnection, output: str, storage: Storage, current: bool = True) -> list[str]:
    """Add the history views and the current views of ``output``'s tables to an existing DuckDB connection.

    Args:
        con: the connection (an S3 output's filesystem is registered on it).
        output: the output folder or ``s3://`` prefix of medvlm runs.
        storage: the storage that reads ``output``.
        current: also the current views and ``document_status`` (binding them reads every file's schema
            again; False gives the history views only).

    Returns:
        The names of the views created (history first, then current views, then ``document_status``).

    Raises:
        RunError: no tables under ``output``.
    """
    output = st.normalize(output).rstrip("/")
    files = table_files(storage, output)
    if not files:
        raise RunError(f"output {output}: no tables found")
    if st.protocol_of(output) != st.LOCAL:
        fs, _ = storage.filesystem(output)
        con.register_filesystem(fs)
    names = list(files)
    for name, urls in files.items():
        # the files listed once, not a glob: every view of the connection reads the same snapshot (a run
        # published meanwhile is not half seen), and no scan lists the store again
        listed = ", ".join("'" + url.replace("'", "''") + "'" for url in urls)
        con.execute(
            f"create or replace view {name} as select * from "
            f"read_parquet([{listed}], hive_partitioning = true, union_by_name = true)"
        )
    created = list(names)
    if not current or "completions" not in names:
        return created  # (without completions there is nothing to judge currency by)

    def derived(view: str, sql: str) -> None:
        if view in names:  # an extraction table already has this name: the table on disk wins
            return
        con.execute(f"create or replace view {view} as {sql}")
        created.append(view)

    derived("completions" + CURRENT_SUFFIX, current_rows_sql("completions"))
    for name in names:
        if name in _CORE_TABLES or name.endswith(CURRENT_SUFFIX):
            continue
        if {"document_id", "result_key", "run_id"} <= _columns(con, name):
            derived(name + CURRENT_SUFFIX, current_rows_sql(name))
    for view, columns in _PLACEHOLDERS.items():  # every run publishes them, but an output may predate that
        if view not in names:
            con.execute(f"create or replace temp view {view} as select {columns} where false")
    derived("quarantine" + CURRENT_SUFFIX, current_quarantine_sql())
    derived(DOCUMENT_STATUS, document_status_sql())
    return created


def connect(output: str, storage: Storage, current: bool = True) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the output's history views, current views and ``document_status``.

    Args:
        output: the output folder or ``s3://`` prefix of medvlm runs.
        storage: the storage that reads ``output``.
        current: also the current views (see ``register_views``).

    Returns:
        An open connection (close it when done).

    Raises:
        RunError: no tables under ``output``.
    """
    con = duckdb.connect()
    try:
        # the views read every file's footer when bound; caching footers makes the second read free
        con.execute("set parquet_metadata_cache = true")
        register_views(con, output, storage, current)
    except BaseException:
        con.close()
        raise
    return con


def query(output: str, sql: str, storage: Storage, parameters: dict | None = None, current: bool = True) -> pa.Table:
    """Run ``sql`` over the output's views.

    Args:
        output: the output folder or ``s3://`` prefix of medvlm runs.
        sql: the query (may use every view of ``register_views``).
        storage: the storage that reads ``output``.
        parameters: values of named parameters (``$name``) in ``sql``.
        current: create the current views too (False: ``sql`` reads the history views only).

    Returns:
        The result as an Arrow table.

    Raises:
        RunError: no tables, or the query is wrong (DuckDB's message, first line).
    """
    con = connect(output, storage, current)
    try:
        return con.sql(sql, params=parameters).to_arrow_table()
    except duckdb.Error as exc:
        raise RunError(f"query failed: {str(exc).splitlines()[0]}") from None
    finally:
        con.close()


def document_status(output: str, storage: Storage, document_id: str | None = None) -> pa.Table:
    """The ``document_status`` rows of every document, or of one (DuckDB pushes its filter into every scan).

    Args:
        output: the output folder or ``s3://`` prefix of medvlm runs.
        storage: the storage that reads ``output``.
        document_id: one document, or None for all.

    Returns:
        Columns document_id, pages, prompts, ok, error, truncated, quarantined, error_types, latest_run_id,
        latest_at; ordered by document_id.
    """
    if document_id is None:
        return query(output, "select * from document_status order by document_id", storage)
    # the document's rows first (one scan of each table), then the status over them: no current view needed
    sql = f"""
with one_completions as materialized (select * from completions where document_id = $document_id),
one_quarantine as materialized (
    select * from quarantine where json_extract_string(row_json, '$.document_id') = $document_id)
select * from ({document_status_sql("one_completions", "one_quarantine")})"""
    con = connect(output, storage, current=False)
    try:
        for view, columns in _PLACEHOLDERS.items():  # an output that has no such table yet
            if view not in table_names_of(con):
                con.execute(f"create temp view {view} as select {columns} where false")
        return con.sql(sql, params={"document_id": document_id}).to_arrow_table()
    except duckdb.Error as exc:
        raise RunError(f"query failed: {str(exc).splitlines()[0]}") from None
    finally:
        con.close()
