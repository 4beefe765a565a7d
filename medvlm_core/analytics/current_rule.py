"""Which row is current: the rule behind the ``*_current`` views and ``document_status``, as SQL.

The current rule (``current_slots_sql`` is its only implementation; docs/analytics.md shows it):

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
4. A *document-level* row at page scope (``page`` null: the file could not be fetched or opened, so its pages
   are not known) is its own slot per document and prompt id, superseded by any later page-scope row of that
   document and prompt id with a page. It never displaces page rows: a document whose file went missing after
   it was answered shows its ok pages and the current fetch error.
6. *Scope* is part of the slot: a document-scope answer (``scope = 'document'``: one answer from all the
   document's pages, ``page`` null) is the slot ``(document_id, prompt_id, 'document')``, apart from the
   document's page answers (rules 1 to 4 apply within it). Rows written before scopes existed are page rows.
5. Quarantine rows name their document through ``row_json``'s ``document_id``. Such a row is current while
   it belongs to the latest run that quarantined that document and no completion row of a later run exists
   for the document. A quarantine row without a document id is current while its run is the latest run of
   the same ``manifest_uri`` (the runs table).

Consequences: a page whose error was retried and fixed shows only its ok row; an error retried that fails
again shows once (the latest); ``--force`` re-runs make the new rows current; counts over the current views
count each page and prompt id once, however many runs touched it. Known limit: two runs of one manifest
started together may both write a key; the later row is then current even if it is a transient failure
(as a ``--force`` failure would be).
"""

from __future__ import annotations

# Tables written by every run; any other table holding document_id, result_key and run_id is structured.
CORE_TABLES = ("completions", "runs", "quarantine")
CURRENT_SUFFIX = "_current"
DOCUMENT_STATUS = "document_status"

_RULE_COLUMNS = ("document_id, prompt_id, scope, page, result_key, run_id, manifest_row, created_at, status, "
                 "error_type")
# Rows written before scopes existed are page rows.
_SCOPED = f"select * replace (coalesce(scope, 'page') as scope) from {{completions}}"


def current_slots_sql(completions: str = "completions") -> str:
    """The current rule (module docstring), the only place it is written: the current row of every slot.

    Plain subqueries, no materialized CTEs, so that DuckDB pushes a ``document_id = ...`` filter on the
    result into every scan of ``completions``.

    Args:
        completions: the relation holding the completions history (a view or CTE name).

    Returns:
        SQL of a SELECT giving, per slot (document_id, prompt_id, scope, page), its current row's document_id,
        prompt_id, scope, page, result_key, run_id, manifest_row, created_at, status and error_type.
    """
    scoped = _SCOPED.format(completions=completions)
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
                    over (partition by document_id, prompt_id, scope, page, result_key) as _key_ok_at
            from (select {_RULE_COLUMNS} from ({scoped}))
            qualify row_number() over (partition by document_id, prompt_id, scope, page, result_key
                                       order by created_at desc, run_id desc, manifest_row desc) = 1
        )
        window by_slot as (partition by document_id, prompt_id, scope, page
                           order by created_at desc, run_id desc, manifest_row desc
                           rows between unbounded preceding and unbounded following)
    )
    -- the slot's latest ok answer stands while its key's latest row is still that ok (no --force re-run
    -- of that key failed since); otherwise the slot's latest attempt is current
    where case when _answer_at = _last_ok_at then result_key = _answer_key else _rn = 1 end
) s
left join (
    -- at page scope, a document-level row (page null) gives way to any later row of its document and prompt
    -- id with a page; a document-scope answer is a slot of its own
    select document_id, prompt_id, max(created_at) filter (where page is not null) as _last_page_row_at
    from ({scoped}) where scope = 'page' group by document_id, prompt_id
) l using (document_id, prompt_id)
where s.scope = 'document' or s.page is not null or l._last_page_row_at is null
   or s.created_at > l._last_page_row_at
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
        ids), ok, error, truncated (current page-scope rows: one per page and prompt id; a document-level error
        counts one), document_answers and document_ok (current document-scope answers, per prompt id, and
        those that are ok), quarantined (current quarantine rows), error_types (of the current errors), latest_run_id and
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
        count(*) filter (where status = 'ok' and scope = 'page') as ok,
        count(*) filter (where status = 'error' and scope = 'page') as error,
        count(*) filter (where status = 'truncated' and scope = 'page') as truncated,
        list(distinct error_type order by error_type) filter (where status = 'error') as error_types,
        count(*) filter (where scope = 'document') as document_answers,
        count(*) filter (where scope = 'document' and status = 'ok') as document_ok
    from ({current_slots_sql(completions)}) group by document_id
),
documents as (select document_id from history union select document_id from quarantined)
select d.document_id,
    coalesce(c.pages, 0) as pages, coalesce(c.prompts, 0) as prompts,
    coalesce(c.ok, 0) as ok, coalesce(c.error, 0) as error, coalesce(c.truncated, 0) as truncated,
    coalesce(c.document_answers, 0) as document_answers, coalesce(c.document_ok, 0) as document_ok,
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
