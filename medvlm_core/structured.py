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
import re
from typing import Any

import pyarrow as pa

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

KEY_FIELDS = [
    ("run_id", pa.string()),
    ("result_key", pa.string()),
    ("document_id", pa.string()),
    ("page", pa.int32()),
    ("patient_id", pa.string()),
    ("encounter_id", pa.string()),
    ("item_index", pa.int32()),
]

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


def flatten(prompt_id: str, schema: dict[str, Any], answer: dict[str, Any], keys: dict[str, Any]) -> dict[str, list[dict]]:
    """The rows each structured table gets from one parsed answer (keys added to every row)."""
    out: dict[str, list[dict]] = {}
    for table, (prop, arrow) in tables_for(prompt_id, schema).items():
        sources = [(prop, answer.get(prop) or [])] if prop != "*" else [
            (name, value) for name, value in answer.items() if isinstance(value, list)
        ]
        rows = out.setdefault(table, [])
        for section, items in sources:
            for item in items:
                if not isinstance(item, dict):
                    continue
                row = dict(keys, item_index=len(rows))
                if prop == "*":
                    row["section"] = section
                for name in arrow.names:
                    if name in item and name not in row:
                        value = item[name]
                        row[name] = json.dumps(value) if isinstance(value, (dict, list)) else value
                rows.append(row)
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
