"""A reviewer's submission (JSON from the item page or a script) turned into ``corrections`` rows.

A submission names one answer and a list of actions on its tables::

    {"result_key": "...", "run_id": "...", "actions": [
        {"table": "medications", "item": 0, "action": "accept"},
        {"table": "medications", "item": 1, "action": "edit", "values": {"dose": "500"}},
        {"table": "medications", "item": 2, "action": "delete"},
        {"table": "medications", "action": "add", "values": {"name": "Aspirin", "dose": "81", "unit": "mg"}},
        {"table": "medications", "added_item": "3f2a...", "action": "edit", "values": {"dose": "75"}},
        {"table": "medications", "action": "reviewed"}]}

``edit`` writes one row per field that changed, with the value before taken from the page as the server sees it
(the model's or an earlier correction's), never from the client. ``reviewed`` marks the page done for the table and
first accepts every item nobody acted on, so each kept item names who vouched for it. Errors name the action and the
rule, never a value.
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime
from typing import Any

from medvlm_core.review.pages import Item, Page, TableItems

MAX_ACTIONS = 500
MAX_VALUE_CHARS = 2000  # the gold file's limit
ACTIONS = ("accept", "edit", "delete", "add", "reviewed")
_TRUE = {"true", "yes", "1", "y", "t"}
_FALSE = {"false", "no", "0", "n", "f"}


class CorrectionError(ValueError):
    """A submission that cannot be recorded (the message names the action and the rule, never a value)."""


def as_text(value: Any) -> str | None:
    """A field's value as the text ``corrections`` stores (booleans ``true``/``false``; None stays None).

    Args:
        value: the value.

    Returns:
        The text.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _value(kind: str, raw: Any, where: str) -> str | None:
    """A submitted value checked against its column type and normalised to text (empty: cleared)."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if isinstance(raw, (dict, list)):
        raise CorrectionError(f"{where}: must be text, a number or true/false")
    text = as_text(raw).strip()
    if len(text) > MAX_VALUE_CHARS:
        raise CorrectionError(f"{where}: longer than {MAX_VALUE_CHARS} characters")
    upper = kind.upper()
    if upper == "BOOLEAN":
        if text.lower() in _TRUE:
            return "true"
        if text.lower() in _FALSE:
            return "false"
        raise CorrectionError(f"{where}: must be true or false")
    if upper in ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT"):
        try:
            return str(int(text))
        except ValueError:
            raise CorrectionError(f"{where}: must be a whole number") from None
    if upper in ("FLOAT", "DOUBLE", "REAL") or upper.startswith("DECIMAL"):
        try:
            number = float(text)
        except ValueError:
            raise CorrectionError(f"{where}: must be a number") from None
        if not math.isfinite(number):
            raise CorrectionError(f"{where}: must be a finite number")
        return text
    return text


def _values(action: dict[str, Any], table: TableItems, where: str) -> dict[str, str | None]:
    values = action.get("values")
    if not isinstance(values, dict) or not values:
        raise CorrectionError(f"{where}: needs values (field -> value)")
    kinds = dict(table.fields)
    out = {}
    for name, raw in values.items():
        if name not in kinds:
            raise CorrectionError(f"{where}: table {table.name} has no field {name!r}"[:200])
        out[name] = _value(kinds[name], raw, f"{where}, field {name}")
    return out


def _item(action: dict[str, Any], table: TableItems, where: str) -> Item:
    index, added = action.get("item"), action.get("added_item")
    if (index is None) == (added is None):
        raise CorrectionError(f"{where}: name the item (item: its index) or the added item (added_item: its id)")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
        raise CorrectionError(f"{where}: item must be an integer")
    if added is not None and not isinstance(added, str):
        raise CorrectionError(f"{where}: added_item must be a string")
    found = table.find(item=index, added_item=added)
    if found is None:
        raise CorrectionError(f"{where}: no such item on this page")
    return found


def submission_rows(body: Any, page: Page, reviewer: str, now: datetime, submission_id: str) -> list[dict[str, Any]]:
    """The ``corrections`` rows of one submission for one page.

    Args:
        body: the submission (parsed JSON; see the module docstring).
        page: the page as it stands (``pages.load_page``).
        reviewer: who submits.
        now: the submission's time.
        submission_id: its id (also its file's).

    Returns:
        The rows, in order (``seq``); empty when nothing changed.

    Raises:
        CorrectionError: the submission is malformed or names what the page does not have.
    """
    if not isinstance(body, dict):
        raise CorrectionError("the submission must be a JSON object")
    actions = body.get("actions")
    if not isinstance(actions, list) or not 1 <= len(actions) <= MAX_ACTIONS:
        raise CorrectionError(f"actions must be a list of 1 to {MAX_ACTIONS} actions")
    if page.page is None:
        raise CorrectionError("this answer has no page (the document could not be opened): nothing to correct")
    base = dict(submission_id=submission_id, created_at=now, reviewer=reviewer, run_id=page.run_id,
                result_key=page.result_key, document_id=page.document_id, page=page.page, prompt_id=page.prompt_id)
    rows: list[dict[str, Any]] = []

    def row(table: str, action: str, item: Item | None = None, added: str | None = None, **more: Any) -> None:
        rows.append(dict(base, table_name=table, action=action, item=None if item is None else item.item,
                         added_item=added if item is None else item.added_item, **more))

    for number, action in enumerate(actions, 1):
        where = f"action {number}"
        if not isinstance(action, dict):
            raise CorrectionError(f"{where}: must be an object")
        kind, name = action.get("action"), action.get("table")
        if kind not in ACTIONS:
            raise CorrectionError(f"{where}: action must be one of {', '.join(ACTIONS)}")
        if not isinstance(name, str) or name not in page.tables:
            raise CorrectionError(f"{where}: table must be one of this page's tables ({', '.join(page.tables)})")
        table = page.tables[name]
        if kind == "reviewed":
            acted = {(r["table_name"], r["item"], r["added_item"]) for r in rows}
            for item in table.items:
                if item.action is None and (name, item.item, item.added_item) not in acted:
                    row(name, "accept", item)
            row(name, "reviewed")
        elif kind == "add":
            values = {f: v for f, v in _values(action, table, where).items() if v is not None}
            if not values:
                raise CorrectionError(f"{where}: an added item needs at least one value")
            added = uuid.uuid4().hex[:16]
            for f, v in values.items():
                row(name, "add", added=added, field=f, value_after=v)
        else:
            item = _item(action, table, where)
            if kind != "edit":
                row(name, kind, item)
                continue
            changed = [(f, as_text(item.values.get(f)), v) for f, v in _values(action, table, where).items()
                       if v != as_text(item.values.get(f))]
            for f, before, after in changed:
                row(name, "edit", item, field=f, value_before=before, value_after=after)
            if not changed:  # saved as it stands: the reviewer vouches for it
                row(name, "accept", item)
    for seq, r in enumerate(rows):
        r["seq"] = seq
    return rows


def changed_items(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a submission did, per item, for the page to show without reloading.

    Args:
        rows: the submission's rows.

    Returns:
        ``[{"table", "key", "action"}]``: the latest action per item (``key`` as ``pages.Item.key``) and
        ``{"table", "action": "reviewed"}`` per table marked done.
    """
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        key = "" if r["action"] == "reviewed" else (f"m{r['item']}" if r["item"] is not None else f"a{r['added_item']}")
        entry = out.setdefault((r["table_name"], key), {"table": r["table_name"], "key": key or None, "fields": {}})
        entry["action"] = r["action"]
        if r.get("field"):
            entry["fields"][r["field"]] = r.get("value_after")
    return list(out.values())
