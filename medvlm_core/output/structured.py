"""Structured extraction: JSON-schema constrained output, flattened into analytics tables.

A prompt may carry a JSON schema. Generation is then constrained by a llama.cpp grammar built from the
schema, so the output always parses (unless it was cut off at max_tokens: status ``truncated``, and no
rows reach the structured tables). Each top-level array of objects in the answer becomes rows of a table:
the built-in ``clinical_extraction`` fills ``diagnoses``, ``medications`` and ``instructions``; a
user-defined extraction fills a table named after its prompt id. Every row carries the keys that join it
back to its page: run_id, result_key, document_id, page, patient_id, encounter_id, and its item_index.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pyarrow as pa

from medvlm_core.output.tables import STRUCTURED_KEYS

# Bounded strings and arrays keep a constrained answer finite even when a model rambles.
_TEXT = {"type": "string", "maxLength": 300}
_SHORT = {"type": "string", "maxLength": 60}

CLINICAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "diagnoses": {
            "type": "array",
            "maxItems": 20,
            "items": {
                "type": "object",
                "properties": {"name": _SHORT, "evidence": _TEXT},
                "required": ["name", "evidence"],
            },
        },
        "medications": {
            "type": "array",
            "maxItems": 40,
            "items": {
                "type": "object",
                "properties": {
                    "name": _SHORT,
                    "dose": _SHORT,
                    "unit": _SHORT,
                    "route": _SHORT,
                    "frequency": _SHORT,
                    "reasoning": _TEXT,
                    "conditional": {"type": "boolean"},
                    "condition": _TEXT,
                },
                "required": ["name", "dose", "unit", "route", "frequency", "reasoning", "conditional", "condition"],
            },
        },
        "instructions": {
            "type": "array",
            "maxItems": 20,
            "items": {
                "type": "object",
                "properties": {
                    "text": _TEXT,
                    "conditional": {"type": "boolean"},
                    "condition": _TEXT,
                    "follow_up_interval": _SHORT,
                },
                "required": ["text", "conditional", "condition", "follow_up_interval"],
            },
        },
    },
    "required": ["diagnoses", "medications", "instructions"],
}

# The leading columns of every extraction table, from their one definition (``output/tables.py``).
KEY_FIELDS = [(c.name, c.type) for c in STRUCTURED_KEYS]

_ARROW_TYPES = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}
_TABLE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def tables_for(prompt_id: str, schema: dict[str, Any]) -> dict[str, tuple[str, pa.Schema]]:
    """Table name -> (the answer's array property, Arrow schema) for a schema's top-level arrays of objects.

    The built-in clinical schema names its tables after its arrays; any other extraction writes every
    array into one table named after its prompt id (with a ``section`` column naming the array).
    """
    arrays = {
        name: prop["items"]
        for name, prop in (schema.get("properties") or {}).items()
        if prop.get("type") == "array" and isinstance(prop.get("items"), dict) and prop["items"].get("type") == "object"
    }
    if prompt_id == "clinical_extraction":
        return {name: (name, _arrow_schema(items, section=False)) for name, items in arrays.items()}
    if not _TABLE_NAME.match(prompt_id):
        raise ValueError(f"prompt id {prompt_id!r} cannot name a table (use lowercase letters, digits, _)")
    merged: dict[str, Any] = {}
    for items in arrays.values():
        merged.update(items.get("properties") or {})
    return {prompt_id: ("*", _arrow_schema({"properties": merged}, section=True))}


def _arrow_schema(items: dict[str, Any], section: bool) -> pa.Schema:
    fields = list(KEY_FIELDS) + ([("section", pa.string())] if section else [])
    taken = {name for name, _ in fields}
    for name, prop in (items.get("properties") or {}).items():
        if name not in taken:
            # Nested objects and arrays are kept as JSON text: one row per item stays one row.
            fields.append((name, _ARROW_TYPES.get(prop.get("type"), pa.string())))
    return pa.schema(fields)


def flatten(prompt_id: str, schema: dict[str, Any], answer: dict[str, Any], keys: dict[str, Any],
            confidence: dict[tuple[str, int], float] | None = None) -> dict[str, list[dict]]:
    """The rows each structured table gets from one parsed answer.

    Args:
        prompt_id: the extraction's prompt id.
        schema: its JSON schema.
        answer: the parsed answer.
        keys: columns every row gets (run, result key, document, page, patient, encounter).
        confidence: (answer key, item position) -> the item's confidence (``item_confidences``).

    Returns:
        Table name -> rows.
    """
    out: dict[str, list[dict]] = {}
    confidence = confidence or {}
    for table, (prop, arrow) in tables_for(prompt_id, schema).items():
        sources = [(prop, answer.get(prop) or [])] if prop != "*" else [
            (name, value) for name, value in answer.items() if isinstance(value, list)
        ]
        rows = out.setdefault(table, [])
        for section, items in sources:
            for position, item in enumerate(items):
                if not isinstance(item, dict):
                    continue
                row = dict(keys, item_index=len(rows), confidence=confidence.get((section, position)))
                if prop == "*":
                    row["section"] = section
                for name in arrow.names:
                    if name in item and name not in row:
                        value = item[name]
                        row[name] = json.dumps(value) if isinstance(value, (dict, list)) else value
                rows.append(row)
    return out


def value_spans(text: str) -> dict[tuple[str, int], list[tuple[int, int]]]:
    """Where the values of each item of the answer's top-level arrays are, in the answer's text.

    Args:
        text: a JSON object whose arrays hold the items (the structured answer).

    Returns:
        (array key, item position) -> the character spans of that item's values (keys and punctuation left out).

    Raises:
        ValueError: ``text`` is not such a JSON object.
    """
    decoder = json.JSONDecoder()
    spans: dict[tuple[str, int], list[tuple[int, int]]] = {}

    def skip(i: int, *allowed: str) -> int:
        while i < len(text) and (text[i].isspace() or text[i] in allowed):
            i += 1
        return i

    def members(i: int, on_value: Any) -> int:
        """Walk the object at ``i`` (which is '{'), calling on_value(key, start); the index after it."""
        i = skip(i + 1)
        while text[i] != "}":
            key, i = decoder.raw_decode(text, i)
            i = skip(i, ":")
            i = on_value(key, i)
            i = skip(i, ",")
        return i + 1

    def item_values(at: list[tuple[int, int]]) -> Any:
        def on_value(_: str, i: int) -> int:
            _, end = decoder.raw_decode(text, i)
            at.append((i, end))
            return end
        return on_value

    def top_value(key: str, i: int) -> int:
        if text[i] != "[":
            return decoder.raw_decode(text, i)[1]
        i, position = skip(i + 1), 0
        while text[i] != "]":
            if text[i] == "{":
                i = members(i, item_values(spans.setdefault((key, position), [])))
            else:
                i = decoder.raw_decode(text, i)[1]
            position += 1
            i = skip(i, ",")
        return i + 1

    start = skip(0)
    if start >= len(text) or text[start] != "{":
        raise ValueError("not a JSON object")
    try:
        members(start, top_value)
    except (IndexError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a JSON object ({type(exc).__name__})") from None
    return spans


def item_confidences(text: str, logprobs: tuple[float, ...], offsets: tuple[int, ...]) -> dict[tuple[str, int], float]:
    """Each item's confidence: exp of the mean log-probability of the tokens that make its values.

    Args:
        text: the structured answer.
        logprobs: the answer tokens' log-probabilities.
        offsets: each token's byte offset in ``text`` (UTF-8).

    Returns:
        (array key, item position) -> confidence in (0, 1]; items whose values no token covers are left out.
    """
    if not logprobs:
        return {}
    data = text.encode("utf-8")
    ends = list(offsets[1:]) + [len(data)]
    out = {}
    for item, char_spans in value_spans(text).items():
        byte_spans = [(len(text[:a].encode("utf-8")), len(text[:b].encode("utf-8"))) for a, b in char_spans]
        chosen = [lp for lp, start, end in zip(logprobs, offsets, ends)
                  if any(start < b and end > a for a, b in byte_spans)]
        if chosen:
            out[item] = math.exp(sum(chosen) / len(chosen))
    return out


def load_extraction(text: str, source: str) -> tuple[str, str, dict[str, Any]]:
    """(prompt_id, prompt text, schema) from a user extraction definition (JSON).

    The definition: ``{"prompt_id": "vitals", "prompt": "Extract ...", "schema": {...JSON schema...}}``.
    ValueError naming ``source`` if it is not usable.
    """
    try:
        spec = json.loads(text)
    except ValueError:
        raise ValueError(f"{source}: not valid JSON") from None
    missing = [k for k in ("prompt_id", "prompt", "schema") if k not in spec]
    if missing:
        raise ValueError(f"{source}: missing {', '.join(missing)}")
    if not isinstance(spec["schema"], dict) or spec["schema"].get("type") != "object":
        raise ValueError(f"{source}: schema must be a JSON schema of type object")
    tables_for(spec["prompt_id"], spec["schema"])  # validates the table name
    return spec["prompt_id"], spec["prompt"], spec["schema"]
