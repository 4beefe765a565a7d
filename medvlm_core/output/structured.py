"""Structured extraction: JSON-schema constrained output, flattened into analytics tables.

A prompt may carry a JSON schema. Generation is then constrained by a llama.cpp grammar built from the
schema, so the output always parses (unless it was cut off at max_tokens: status ``truncated``, and no
rows reach the structured tables). Each top-level array of objects in the answer becomes rows of a table:
the built-in ``clinical_extraction`` (and ``clinical_extraction_coded``, its schema with codes, traits and
medication attributes) fills ``diagnoses``, ``medications`` and ``instructions``; a
user-defined extraction fills a table named after its prompt id. Every row carries the keys that join it
back to its page: run_id, result_key, document_id, page, patient_id, encounter_id, and its item_index.
"""

from __future__ import annotations

import copy
import json
import math
import re
from typing import Any

import pyarrow as pa

from medvlm_core.output.code_tables import LINKED_COLUMNS
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

# ``clinical_extraction_coded``: the clinical schema plus what analysts join on (docs/codes.md). A prompt of its
# own, because the schema is part of the prompt's hash and so of every result key: ``clinical_extraction`` stays
# byte for byte what it was, and its answers keep their keys. Per diagnosis the model may give an ICD-10-CM code
# (checked by the linking stage, medvlm_core/codes) and says Comprehend Medical's traits; per medication the
# strength, dosage form and duration.
_TRAIT = {"type": "boolean"}
CODED_DIAGNOSIS_FIELDS: dict[str, Any] = {
    "icd10cm_code": {"type": "string", "maxLength": 8},
    "negated": _TRAIT, "historical": _TRAIT, "family_history": _TRAIT, "hypothetical": _TRAIT,
}
CODED_MEDICATION_FIELDS: dict[str, Any] = {"strength": _SHORT, "form": _SHORT, "duration": _SHORT}


def coded_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The clinical schema with the coded fields (``CODED_DIAGNOSIS_FIELDS``, ``CODED_MEDICATION_FIELDS``).

    The traits and the medication attributes are required (a definite answer each); the code is not (the model
    gives one only when it knows it).

    Args:
        schema: the clinical schema (``CLINICAL_SCHEMA``).

    Returns:
        A new schema; ``schema`` is not changed.
    """
    out = copy.deepcopy(schema)
    for array, added in (("diagnoses", CODED_DIAGNOSIS_FIELDS), ("medications", CODED_MEDICATION_FIELDS)):
        items = out["properties"][array]["items"]
        items["properties"].update(copy.deepcopy(added))
        items["required"] = list(items["required"]) + [name for name in added if name != "icd10cm_code"]
    return out


CLINICAL_CODED_SCHEMA: dict[str, Any] = coded_schema(CLINICAL_SCHEMA)
# The prompts whose arrays fill the diagnoses, medications and instructions tables.
CLINICAL_PROMPT_IDS = ("clinical_extraction", "clinical_extraction_coded")

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
    if prompt_id in CLINICAL_PROMPT_IDS:
        return clinical_tables(arrays)
    if not _TABLE_NAME.match(prompt_id):
        raise ValueError(f"prompt id {prompt_id!r} cannot name a table (use lowercase letters, digits, _)")
    merged: dict[str, Any] = {}
    for items in arrays.values():
        merged.update(items.get("properties") or {})
    return {prompt_id: ("*", _arrow_schema({"properties": merged}, section=True))}


def clinical_tables(arrays: dict[str, dict[str, Any]]) -> dict[str, tuple[str, pa.Schema]]:
    """The clinical tables of either clinical prompt, each with one schema whichever prompt filled it.

    A table's columns: the keys, the fields of both clinical schemas (the coded prompt's extra fields are null in
    rows of ``clinical_extraction``), then the linked columns (``code_tables.LINKED_COLUMNS``), so that two prompts'
    rows share a staged file and every run's files have the same columns.

    Args:
        arrays: the answer's array property -> its item schema.

    Returns:
        Table name -> (array property, Arrow schema).
    """
    out = {}
    for name, items in arrays.items():
        linked = LINKED_COLUMNS.get(name, ())
        coded = CLINICAL_CODED_SCHEMA["properties"].get(name, {}).get("items", {}).get("properties", {})
        properties = {**coded, **(items.get("properties") or {})}
        fields = {k: v for k, v in properties.items() if k not in {c.name for c in linked}}
        schema = _arrow_schema({"properties": fields}, section=False)
        out[name] = (name, pa.schema(list(schema) + [pa.field(c.name, c.type) for c in linked]))
    return out


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
                        if isinstance(value, (dict, list)) and not pa.types.is_list(arrow.field(name).type):
                            value = json.dumps(value)
                        row[name] = value
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


# At document scope every item says which pages its evidence is on (``with_page_evidence``).
PAGE_EVIDENCE = {"type": "array", "items": {"type": "integer", "minimum": 1}, "maxItems": 64}


def with_page_evidence(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema whose items (the objects of its top-level arrays) also give ``pages``: where their evidence
    is in the document (document scope).

    Args:
        schema: an extraction's JSON schema.

    Returns:
        A copy with ``pages`` in every item's properties (not required: the model may give none).
    """
    out = copy.deepcopy(schema)
    for prop in (out.get("properties") or {}).values():
        items = prop.get("items") if prop.get("type") == "array" else None
        if isinstance(items, dict) and items.get("type") == "object":
            items.setdefault("properties", {})["pages"] = dict(PAGE_EVIDENCE)
    return out


def document_items(answer: dict[str, Any], pages: list[int],
                   confidence: dict[tuple[str, int], float] | None = None
                   ) -> tuple[dict[str, Any], dict[tuple[str, int], float]]:
    """A document-scope answer's items with their evidence pages checked and repeats merged.

    Each item's ``pages`` keeps the page numbers that are pages of the document, sorted, once each (None when
    none is left). Items that say the same thing apart from their pages (the same medication read on two pages)
    are kept once, with the union of their pages.

    Args:
        answer: the parsed answer (top-level arrays of item objects).
        pages: the document's pages that were answered.
        confidence: (array key, item position) -> confidence, as ``item_confidences`` gives for ``answer``.

    Returns:
        ``(answer, confidence)`` with the positions of the kept items.
    """
    allowed, confidence = set(pages), confidence or {}
    out: dict[str, Any] = dict(answer)
    kept_confidence: dict[tuple[str, int], float] = {}
    for key, items in answer.items():
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            continue
        kept: list[dict[str, Any]] = []
        seen: dict[str, int] = {}
        for position, item in enumerate(items):
            given = item.get("pages")
            valid = sorted({p for p in given if isinstance(p, int) and p in allowed}) if isinstance(given, list) else []
            content = json.dumps({k: v for k, v in item.items() if k != "pages"}, sort_keys=True)
            if content in seen:  # a repeat: one item, its evidence on every page it was read on
                first = kept[seen[content]]
                first["pages"] = sorted(set(first["pages"] or []) | set(valid)) or None
                continue
            seen[content] = len(kept)
            if (key, position) in confidence:
                kept_confidence[(key, len(kept))] = confidence[(key, position)]
            kept.append(dict(item, pages=valid or None))
        out[key] = kept
    return out, kept_confidence
