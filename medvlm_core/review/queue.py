"""What a person should check, read from the output with DuckDB (the current answers only).

An entry is an extracted item or a whole page:

* ``low_confidence``: an item whose confidence is below the threshold of its prompt: the latest ``medvlm eval``'s
  threshold for that prompt when the output has one (its ``evals`` rows, ``section = 'review'``), else the
  server's ``--threshold``;
* ``no_confidence``: an item without a confidence;
* ``invalid:<fields>``: an item with an empty key field or a value none of the eval's rules accept (a dose
  without a number, an unknown unit, route or frequency, a boolean that is not one);
* ``no_answer:<status>``: a page whose current answer is an error or was cut off (structured prompts only; a
  document that could not be opened at all has no page to show);
* ``picked``: every current answer of a document a reviewer picked by id.

The order is most doubtful first: picked documents (someone asked for them), pages without an answer, then items
by confidence, lowest first (an invalid item or one without a confidence counts as 0). An entry is done when its
item has an action in ``corrections`` or its page was marked done for its table.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import duckdb

from medvlm_core.analytics import CURRENT_SUFFIX
from medvlm_core.analytics.views import table_names_of
from medvlm_core.evals.answers import System, document_types_from_manifests
from medvlm_core.evals.matching import kind_of
from medvlm_core.evals.scores import item_validity
from medvlm_core.output.tables import EVAL_TABLES, REVIEW_TABLES
from medvlm_core.review.corrections import CORRECTIONS_TABLE, NOT_FIELDS
from medvlm_core.review.pages import key_field, prompt_tables
from medvlm_core.storage import Storage

REASONS = ("picked", "no_answer", "invalid", "no_confidence", "low_confidence")
_DUCKDB_KINDS = {"BOOLEAN": "bool", "TINYINT": "int64", "SMALLINT": "int64", "INTEGER": "int64", "BIGINT": "int64",
                 "FLOAT": "double", "DOUBLE": "double"}


@dataclass
class Entry:
    """One thing to check.

    Attributes:
        kind: ``item`` or ``page``.
        result_key: the answer's key.
        run_id: its run.
        document_id: the document.
        page: the page.
        prompt_id: the answer's prompt id.
        table_name: the item's table (None for a page entry).
        item: the item's index (None for a page entry).
        confidence: the item's confidence.
        reason: why it is to be checked (``;``-separated when several).
        document_type: the document's type, from the runs' manifests (None if unknown).
        done: whether a reviewer has dealt with it.
        tables: the tables its answer's prompt fills.
    """

    kind: str
    result_key: str
    run_id: str
    document_id: str
    page: int | None
    prompt_id: str | None
    table_name: str | None
    item: int | None
    confidence: float | None
    reason: str
    document_type: str | None = None
    done: bool = False
    tables: tuple[str, ...] = ()

    @property
    def reasons(self) -> list[str]:
        """The reasons without their details (``invalid:dose`` -> ``invalid``)."""
        return [r.split(":", 1)[0] for r in self.reason.split(";")]

    def sort_key(self) -> tuple[Any, ...]:
        """Most doubtful first (module docstring), then by document, page, table and item."""
        rank = 0 if "picked" in self.reasons else 1 if self.kind == "page" else 2
        doubt = 0.0 if self.confidence is None or "invalid" in self.reasons else self.confidence
        return (rank, doubt, self.document_id, self.page or 0, self.prompt_id or "", self.table_name or "",
                -1 if self.item is None else self.item)


@dataclass
class Queue:
    """The entries, sorted, and the thresholds used.

    Attributes:
        entries: the entries, most doubtful first.
        thresholds: prompt id -> the confidence threshold applied.
        threshold_source: prompt id -> ``eval <eval_id>`` or ``--threshold``.
        fills: prompt id -> the tables its answers fill (none: a free-text prompt).
        document_types: document id -> its type, from the runs' manifests.
    """

    entries: list[Entry]
    thresholds: dict[str, float] = field(default_factory=dict)
    threshold_source: dict[str, str] = field(default_factory=dict)
    fills: dict[str, tuple[str, ...]] = field(default_factory=dict)
    document_types: dict[str, str] = field(default_factory=dict)

    def copy(self) -> "Queue":
        """A copy whose entries may be changed (``mark_done``, ``with_picked``) without changing this one."""
        return Queue([replace(e) for e in self.entries], self.thresholds, self.threshold_source, self.fills,
                     self.document_types)


def eval_thresholds(con: duckdb.DuckDBPyConnection) -> dict[str, tuple[float, str]]:
    """The review threshold of each prompt id in the latest evaluation that has one.

    Args:
        con: a connection with the output's views.

    Returns:
        Prompt id -> (threshold, eval id); empty when the output has no evaluation with a threshold.
    """
    if "evals" not in table_names_of(con):
        return {}
    rows = con.execute("""
        select prompt_id, arg_max(value, created_at), arg_max(eval_id, created_at) from evals
        where section = 'review' and metric = 'threshold' and value is not null and prompt_id is not null
        group by prompt_id""").fetchall()
    return {prompt: (float(value), eval_id) for prompt, value, eval_id in rows}


def structured_tables(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple[str, str]]]:
    """The output's extraction tables that have a current view, and their item fields.

    Args:
        con: a connection with the output's current views.

    Returns:
        Table -> [(field, DuckDB type)].
    """
    present = table_names_of(con)
    out = {}
    for name in sorted(present):
        if name.endswith(CURRENT_SUFFIX) or name in REVIEW_TABLES or name in EVAL_TABLES:
            continue
        if name + CURRENT_SUFFIX not in present:
            continue
        columns = con.execute(f"select column_name, column_type from (describe {name})").fetchall()
        if {"item_index", "result_key", "run_id"} <= {c for c, _ in columns}:
            out[name] = [(c, t) for c, t in columns if c not in NOT_FIELDS]
    return out


def build_queue(con: duckdb.DuckDBPyConnection, storage: Storage, threshold: float,
                picked: Iterable[str] = ()) -> Queue:
    """Every entry to check over the output's current answers (``done`` not set: see ``mark_done``).

    Args:
        con: a connection with the output's current views (``analytics.connect``).
        storage: reads the runs' manifests (document types).
        threshold: the confidence threshold where no evaluation gives one.
        picked: documents a reviewer picked by id.

    Returns:
        The queue, sorted.
    """
    from_eval = eval_thresholds(con)
    tables = structured_tables(con)
    answers = {}
    for key, run, prompt in con.execute("select result_key, run_id, prompt_id from completions_current "
                                        "where status = 'ok'").fetchall():
        answers[(key, run)] = prompt
    picked = set(picked)
    used: dict[str, float] = {}
    source: dict[str, str] = {}
    by_item: dict[tuple[str, str, str, int], Entry] = {}
    # the key field and field kinds of each prompt's items (its schema's, else the table's columns), known before
    # the items stream (a connection runs one query at a time)
    checks: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}
    for prompt in set(answers.values()):
        filled = prompt_tables(con, prompt)
        for table, own in tables.items():
            fields = filled[table][1] if table in filled else own
            checks[(prompt, table)] = (key_field(table, [f for f, _ in fields]), {
                f: kind_of(f, _DUCKDB_KINDS.get(t.upper(), "string")) for f, t in fields})

    for table in tables:
        reader = con.sql(f"select * from {table}{CURRENT_SUFFIX}").to_arrow_reader(50_000)
        for batch in reader:
            for item in batch.to_pylist():
                prompt = answers.get((item["result_key"], item["run_id"]))
                if prompt is None:  # its answer is not an ok current one
                    continue
                key, kinds = checks[(prompt, table)]
                if prompt not in used:
                    found = from_eval.get(prompt)
                    used[prompt] = found[0] if found else threshold
                    source[prompt] = f"eval {found[1]}" if found else "--threshold"
                reasons = []
                confidence = item.get("confidence")
                if confidence is None:
                    reasons.append("no_confidence")
                elif confidence < used[prompt]:
                    reasons.append("low_confidence")
                bad = item_validity(item, key, kinds)
                if bad:
                    reasons.append("invalid:" + ",".join(bad))
                if reasons:
                    by_item[(item["result_key"], item["run_id"], table, item["item_index"])] = Entry(
                        "item", item["result_key"], item["run_id"], item["document_id"], item["page"], prompt, table,
                        item["item_index"], confidence, ";".join(reasons))
    fills = {p: tuple(prompt_tables(con, p)) for (p,) in con.execute(
        "select distinct prompt_id from completions_current where prompt_id is not null").fetchall()}
    types = document_types_from_manifests(con, storage, [System("current", None, None, "structured", [])])
    queue = Queue(list(by_item.values()), used, source, fills, types)
    return with_picked(con, queue, picked, no_answer=True)


def with_picked(con: duckdb.DuckDBPyConnection, queue: Queue, picked: Iterable[str], no_answer: bool = False) -> Queue:
    """``queue`` with the pages of picked documents (one small query: a reviewer's picks do not rebuild the queue).

    Args:
        con: a connection with the output's current views.
        queue: the queue (changed in place: pass a copy of a shared one).
        picked: documents a reviewer picked by id.
        no_answer: also add the pages without an answer (``build_queue`` does).

    Returns:
        ``queue``, its entries sorted.
    """
    picked = sorted(set(picked))
    prompts = sorted(p for p, t in queue.fills.items() if t)
    if picked or no_answer:
        pages = {(e.result_key, e.run_id): e for e in queue.entries if e.kind == "page"}
        for key, run, document, page, prompt, status in con.execute(
                "select result_key, run_id, document_id, page, prompt_id, status from completions_current "
                "where page is not null and list_contains($prompts, prompt_id) "
                f"and ({'status <> $ok or ' if no_answer else ''}list_contains($docs, document_id))",
                {"prompts": prompts, "docs": picked, **({"ok": "ok"} if no_answer else {})}).fetchall():
            reasons = (["picked"] if document in picked else []) + (
                [f"no_answer:{status}"] if status != "ok" and no_answer else [])
            entry = pages.get((key, run))
            if entry is None:
                entry = pages[(key, run)] = Entry("page", key, run, document, page, prompt, None, None, None, "",
                                                  queue.document_types.get(document), tables=queue.fills.get(prompt, ()))
                queue.entries.append(entry)
            known = [r for r in entry.reason.split(";") if r]
            entry.reason = ";".join(known + [r for r in reasons if r not in known])
    for entry in queue.entries:
        entry.tables = queue.fills.get(entry.prompt_id or "", ())
        entry.document_type = queue.document_types.get(entry.document_id)
    queue.entries.sort(key=Entry.sort_key)
    return queue


def mark_done(con: duckdb.DuckDBPyConnection, entries: list[Entry]) -> None:
    """Set ``done`` on each entry from the output's corrections.

    Args:
        con: a connection with the output's views.
        entries: the entries (changed in place).
    """
    if CORRECTIONS_TABLE not in table_names_of(con):
        for entry in entries:
            entry.done = False
        return
    acted, reviewed, any_reviewed = set(), set(), set()
    for key, run, table, item, action in con.execute(
            f"select distinct result_key, run_id, table_name, item, action from {CORRECTIONS_TABLE} "
            "where action in ('accept', 'edit', 'delete', 'reviewed')").fetchall():
        if action == "reviewed":
            reviewed.add((key, run, table))
            any_reviewed.add((key, run))
        elif item is not None:
            acted.add((key, run, table, item))
    for entry in entries:
        if entry.kind == "item":
            entry.done = ((entry.result_key, entry.run_id, entry.table_name, entry.item) in acted
                          or (entry.result_key, entry.run_id, entry.table_name) in reviewed)
        else:
            entry.done = (entry.result_key, entry.run_id) in any_reviewed


def select(entries: list[Entry], table: str | None = None, document_type: str | None = None,
           reason: str | None = None, state: str | None = None) -> list[Entry]:
    """The entries that pass the queue page's filters.

    Args:
        entries: the entries.
        table: only this table's items (and pages whose prompt fills it).
        document_type: only documents of this type.
        reason: only entries with this reason (``low_confidence``, ``invalid``, ``no_answer``, ...).
        state: ``left`` or ``done`` (None: both).

    Returns:
        The entries, in order.
    """
    out = []
    for entry in entries:
        if table and entry.table_name != table and not (entry.kind == "page" and table in entry.tables):
            continue
        if document_type and entry.document_type != document_type:
            continue
        if reason and reason not in entry.reasons:
            continue
        if state == "left" and entry.done or state == "done" and not entry.done:
            continue
        out.append(entry)
    return out


def counts(entries: list[Entry]) -> dict[str, int]:
    """How many entries are done and left.

    Args:
        entries: the entries.

    Returns:
        ``{"done": n, "left": m, "total": n + m}``.
    """
    done = sum(1 for e in entries if e.done)
    return {"done": done, "left": len(entries) - done, "total": len(entries)}


def next_page(entries: list[Entry], after: tuple[str, str] | None) -> Entry | None:
    """The next entry left to do on another page than ``after``, wrapping around.

    Args:
        entries: the (filtered) entries, in order.
        after: the current page's ``(result_key, run_id)``, or None to start at the top.

    Returns:
        The entry, or None when nothing is left.
    """
    start = 0
    if after is not None:
        positions = [i for i, e in enumerate(entries) if (e.result_key, e.run_id) == after]
        start = positions[-1] + 1 if positions else 0
    for entry in entries[start:] + entries[:start]:
        if not entry.done and (entry.result_key, entry.run_id) != after:
            return entry
    return None
