"""One page as the reviewer sees it: the answer (a completion row), and per extraction table its items with the
corrections applied (``corrections.verified_sql``), the model's own values beside them, and who did what.

Which tables a page has comes from its prompt (``prompt_tables``): ``clinical_extraction`` fills ``diagnoses``,
``medications`` and ``instructions`` (even when the output has no such table yet: a reviewer may add the first
medication of an output); any other prompt fills the table named after it, when the output has one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import duckdb
import pyarrow as pa

from medvlm_core.analytics.views import table_names_of
from medvlm_core.inputs.prompts import SCHEMAS
from medvlm_core.output.structured import tables_for
from medvlm_core.review.corrections import (
    CORRECTIONS_TABLE,
    NOT_FIELDS,
    empty_corrections,
    verified_sql,
)

# The field an item is known by (the gold file's matching key): the built-in tables', else name, text, the first.
KEY_FIELDS = {"diagnoses": "name", "medications": "name", "instructions": "text"}


@dataclass
class Item:
    """One item of a page's table as the reviewer sees it.

    Attributes:
        key: ``m<item_index>`` for the model's item, ``a<id>`` for an item a reviewer added.
        item: the model's ``item_index`` (None for an added item).
        added_item: the added item's id (None for a model item).
        values: the item's fields with the corrections applied.
        model: the model's values (None for an added item).
        confidence: the model's confidence in the item.
        action: the latest action on it (None: nobody acted on it yet).
        verified_by: who took that action.
        verified_at: when.
        edited: the fields a reviewer edited.
    """

    key: str
    item: int | None
    added_item: str | None
    values: dict[str, Any]
    model: dict[str, Any] | None
    confidence: float | None
    action: str | None
    verified_by: str | None
    verified_at: datetime | None
    edited: list[str] = field(default_factory=list)

    @property
    def deleted(self) -> bool:
        """Whether the item's latest action deleted it."""
        return self.action == "delete"


@dataclass
class TableItems:
    """A page's items of one extraction table.

    Attributes:
        name: the table.
        fields: its item fields and their DuckDB types, in column order.
        key: the field items are known by.
        items: the items, model items by index then added ones.
    """

    name: str
    fields: list[tuple[str, str]]
    key: str
    items: list[Item]

    def find(self, item: int | None = None, added_item: str | None = None) -> Item | None:
        """The item with this model index or added id.

        Args:
            item: a model item's index.
            added_item: an added item's id.

        Returns:
            The item, or None.
        """
        for candidate in self.items:
            if (item is not None and candidate.item == item) or (added_item is not None
                                                                 and candidate.added_item == added_item):
                return candidate
        return None


@dataclass
class Page:
    """One answer of one page, as the reviewer sees it (a completion row and its tables)."""

    result_key: str
    run_id: str
    document_id: str
    page: int | None
    page_count: int | None
    prompt_id: str | None
    status: str
    error_type: str | None
    image_uri: str | None
    reasoning: str | None
    tables: dict[str, TableItems] = field(default_factory=dict)
    reviewed: dict[str, tuple[str, datetime]] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        """Whether every table of the page was marked done."""
        return bool(self.tables) and all(t in self.reviewed for t in self.tables)


def key_field(table: str, fields: list[str]) -> str:
    """The field an item of ``table`` is known by (the eval's matching key).

    Args:
        table: the table.
        fields: its item fields.

    Returns:
        ``name`` or ``text`` for the built-in tables; else ``name``, ``text`` or the first field.
    """
    if table in KEY_FIELDS:
        return KEY_FIELDS[table]
    return "name" if "name" in fields else "text" if "text" in fields else (fields[0] if fields else "name")


def ensure_corrections(con: duckdb.DuckDBPyConnection) -> None:
    """Make ``corrections`` an empty relation when the output has none yet (the SQL reads it either way).

    Args:
        con: a connection with the output's views.
    """
    if CORRECTIONS_TABLE not in table_names_of(con):
        con.register(CORRECTIONS_TABLE, empty_corrections())


def prompt_tables(con: duckdb.DuckDBPyConnection, prompt_id: str | None) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """The extraction tables a prompt fills, each as the relation of its rows and its item fields.

    A built-in structured prompt (``clinical_extraction`` and its variants in the prompt library) fills tables named
    after its schema's arrays; their fields are the schema's item properties (columns a later stage derives, such as
    linked codes, are not the model's and are left out), typed as the table on disk has them (an output without such
    a table yet gets an empty relation, so that a reviewer may add its first item). Any other prompt fills the table
    named after it, when the output has one (a user extraction): its fields are that table's columns.

    Args:
        con: a connection with the output's views.
        prompt_id: the answer's prompt id.

    Returns:
        Table -> (relation name, [(field, DuckDB type)]); a free-text prompt has none.
    """
    present = table_names_of(con)
    out: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    schema = SCHEMAS.get(prompt_id or "")
    produced = tables_for(prompt_id, schema) if schema is not None and prompt_id else {}
    if produced and prompt_id not in produced:
        for name, (array, arrow) in produced.items():
            relation = name
            if name not in present:
                relation = f"_empty_{name}"
                con.register(relation, arrow.empty_table())
            types = dict(_columns(con, relation))
            names = list(((schema["properties"].get(array) or {}).get("items") or {}).get("properties") or {})
            out[name] = (relation, [(f, types[f]) for f in names if f in types and f not in NOT_FIELDS])
    elif prompt_id and prompt_id in present and {"item_index", "result_key"} <= {c for c, _ in _columns(con, prompt_id)}:
        out[prompt_id] = (prompt_id, _fields(con, prompt_id))
    return out


def _columns(con: duckdb.DuckDBPyConnection, relation: str) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in con.execute(f"select column_name, column_type from (describe {relation})").fetchall()]


def _fields(con: duckdb.DuckDBPyConnection, relation: str) -> list[tuple[str, str]]:
    return [(c, t) for c, t in _columns(con, relation) if c not in NOT_FIELDS]


ANSWER_COLUMNS = ("result_key, run_id, document_id, page, page_count, prompt_id, status, error_type, image_uri, "
                  "reasoning")


def answers_sql(where: str) -> str:
    """One row per answer (``result_key``, ``run_id``) of the completions history that ``where`` selects: the
    relation added items attach to.

    Args:
        where: a SQL condition on ``completions``.

    Returns:
        A parenthesised SELECT.
    """
    return (f"(select result_key, run_id, any_value(document_id) as document_id, any_value(page) as page, "
            f"any_value(patient_id) as patient_id, any_value(encounter_id) as encounter_id from completions "
            f"where {where} group by result_key, run_id)")


def answer(con: duckdb.DuckDBPyConnection, result_key: str, run_id: str | None = None) -> Page | None:
    """One answer (its completion row), without its items.

    Args:
        con: a connection with the output's views (history views suffice).
        result_key: the answer's key.
        run_id: its run (default: the latest row of the key).

    Returns:
        The page (``tables`` empty), or None when the output has no such answer.
    """
    row = con.execute(f"select {ANSWER_COLUMNS} from completions where result_key = $k and ($r is null or run_id = $r) "
                      "order by created_at desc, run_id desc limit 1", {"k": result_key, "r": run_id}).fetchone()
    return None if row is None else Page(*row)


def load_page(con: duckdb.DuckDBPyConnection, result_key: str, run_id: str | None = None) -> Page | None:
    """One answer and its items with the corrections applied.

    Args:
        con: a connection with the output's views (history views suffice).
        result_key: the answer's key.
        run_id: its run (default: the latest row of the key).

    Returns:
        The page, or None when the output has no such answer.
    """
    page = answer(con, result_key, run_id)
    if page is None:
        return None
    params = {"k": result_key, "r": page.run_id}
    ensure_corrections(con)
    where = "result_key = $k and run_id = $r"
    for table, (relation, fields) in prompt_tables(con, page.prompt_id).items():
        names = [f for f, _ in fields]
        model = {r["item_index"]: r for r in con.sql(
            f"select * from {relation} where {where} order by item_index", params=params).to_arrow_table().to_pylist()}
        sql = verified_sql(table, fields, f"(select * from {relation} where {where})", answers_sql(where),
                           CORRECTIONS_TABLE, detail=True)
        items = []
        for r in con.sql(f"select * from ({sql}) order by item_index nulls last, verified_at, _item",
                          params=params).to_arrow_table().to_pylist():
            index = r["item_index"]
            items.append(Item(
                key=r["_item"], item=index, added_item=None if index is not None else r["_item"][1:],
                values={f: r.get(f) for f in names},
                model=None if index is None else {f: model[index].get(f) for f in names},
                confidence=r.get("confidence"), action=r["_action"], verified_by=r["verified_by"],
                verified_at=r["verified_at"], edited=list(r["_edited"] or [])))
        page.tables[table] = TableItems(table, fields, key_field(table, names), items)
    for table, reviewer, at in con.execute(
            f"select table_name, arg_max(reviewer, created_at), max(created_at) from {CORRECTIONS_TABLE} "
            f"where {where} and action = 'reviewed' group by table_name", params).fetchall():
        page.reviewed[table] = (reviewer, at)
    return page


def register_keys(con: duckdb.DuckDBPyConnection, name: str, keys: list[tuple[str, str]]) -> None:
    """Register ``(result_key, run_id)`` pairs as a relation (to select answers by key in bulk).

    Args:
        con: the connection.
        name: the relation's name.
        keys: the pairs.
    """
    con.register(name, pa.table({"result_key": pa.array([k for k, _ in keys], pa.string()),
                                 "run_id": pa.array([r for _, r in keys], pa.string())}))
