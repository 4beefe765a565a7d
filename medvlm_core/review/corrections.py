"""The review workbench's tables and the SQL that applies them.

* ``corrections``: every reviewer action, appended. One submission (what a reviewer sends at once: an accept, an
  edit of three fields, a page marked done) is one Parquet file, ``corrections/run_date=<day>/part-<id>.parquet``,
  written atomically like any table (``results.write_parquet``): two reviewers at once write two files, so no
  correction is ever lost, and the model's rows are never rewritten.
* ``access_log``: who opened which document page, when (one file per access, written before the page is sent).
* ``verified_sql``: a table's rows with the corrections applied (the ``<table>_verified`` views, the item page,
  the gold export): per item, its latest action decides (``delete`` removes it; ``accept``, ``edit`` or ``add``
  keep it), each field takes its latest edited value, and the items reviewers added join the page's answer.
  "Latest" is the order ``created_at``, ``submission_id``, ``seq``: two reviewers who edit the same field, the
  later submission wins; both stay in the table.

This module imports nothing of ``medvlm_core.analytics`` (which imports it for the verified views).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Iterable

import pyarrow as pa

from medvlm_core.output.paths import OutputLayout
from medvlm_core.output.results import write_parquet
from medvlm_core.output.tables import ACCESS_LOG, CORRECTIONS, STRUCTURED_KEYS, Table, validate_table
from medvlm_core.storage import Storage

CORRECTIONS_TABLE = CORRECTIONS.name
ACCESS_LOG_TABLE = ACCESS_LOG.name
VERIFIED_SUFFIX = "_verified"
# Columns of an extraction table that are not the item's fields (its keys, the array it came from, the partition).
NOT_FIELDS = frozenset({c.name for c in STRUCTURED_KEYS} | {"section", "run_date"})


def new_file_id(now: datetime) -> str:
    """A new file id: sortable by time, unique (a random suffix), safe in a file name.

    Args:
        now: the time of the submission.

    Returns:
        ``YYYYmmddTHHMMSSZ-<12 hex>``.
    """
    return f"{now:%Y%m%dT%H%M%S}Z-{uuid.uuid4().hex[:12]}"


def table_file(output: str, table: str, now: datetime, file_id: str) -> str:
    """Where one submission (or one access) of a review table is written.

    Args:
        output: the output URI.
        table: ``corrections`` or ``access_log``.
        now: the time (its UTC date is the ``run_date`` partition).
        file_id: the file's id.

    Returns:
        Its URL.
    """
    return OutputLayout.of(output).table_part(table, f"{now:%Y-%m-%d}", file_id)


def write_review_rows(storage: Storage, output: str, table: Table, rows: Iterable[dict[str, Any]], now: datetime,
                      file_id: str | None = None) -> str:
    """Validate rows and write them as one new file of a review table, atomically.

    Args:
        storage: writes the output.
        output: the output URI.
        table: ``CORRECTIONS`` or ``ACCESS_LOG``.
        rows: the rows.
        now: their time (names the partition).
        file_id: the file's id (default: a new one).

    Returns:
        The file's URL.
    """
    arrow = table.rows_to_arrow(rows)
    validate_table(table.name, arrow)
    url = table_file(output, table.name, now, file_id or new_file_id(now))
    write_parquet(storage, url, arrow)
    return url


def write_corrections(storage: Storage, output: str, rows: list[dict[str, Any]], now: datetime) -> str:
    """Append one submission's corrections (one file named after its ``submission_id``).

    Args:
        storage: writes the output.
        output: the output URI.
        rows: the ``corrections`` rows of one submission (they share a ``submission_id``).
        now: the submission's time.

    Returns:
        The file's URL.
    """
    ids = {r["submission_id"] for r in rows}
    if len(ids) != 1:
        raise ValueError("one submission per file")
    return write_review_rows(storage, output, CORRECTIONS, rows, now, file_id=ids.pop())


def write_access(storage: Storage, output: str, row: dict[str, Any], now: datetime) -> str:
    """Append one access to the access log (its own file, written before the page is sent).

    Args:
        storage: writes the output.
        output: the output URI.
        row: the ``access_log`` row.
        now: its time.

    Returns:
        The file's URL.
    """
    return write_review_rows(storage, output, ACCESS_LOG, [row], now)


def empty_corrections() -> pa.Table:
    """An empty ``corrections`` table (registered as the relation when an output has none yet).

    Returns:
        The Arrow table with the table's schema and no rows.
    """
    return CORRECTIONS.arrow_schema().empty_table()


def quote(name: str) -> str:
    """A SQL identifier, quoted (a user extraction's field may be any JSON property name).

    Args:
        name: the column's name.

    Returns:
        ``"name"`` with inner quotes doubled.
    """
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """A SQL string literal.

    Args:
        text: the text.

    Returns:
        ``'text'`` with inner quotes doubled.
    """
    return "'" + text.replace("'", "''") + "'"


def verified_sql(table: str, fields: list[tuple[str, str]], base: str, answers: str, corrections: str = "corrections",
                 detail: bool = False) -> str:
    """The rows of ``base`` (a structured table's rows) with the corrections of ``table`` applied.

    Args:
        table: the extraction table's name (the corrections' ``table_name``).
        fields: the item fields corrections may set, with their DuckDB types (``[("dose", "VARCHAR"), ...]``).
        base: a relation (view name or parenthesised SELECT) of the model's rows.
        answers: a relation with one row per answer (``result_key``, ``run_id``, ``document_id``, ``page``,
            ``patient_id``, ``encounter_id``) that added items attach to: only answers in it get their added items.
        corrections: the corrections relation.
        detail: keep deleted items and add ``_item`` (``m<index>`` or ``a<added id>``), ``_action`` (the latest
            action) and ``_edited`` (the fields edited) for the item page; False gives the verified view.

    Returns:
        SQL of a SELECT of ``base``'s columns plus ``verified_by`` and ``verified_at`` (the reviewer and time of
        the item's latest action; null: not reviewed). An added item has a null ``item_index`` and ``confidence``.
    """
    pivots, replaced, added = [], [], []
    for i, (name, kind) in enumerate(fields):
        where = f"field = {literal(name)} and action in ('edit', 'add')"
        pivots.append(f"arg_max_null(value_after, _order) filter (where {where}) as _v{i}, "
                      f"count(*) filter (where {where}) > 0 as _e{i}")
        replaced.append(f"case when s._e{i} then try_cast(s._v{i} as {kind}) else b.{quote(name)} end as {quote(name)}")
        added.append(f"try_cast(s._v{i} as {kind}) as {quote(name)}")
    extra = ", s._item, s._action, s._edited" if detail else ""
    keep = "" if detail else "and s._action <> 'delete'"
    model_keep = "true" if detail else "s._action is distinct from 'delete'"
    model_extra = ", 'm' || b.item_index::varchar as _item, s._action, s._edited" if detail else ""
    star = f"b.* replace ({', '.join(replaced)})" if replaced else "b.*"
    return f"""
with _corr as (
    select *, coalesce('m' || item::varchar, 'a' || added_item) as _item,
        row_number() over (order by created_at, submission_id, seq) as _order
    from {corrections} where table_name = {literal(table)} and action <> 'reviewed'
),
_state as (
    select result_key, run_id, _item, any_value(added_item) as _added_item,
        arg_max(action, _order) as _action, arg_max(reviewer, _order) as verified_by,
        arg_max(created_at, _order) as verified_at,
        list(distinct field order by field) filter (where action = 'edit') as _edited
        {''.join(', ' + p for p in pivots)}
    from _corr group by result_key, run_id, _item
)
select {star}, s.verified_by, s.verified_at{model_extra}
from {base} b
left join _state s on s.result_key = b.result_key and s.run_id = b.run_id and s._item = 'm' || b.item_index::varchar
where {model_keep}
union all by name
select a.run_id, a.result_key, a.document_id, a.page, a.patient_id, a.encounter_id, null::integer as item_index,
    null::double as confidence{''.join(', ' + a for a in added)}, s.verified_by, s.verified_at{extra}
from _state s join {answers} a on a.result_key = s.result_key and a.run_id = s.run_id
where s._added_item is not null {keep}
"""


def reviewed_answers_sql(current_slots: str, corrections: str = "corrections") -> str:
    """Per document, how many of its current answers (a page and prompt id each) a reviewer marked done.

    Args:
        current_slots: a relation of the current answers (``document_id``, ``page``, ``result_key``, ``run_id``).
        corrections: the corrections relation.

    Returns:
        SQL of a SELECT of ``document_id`` and ``reviewed``.
    """
    return f"""
select s.document_id, count(*) as reviewed
from {current_slots} s
join (select distinct result_key, run_id from {corrections} where action = 'reviewed') r
    on s.result_key = r.result_key and s.run_id = r.run_id
where s.page is not null
group by s.document_id
"""
