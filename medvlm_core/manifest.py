"""Reading manifests (CSV, JSONL or Parquet, by extension) into typed work rows.

A manifest lists the documents of a run, one row per document (or per selected page):

========================  ==========================================================================
``document_id``           required; the caller's id of the document
``image_uri``             required; absolute URI, absolute path, or path relative to the manifest's folder
``page``                  optional; 1-based page to process (all pages when empty)
``prompt_id``             optional; a prompt of the library for this row
``prompt``                optional; free prompt text for this row (overrides ``prompt_id``'s text)
``patient_id``            optional; passed through to the results for joins
``encounter_id``          optional; passed through to the results for joins
``sha256``                optional; expected sha256 of the image file
========================  ==========================================================================

Table-level problems (unreadable file, unknown format, missing required column, no rows) raise
``RunError`` before any model is loaded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import polars as pl

from medvlm_core import storage as st
from medvlm_core.errors import DocumentError, RunError
from medvlm_core.storage import Storage

if TYPE_CHECKING:
    from medvlm_core.policy import LocationPolicy

REQUIRED_COLUMNS = ("document_id", "image_uri")
OPTIONAL_COLUMNS = ("page", "prompt_id", "prompt", "patient_id", "encounter_id", "sha256")
COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class ManifestRow:
    """One row of a manifest, typed, with its image URI resolved. ``row_number`` is 1-based."""

    row_number: int
    document_id: str
    image_uri: str
    page: int | None = None
    prompt_id: str | None = None
    prompt: str | None = None
    patient_id: str | None = None
    encounter_id: str | None = None
    sha256: str | None = None


def manifest_format(url: str) -> str:
    """``csv``, ``jsonl`` or ``parquet`` from the file extension; RunError otherwise."""
    lower = url.lower()
    for ext, fmt in FORMATS.items():
        if lower.endswith(ext):
            return fmt
    raise RunError(f"manifest {url}: unknown format; use one of {', '.join(sorted(FORMATS))}")


def read_manifest_frame(url: str, storage: Storage) -> pl.DataFrame:
    """The manifest as a DataFrame of strings (known columns only). RunError for table-level problems."""
    fmt = manifest_format(url)
    try:
        data = storage.read_bytes(url)
    except DocumentError as exc:
        # exc.message names the URL and the reason (not found, access denied, ...).
        raise RunError(f"manifest cannot be read: {exc.message}") from None
    try:
        if fmt == "csv":
            # All strings: ids like 00123 must not become integers.
            df = pl.read_csv(io.BytesIO(data), infer_schema=False)
        elif fmt == "jsonl":
            df = pl.read_ndjson(io.BytesIO(data), infer_schema_length=None)
        else:
            df = pl.read_parquet(io.BytesIO(data))
    except Exception as exc:  # polars raises many types for malformed input
        raise RunError(f"manifest {url}: not a readable {fmt} file ({type(exc).__name__})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise RunError(f"manifest {url}: missing required column(s) {', '.join(missing)}; found {', '.join(df.columns) or 'none'}")
    if df.height == 0:
        raise RunError(f"manifest {url}: has no rows")
    present = [c for c in COLUMNS if c in df.columns]
    df = df.select([pl.col(c).cast(pl.Utf8, strict=False) for c in present])
    for c in COLUMNS:
        if c not in df.columns:
            df = df.with_columns(pl.lit(None, dtype=pl.Utf8).alias(c))
    return df.select(COLUMNS)


def _clean(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def row_from_record(record: dict[str, Any], row_number: int, base_dir: str) -> ManifestRow:
    """A typed ManifestRow from one record of strings. ValueError names the column if a value is invalid."""
    document_id = _clean(record.get("document_id"))
    image_uri = _clean(record.get("image_uri"))
    if document_id is None:
        raise ValueError("document_id is empty")
    if image_uri is None:
        raise ValueError("image_uri is empty")
    page_text = _clean(record.get("page"))
    page = None
    if page_text is not None:
        try:
            page = int(float(page_text)) if float(page_text).is_integer() else None
        except ValueError:
            page = None
        if page is None or page < 1:
            raise ValueError("page must be an integer >= 1")
    return ManifestRow(
        row_number=row_number,
        document_id=document_id,
        image_uri=st.resolve(image_uri, base_dir),
        page=page,
        prompt_id=_clean(record.get("prompt_id")),
        prompt=record.get("prompt") if _clean(record.get("prompt")) else None,
        patient_id=_clean(record.get("patient_id")),
        encounter_id=_clean(record.get("encounter_id")),
        sha256=(_clean(record.get("sha256")) or "").lower() or None,
    )


@dataclass
class ManifestPlan:
    """A manifest split into the rows to process and the rows refused (quarantine records)."""

    rows: list[ManifestRow]
    quarantined: list[dict[str, Any]]
    total_rows: int


def read_manifest(url: str, storage: Storage, policy: "LocationPolicy | None" = None) -> ManifestPlan:
    """Read and validate a manifest (pandera, lazily: every problem at once).

    RunError for table-level problems; each bad row becomes a quarantine record with its reasons, among
    them an ``image_uri`` that resolves outside the ``policy``'s allowed locations.
    """
    from medvlm_core.validation import ROW, RowProblem, problems_by_row, validate_manifest

    url = st.normalize(url)
    if policy is not None:
        policy.require(url, "manifest")
    frame = read_manifest_frame(url, storage)
    valid, problems = validate_manifest(frame)
    base_dir = st.dirname(url)
    rows = []
    for record in valid.iter_rows(named=True):
        row = row_from_record(record, record[ROW], base_dir)
        if policy is not None and not policy.allows(row.image_uri):
            problems.append(RowProblem(row.row_number, "image_uri", "location_policy", record["image_uri"],
                                       "image_uri is outside the allowed locations of this deployment"))
            continue
        rows.append(row)
    problems.sort(key=lambda p: (p.row_number, p.column or ""))
    return ManifestPlan(rows=rows, quarantined=problems_by_row(problems, frame), total_rows=frame.height)
