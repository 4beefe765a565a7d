"""Reading manifests (CSV, JSONL or Parquet, by extension) into typed work rows, in bounded batches.

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
``RunError`` before any model is loaded. ``plan_manifest`` validates the rows ``BATCH_ROWS`` at a time and
hands each batch of valid rows, typed and resolved (``PLAN_SCHEMA``), to a sink: a fan-out writes them
straight into its shards' plan files (``medvlm_core.run.shards``), so no step holds a million ``ManifestRow`` objects;
``read_manifest`` collects them for a batch run.
"""

from __future__ import annotations

import io
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import polars as pl
import pyarrow as pa

from medvlm_core import storage as st
from medvlm_core.errors import DocumentError, RunError
from medvlm_core.storage import Storage

if TYPE_CHECKING:
    from medvlm_core.storage.locations import LocationPolicy

REQUIRED_COLUMNS = ("document_id", "image_uri")
OPTIONAL_COLUMNS = ("page", "prompt_id", "prompt", "patient_id", "encounter_id", "sha256")
COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
# Rows validated at a time: pandera's and the quarantine's working memory is bounded by this, not by the manifest.
BATCH_ROWS = 100_000

# A valid row, typed and resolved: what a shard's plan file holds and what ``ManifestRow`` carries.
PLAN_SCHEMA = pa.schema(
    [
        ("row_number", pa.int64()),
        ("document_id", pa.string()),
        ("image_uri", pa.string()),
        ("page", pa.int32()),
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("patient_id", pa.string()),
        ("encounter_id", pa.string()),
        ("sha256", pa.string()),
    ]
)


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


@dataclass
class ManifestPlan:
    """A manifest split into the rows to process and the rows refused (quarantine records).

    ``row_numbers`` always lists the valid rows (8 bytes each); ``rows`` holds them as ``ManifestRow`` unless
    they went to a sink (``plan_manifest``), e.g. straight into a fan-out's shard plans.
    """

    quarantined: list[dict[str, Any]]
    total_rows: int
    row_numbers: array = field(default_factory=lambda: array("q"))
    rows: list[ManifestRow] = field(default_factory=list)

    @property
    def valid_rows(self) -> int:
        """How many rows are to be processed."""
        return len(self.row_numbers)


def manifest_format(url: str, what: str = "manifest") -> str:
    """``csv``, ``jsonl`` or ``parquet`` from the file extension; RunError otherwise.

    Args:
        url: the table file.
        what: how the error names the file (``manifest``, ``gold file``).

    Returns:
        The format.
    """
    lower = url.lower()
    for ext, fmt in FORMATS.items():
        if lower.endswith(ext):
            return fmt
    raise RunError(f"{what} {url}: unknown format; use one of {', '.join(sorted(FORMATS))}")


def parse_table(data: bytes, fmt: str, url: str, what: str = "manifest") -> pl.DataFrame:
    """A table file's bytes as a DataFrame (CSV columns all strings: ids like 00123 must not become integers).

    Args:
        data: the file's bytes.
        fmt: ``manifest_format``'s answer.
        url: the file (named in the error).
        what: how the error names the file.

    Returns:
        The frame.

    Raises:
        RunError: the bytes are not a readable file of that format.
    """
    try:
        if fmt == "csv":
            return pl.read_csv(io.BytesIO(data), infer_schema=False)
        if fmt == "jsonl":
            return pl.read_ndjson(io.BytesIO(data), infer_schema_length=None)
        return pl.read_parquet(io.BytesIO(data))
    except Exception as exc:  # polars raises many types for malformed input
        if fmt != "parquet":
            _refuse_if_not_utf8(data, url, what)
        raise RunError(f"{what} {url}: not a readable {fmt} file ({type(exc).__name__})") from None


def _refuse_if_not_utf8(data: bytes, url: str, what: str) -> None:
    """A text file that is not UTF-8 (a CSV saved by Excel on Windows is cp1252): say where and how to fix it.

    Called only once parsing has failed, so a valid file pays nothing. The message names the line, never the
    bytes (a document id may be patient data).
    """
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RunError(
            f"{what} {url}: not UTF-8 text (line {line} has a byte UTF-8 does not allow, as in a file saved as "
            f"cp1252/Windows-1252 or Latin-1); save it as UTF-8 (Excel: Save As > 'CSV UTF-8'), or convert it: "
            f"iconv -f cp1252 -t utf-8 IN.csv > OUT.csv"
        ) from None


def read_manifest_frame(url: str, storage: Storage) -> pl.DataFrame:
    """The manifest as a DataFrame of strings (known columns only). RunError for table-level problems."""
    fmt = manifest_format(url)
    try:
        data = storage.read_bytes(url)
    except DocumentError as exc:
        # exc.message names the URL and the reason (not found, access denied, ...).
        raise RunError(f"manifest cannot be read: {exc.message}") from None
    df = parse_table(data, fmt, url)
    del data
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


def plan_manifest(
    url: str,
    storage: Storage,
    policy: "LocationPolicy | None" = None,
    sink: Callable[[pl.DataFrame], None] | None = None,
    batch_rows: int = BATCH_ROWS,
    base_dir: str | None = None,
) -> ManifestPlan:
    """Read and validate a manifest (pandera, lazily: every problem of a row at once), a batch at a time.

    Args:
        url: the manifest's URI.
        storage: where it is.
        policy: the deployment's allowed locations; an ``image_uri`` outside them is quarantined.
        sink: receives each batch of valid rows (``PLAN_SCHEMA`` columns, in manifest order); None collects
            them as ``ManifestRow`` in the plan's ``rows``.
        batch_rows: rows validated at a time.
        base_dir: what relative ``image_uri``s are relative to (default: the manifest's folder).

    Returns:
        The plan: the valid rows' numbers (and rows without a sink), one quarantine record per refused row
        with all its reasons, and the manifest's row count.

    Raises:
        RunError: table-level problems (unreadable, unknown format, missing required column, no rows, a
            manifest outside the policy).
    """
    from medvlm_core.inputs.manifest_checks import ROW, duplicate_problems, problems_by_row, validate_manifest

    url = st.normalize(url)
    if policy is not None:
        policy.require(url, "manifest")
    frame = read_manifest_frame(url, storage).with_row_index(ROW, offset=1).with_columns(pl.col(ROW).cast(pl.Int64))
    duplicates = duplicate_problems(frame)  # (document_id, page) must be unique across the whole manifest
    base_dir = st.normalize(base_dir) if base_dir else st.dirname(url)
    plan = ManifestPlan(quarantined=[], total_rows=frame.height)
    for offset in range(0, frame.height, max(1, batch_rows)):
        batch = frame.slice(offset, batch_rows)
        problems = validate_manifest(batch)
        first, last = offset + 1, offset + batch.height
        problems += [p for p in duplicates if first <= p.row_number <= last]
        refused = {p.row_number for p in problems}
        valid = resolved_rows(batch.filter(~pl.col(ROW).is_in(list(refused))), base_dir)
        if policy is not None and policy.allowed:
            allowed = policy.allows_many(valid["image_uri"])
            problems += _policy_problems(valid.filter(~allowed), batch)
            valid = valid.filter(allowed)
        problems.sort(key=lambda p: (p.row_number, p.column or ""))
        plan.quarantined += problems_by_row(problems, batch)
        plan.row_numbers.extend(valid["row_number"].to_list())
        if sink is not None:
            sink(valid)
        else:
            plan.rows += rows_of(valid)
    return plan


def read_manifest(url: str, storage: Storage, policy: "LocationPolicy | None" = None) -> ManifestPlan:
    """Read and validate a whole manifest into ``ManifestRow``s (a batch run's plan; see ``plan_manifest``).

    Args:
        url: the manifest's URI.
        storage: where it is.
        policy: the deployment's allowed locations.

    Returns:
        The plan, with ``rows``.

    Raises:
        RunError: table-level problems.
    """
    return plan_manifest(url, storage, policy)


def _policy_problems(outside: pl.DataFrame, batch: pl.DataFrame) -> list:
    """A quarantine problem for each row whose resolved ``image_uri`` is outside the allowed locations."""
    from medvlm_core.inputs.manifest_checks import ROW, RowProblem

    given = batch.filter(pl.col(ROW).is_in(outside["row_number"].to_list()))
    return [RowProblem(n, "image_uri", "location_policy", uri, "image_uri is outside the allowed locations of this deployment")
            for n, uri in zip(given[ROW].to_list(), given["image_uri"].to_list())]


def _blank_is_null(column: str) -> pl.Expr:
    text = pl.col(column).str.strip_chars()
    return pl.when(text.str.len_chars() > 0).then(text).otherwise(None)


# A path that os.path.normpath would change (``.`` or ``..`` segments, ``//``, a trailing ``/``).
_NOT_NORMAL = r"(^|/)\.\.?(/|$)|//|/$"


def resolved_rows(valid: pl.DataFrame, base_dir: str) -> pl.DataFrame:
    """Validated manifest rows (strings) as typed plan rows (``PLAN_SCHEMA``), each ``image_uri`` resolved
    against the manifest's folder exactly as ``medvlm_core.storage.resolve`` does.

    The common forms (``s3://...``, clean absolute and relative paths) are resolved by column expressions;
    the rest (``file://``, ``..`` segments, ...) by ``storage.resolve`` itself, row by row.

    Args:
        valid: rows that passed validation, with ``__row_number``.
        base_dir: the manifest's folder.

    Returns:
        The typed rows.
    """
    from medvlm_core.inputs.manifest_checks import ROW

    uri = pl.col("image_uri").str.strip_chars()
    lower = uri.str.to_lowercase()
    base = base_dir.rstrip("/") + "/"
    fast = (
        pl.when(lower.str.starts_with("s3://")).then(uri)
        .when(lower.str.starts_with("s3a://")).then(pl.lit("s3://") + uri.str.slice(6))
        .when(uri.str.contains("://", literal=True)).then(None)  # file:// and friends: storage.resolve
        .when(uri.str.contains(_NOT_NORMAL)).then(None)
        .when(uri.str.starts_with("/")).then(uri)
        .otherwise(pl.lit(base) + uri)
    )
    rows = valid.select(
        pl.col(ROW).alias("row_number"),
        pl.col("document_id").str.strip_chars(),
        fast.alias("image_uri"),
        uri.alias("_given"),
        pl.col("page").str.strip_chars().cast(pl.Float64).cast(pl.Int32),
        _blank_is_null("prompt_id"),
        pl.when(pl.col("prompt").str.strip_chars().str.len_chars() > 0).then(pl.col("prompt")).otherwise(None),
        _blank_is_null("patient_id"),
        _blank_is_null("encounter_id"),
        _blank_is_null("sha256").str.to_lowercase(),
    )
    slow = rows.filter(pl.col("image_uri").is_null())
    if slow.height:
        resolved = {n: st.resolve(u, base_dir) for n, u in zip(slow["row_number"].to_list(), slow["_given"].to_list())}
        rows = rows.with_columns(
            pl.col("image_uri").fill_null(pl.col("row_number").replace_strict(resolved, default=None, return_dtype=pl.Utf8))
        )
    return rows.drop("_given")


def rows_of(frame: pl.DataFrame) -> list[ManifestRow]:
    """Plan rows (``PLAN_SCHEMA`` columns) as ``ManifestRow``s.

    Args:
        frame: plan rows.

    Returns:
        One ``ManifestRow`` per row, in order.
    """
    return [ManifestRow(**record) for record in frame.select(PLAN_SCHEMA.names).iter_rows(named=True)]


def write_manifest(storage: Storage, url: str, rows: list[dict[str, str]]) -> None:
    """Write a Parquet manifest of the required columns (the nightly flow's manifest of loose documents).

    Args:
        storage: where to write it.
        url: the manifest's URL (``.parquet``).
        rows: ``document_id`` and ``image_uri`` of each document.
    """
    schema = pa.schema([(name, pa.string()) for name in REQUIRED_COLUMNS])
    from medvlm_core.output.results import write_parquet

    write_parquet(storage, url, pa.Table.from_pylist([{name: row[name] for name in REQUIRED_COLUMNS} for row in rows],
                                                     schema=schema))
