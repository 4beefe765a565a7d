"""The manifest's single definition (``ManifestModel``) and its row-level quarantine.

The manifest is validated lazily with pandera's polars backend, which reports the row index of every failure,
so that every problem is found in one pass and each bad row is quarantined with a reason a person can act on,
while the valid rows proceed. ``inputs/manifest.py`` reads the manifest in batches and calls these.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import pandera.polars as pa
import polars as pl
from pandera.api.polars.types import PolarsData
from pandera.errors import SchemaError, SchemaErrors

from medvlm_core.errors import RunError
from medvlm_core.inputs.prompts import known_prompt_ids
from medvlm_core.validation import passes

MAX_ID_CHARS = 256
MAX_URI_CHARS = 4096
MAX_PROMPT_CHARS = 8000
ROW = "__row_number"
ALLOWED_SCHEMES = ("s3://", "s3a://", "file://")


class ManifestModel(pa.DataFrameModel):
    """One manifest row per document (or selected page). All columns arrive as strings."""

    document_id: str = pa.Field(nullable=False, str_length={"min_value": 1, "max_value": MAX_ID_CHARS})
    image_uri: str = pa.Field(nullable=False, str_length={"min_value": 1, "max_value": MAX_URI_CHARS})
    page: Optional[str] = pa.Field(nullable=True, str_matches=r"^\s*[1-9][0-9]{0,5}(\.0+)?\s*$")
    prompt_id: Optional[str] = pa.Field(nullable=True, str_length={"max_value": MAX_ID_CHARS})
    prompt: Optional[str] = pa.Field(nullable=True, str_length={"max_value": MAX_PROMPT_CHARS})
    patient_id: Optional[str] = pa.Field(nullable=True, str_length={"max_value": MAX_ID_CHARS})
    encounter_id: Optional[str] = pa.Field(nullable=True, str_length={"max_value": MAX_ID_CHARS})
    sha256: Optional[str] = pa.Field(nullable=True, str_matches=r"^\s*[0-9a-fA-F]{64}\s*$")

    @pa.check("document_id", name="not_blank")
    def _document_id_not_blank(cls, data: PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col(data.key).str.strip_chars().str.len_chars() > 0)

    @pa.check("image_uri", name="uri_form")
    def _image_uri_form(cls, data: PolarsData) -> pl.LazyFrame:
        uri = pl.col(data.key).str.strip_chars()
        scheme_ok = ~uri.str.contains("://", literal=True) | pl.any_horizontal(
            [uri.str.to_lowercase().str.starts_with(s) for s in ALLOWED_SCHEMES]
        )
        no_control = ~uri.str.contains(r"[\x00-\x1f]")
        return data.lazyframe.select(scheme_ok & no_control & (uri.str.len_chars() > 0))

    @pa.check("prompt_id", name="known_prompt_id")
    def _known_prompt_id(cls, data: PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col(data.key).str.strip_chars().is_in(known_prompt_ids()))

    class Config:
        # A document page appears once per manifest: checked over the whole manifest by duplicate_problems(),
        # while these checks run a batch at a time.
        strict = False  # extra columns are allowed and ignored


# Readable reasons, keyed by (column, check name prefix). No values: reasons are printed, values are data.
_REASONS = {
    ("document_id", "not_nullable"): "document_id is missing",
    ("document_id", "str_length"): f"document_id must be 1 to {MAX_ID_CHARS} characters",
    ("document_id", "not_blank"): "document_id is blank",
    ("image_uri", "not_nullable"): "image_uri is missing",
    ("image_uri", "str_length"): f"image_uri must be 1 to {MAX_URI_CHARS} characters",
    ("image_uri", "uri_form"): "image_uri must be s3://..., file://..., an absolute path or a path relative to the manifest",
    ("page", "str_matches"): "page must be an integer >= 1",
    ("prompt_id", "known_prompt_id"): "prompt_id is not in the prompt library",
    ("prompt_id", "str_length"): f"prompt_id is longer than {MAX_ID_CHARS} characters",
    ("prompt", "str_length"): f"prompt is longer than {MAX_PROMPT_CHARS} characters",
    ("patient_id", "str_length"): f"patient_id is longer than {MAX_ID_CHARS} characters",
    ("encounter_id", "str_length"): f"encounter_id is longer than {MAX_ID_CHARS} characters",
    ("sha256", "str_matches"): "sha256 must be 64 hexadecimal characters",
}


@dataclass(frozen=True)
class RowProblem:
    """One failed check on one manifest row."""

    row_number: int
    column: str | None
    check: str
    value: str | None
    reason: str


def _reason(column: str | None, check: str) -> str:
    for (col, prefix), text in _REASONS.items():
        if col == column and check.startswith(prefix):
            return text
    return f"{column or 'row'} fails {check}"


def validate_manifest(batch: pl.DataFrame) -> list[RowProblem]:
    """The problems of a batch of manifest rows (strings, with their 1-based numbers in ``__row_number``; see
    ``manifest.plan_manifest``), every failed check of every row. Uniqueness is ``duplicate_problems``'.

    Args:
        batch: manifest rows.

    Returns:
        The problems, by row.

    Raises:
        RunError: a table-level failure (a problem pandera cannot pin to a row).
    """
    if passes(ManifestModel, batch):
        return []
    try:
        ManifestModel.validate(batch, lazy=True)
        return []
    except SchemaErrors as exc:
        failures = exc.failure_cases
    except SchemaError as exc:  # pragma: no cover - lazy mode reports through SchemaErrors
        raise RunError(f"manifest does not match its schema: {exc.reason_code}") from None
    numbers = batch[ROW]
    problems: list[RowProblem] = []
    for case in failures.iter_rows(named=True):
        if case["index"] is None:
            raise RunError(f"manifest does not match its schema ({case['check']} on {case['column']})")
        check = str(case["check"]).split("(", 1)[0]  # "str_matches('^...$')" -> "str_matches"
        problems.append(RowProblem(int(numbers[int(case["index"])]), case["column"], check, case["failure_case"],
                                   _reason(case["column"], check)))
    return problems


def duplicate_problems(frame: pl.DataFrame) -> list[RowProblem]:
    """Repeated (document_id, page) across a whole manifest: exact repeats after the first are refused;
    conflicting rows all are. Only the repeated rows are looked at one by one.

    Args:
        frame: the manifest (strings, with ``__row_number``).

    Returns:
        One problem per refused row.
    """
    problems = []
    content = [c for c in frame.columns if c != ROW]
    key = [pl.col("document_id").str.strip_chars().alias("__doc"), pl.col("page").str.strip_chars().alias("__page")]
    repeated = frame.filter(pl.struct(key).is_duplicated()).with_columns(key)
    for _, group in repeated.group_by(["__doc", "__page"], maintain_order=True):
        group = group.sort(ROW)
        numbers = group[ROW].to_list()
        identical = group.select(content).unique().height == 1
        doomed = numbers[1:] if identical else numbers
        for n in doomed:
            reason = (
                f"exact duplicate of row {numbers[0]} (same document_id and page)"
                if identical
                else f"document_id and page repeated in rows {', '.join(map(str, numbers))} with different content"
            )
            problems.append(RowProblem(n, "document_id", "unique_document_page", None, reason))
    return problems


def problems_by_row(problems: list[RowProblem], batch: pl.DataFrame) -> list[dict]:
    """One quarantine record per refused row: all its problems joined, the first one's column and check.

    Args:
        problems: the batch's problems, sorted by row.
        batch: the manifest rows they are about (strings, with ``__row_number``).

    Returns:
        The quarantine records (the row as given in ``row_json``).
    """
    grouped: dict[int, list[RowProblem]] = {}
    for p in problems:
        grouped.setdefault(p.row_number, []).append(p)
    refused = batch.filter(pl.col(ROW).is_in(list(grouped)))
    originals = {r[ROW]: r for r in refused.iter_rows(named=True)}
    records = []
    for number, items in sorted(grouped.items()):
        original = {k: v for k, v in originals[number].items() if k != ROW}
        first = items[0]
        records.append(
            {
                "row_number": number,
                "row_json": json.dumps(original, sort_keys=True, default=str),
                "column": first.column,
                "check": first.check,
                "failing_value": first.value,
                "reason": f"row {number}: " + "; ".join(dict.fromkeys(p.reason for p in items)),
            }
        )
    return records
