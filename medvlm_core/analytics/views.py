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
  current quarantine rows it has, and the latest run that wrote a row for it ("what is still failing?"); with
  ``reviewed`` (its current answers a reviewer marked done) when the output has corrections.
* ``<structured table>_verified`` (when the output has ``corrections``, from ``medvlm review``): the current view
  with the reviewers' corrections applied, plus ``verified_by`` and ``verified_at``
  (``medvlm_core.review.corrections``). The review tables (``corrections``, ``access_log``) get no current view.

``runs`` has no current view: each of its rows is one run, a fact that stays true.

Cost (bench/analytics_scale.py, docs/benchmarks.md): the rule sorts the history twice; on ~1M history rows and
2 cores the current views of every document take 2.4-5.6 s; one document through ``document_status(output,
storage, document_id)`` 0.5-0.7 s (its rows are read once), through a ``WHERE document_id = ...`` on the
views 1-2.7 s (DuckDB pushes the filter into every scan, but scans several times). A connection lists the
output once: its views read that snapshot of files.

The current rule itself (which row of a slot is current) is written once, in ``current_rule.py``.
"""

from __future__ import annotations

import re

import duckdb
import pyarrow as pa

from medvlm_core import storage as st
from medvlm_core.analytics.coded import register_coded_views
from medvlm_core.analytics.current_rule import (
    CORE_TABLES,
    CURRENT_SUFFIX,
    DOCUMENT_STATUS,
    current_quarantine_sql,
    current_rows_sql,
    current_slots_sql,
    document_status_sql,
)
from medvlm_core.errors import RunError
from medvlm_core.output.tables import EVAL_TABLES, REVIEW_TABLES, RUN_TABLES
from medvlm_core.review.corrections import (
    CORRECTIONS_TABLE,
    NOT_FIELDS,
    VERIFIED_SUFFIX,
    reviewed_answers_sql,
    verified_sql,
)
from medvlm_core.storage import Storage

_IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


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


# Arrow types of the run tables' columns as DuckDB spells them.
_DUCKDB_TYPES = {"string": "varchar", "int32": "integer", "int64": "bigint", "double": "double", "bool": "boolean",
                 "timestamp[us, tz=UTC]": "timestamptz", "list<item: int32>": "integer[]"}


def _duckdb_type(arrow_type: object) -> str:
    return _DUCKDB_TYPES[str(arrow_type)]


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
        source = f"read_parquet([{listed}], hive_partitioning = true, union_by_name = true)"
        con.execute(f"create or replace view {name} as select * from {source}")
        if name in RUN_TABLES:  # columns added since the oldest files were written: null there, as defined
            missing = [c for c in RUN_TABLES[name].columns if c.name not in _columns(con, name)]
            if missing:
                added = ", ".join(f"null::{_duckdb_type(c.type)} as {c.name}" for c in missing)
                con.execute(f"create or replace view {name} as select *, {added} from {source}")
    created = list(names)
    if not current or "completions" not in names:
        return created  # (without completions there is nothing to judge currency by)

    def derived(view: str, sql: str) -> None:
        if view in names:  # an extraction table already has this name: the table on disk wins
            return
        con.execute(f"create or replace view {view} as {sql}")
        created.append(view)

    derived("completions" + CURRENT_SUFFIX, current_rows_sql("completions"))
    structured = []
    for name in names:
        if name in CORE_TABLES or name in REVIEW_TABLES or name.endswith(CURRENT_SUFFIX):
            continue
        columns = _columns(con, name)
        if {"document_id", "result_key", "run_id"} <= columns:
            derived(name + CURRENT_SUFFIX, current_rows_sql(name))
            if "item_index" in columns and name not in EVAL_TABLES:
                structured.append(name)
    register_coded_views(con, names, created)  # codes: the latest linking of each item is current (coded.py)
    reviewed = CORRECTIONS_TABLE in names
    for name in structured if reviewed else ():
        fields = [(c, t) for c, t in con.execute(f"select column_name, column_type from (describe {name})").fetchall()
                  if c not in NOT_FIELDS]
        derived(name + VERIFIED_SUFFIX,
                verified_sql(name, fields, name + CURRENT_SUFFIX, "completions" + CURRENT_SUFFIX, CORRECTIONS_TABLE))
    for view, columns in _PLACEHOLDERS.items():  # every run publishes them, but an output may predate that
        if view not in names:
            con.execute(f"create or replace temp view {view} as select {columns} where false")
    derived("quarantine" + CURRENT_SUFFIX, current_quarantine_sql())
    status = document_status_sql()
    derived(DOCUMENT_STATUS, _with_reviewed(status, "completions") if reviewed else status)
    return created


def _with_reviewed(status_sql: str, completions: str) -> str:
    """The document status with ``reviewed``: its current answers a reviewer marked done (``medvlm review``)."""
    reviewed = reviewed_answers_sql(f"({current_slots_sql(completions)})", CORRECTIONS_TABLE)
    return f"select d.*, coalesce(r.reviewed, 0) as reviewed from ({status_sql}) d left join ({reviewed}) r " \
           "using (document_id)"


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
        latest_at (and reviewed, when the output has corrections); ordered by document_id.
    """
    if document_id is None:
        return query(output, "select * from document_status order by document_id", storage)
    con = connect(output, storage, current=False)
    try:
        for view, columns in _PLACEHOLDERS.items():  # an output that has no such table yet
            if view not in table_names_of(con):
                con.execute(f"create temp view {view} as select {columns} where false")
        status = document_status_sql("one_completions", "one_quarantine")
        if CORRECTIONS_TABLE in table_names_of(con):
            status = _with_reviewed(status, "one_completions")
        # the document's rows first (one scan of each table), then the status over them: no current view needed
        sql = f"""
with one_completions as materialized (select * from completions where document_id = $document_id),
one_quarantine as materialized (
    select * from quarantine where json_extract_string(row_json, '$.document_id') = $document_id)
select * from ({status})"""
        return con.sql(sql, params={"document_id": document_id}).to_arrow_table()
    except duckdb.Error as exc:
        raise RunError(f"query failed: {str(exc).splitlines()[0]}") from None
    finally:
        con.close()
