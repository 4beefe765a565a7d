"""Gold files: labelled items per document page and table (CSV, JSONL or Parquet, by extension).

One row per labelled item, in the long form a spreadsheet makes easy:

=====================  =====================================================================================
``document_id``        required; the document as the manifest names it
``page``               optional; 1-based page; empty: the whole document (its items are on some page of it:
                       scored against a document-scope answer, or else all the document's page answers), or
                       page 1 when other rows of the same document name pages
``table``              the table the item belongs to: ``diagnoses``, ``medications``, ``instructions`` or a
                       user extraction's table (its prompt id); empty: the row only says that the page was
                       labelled (a page with no items at all)
``document_type``      optional; the document's type (discharge_summary, prescription, ...), one per document
field columns          the item's labelled values: ``name`` (diagnoses, medications), ``dose``, ``unit``,
                       ``route``, ``frequency``, ``conditional``, ``condition`` (medications), ``text``,
                       ``conditional``, ``condition``, ``follow_up_interval`` (instructions), ``evidence``,
                       and any field of a user extraction. An empty cell is a field not labelled (not
                       scored); ``a|b`` lists accepted alternatives
=====================  =====================================================================================

Every page that appears in the file is labelled *exhaustively* for every table the file names: an item the
model extracts there that no gold row lists is a false positive; a labelled item it misses is a false negative.

The rows are validated with pandera (polars backend, lazily: every problem at once), as manifests are; a bad
row stops the evaluation with a message that names the row (1-based, the first data row is row 1) and the
reason, never the value. A problem with the table itself (unreadable, missing column, no rows) names the file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

import pandera.polars as pa
import polars as pl
from pandera.api.polars.types import PolarsData
from pandera.errors import SchemaError, SchemaErrors

from medvlm_core import storage as st
from medvlm_core.errors import DocumentError, RunError
from medvlm_core.evals.matching import FIELD_KINDS
from medvlm_core.evals.normalize import is_empty, to_bool
from medvlm_core.inputs.manifest import manifest_format, parse_table
from medvlm_core.output.code_tables import LINKED_COLUMNS
from medvlm_core.output.structured import CLINICAL_CODED_SCHEMA
from medvlm_core.storage import Storage

REQUIRED_COLUMNS = ("document_id", "table")
RESERVED = ("document_id", "page", "table", "document_type")
# The page of a gold row that labels a whole document (its ``page`` cell empty).
DOCUMENT_PAGE = 0
MAX_ID_CHARS = 256
MAX_VALUE_CHARS = 2000
ROW = "__row_number"
MAX_PROBLEMS_SHOWN = 20

# The built-in tables: their fields (from the clinical schemas, the coded one's included, and the linked code
# columns a gold file may label: docs/codes.md) and the field items are matched on.
BUILTIN_FIELDS = {
    name: tuple(prop["items"]["properties"]) + tuple(c.name for c in LINKED_COLUMNS.get(name, ())
                                                       if c.name not in prop["items"]["properties"])
    for name, prop in CLINICAL_CODED_SCHEMA["properties"].items()
}
# A labelled ICD-10-CM code is also scored by its category (its first three characters).
CODE_CATEGORY = ("icd10cm_code", "icd10cm_category")
DEFAULT_KEYS = {"diagnoses": "name", "medications": "name", "instructions": "text"}


class GoldModel(pa.DataFrameModel):
    """The gold file's fixed columns (every column arrives as a string); field columns are checked per table."""

    document_id: str = pa.Field(nullable=False, str_length={"min_value": 1, "max_value": MAX_ID_CHARS})
    page: Optional[str] = pa.Field(nullable=True, str_matches=r"^\s*[1-9][0-9]{0,5}(\.0+)?\s*$")
    table: Optional[str] = pa.Field(nullable=True, str_matches=r"^\s*[a-z][a-z0-9_]{0,62}\s*$")
    document_type: Optional[str] = pa.Field(nullable=True, str_length={"max_value": MAX_ID_CHARS})

    @pa.check("document_id", name="not_blank")
    def _document_id_not_blank(cls, data: PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col(data.key).str.strip_chars().str.len_chars() > 0)

    class Config:
        strict = False  # the field columns vary with the tables labelled


_REASONS = {
    ("document_id", "not_nullable"): "document_id is missing",
    ("document_id", "str_length"): f"document_id must be 1 to {MAX_ID_CHARS} characters",
    ("document_id", "not_blank"): "document_id is blank",
    ("page", "str_matches"): "page must be an integer >= 1",
    ("table", "str_matches"): "table must be a table name (lowercase letters, digits, _)",
    ("document_type", "str_length"): f"document_type is longer than {MAX_ID_CHARS} characters",
}


@dataclass(frozen=True)
class GoldItem:
    """One labelled item: where it is, its table and its labelled values (unlabelled fields left out)."""

    row_number: int
    document_id: str
    page: int
    table: str
    values: dict[str, Any]


@dataclass
class GoldSet:
    """A validated gold file.

    ``pages`` holds every labelled page (also those with no item); ``tables`` the tables the file labels;
    ``keys`` the field each table's items are matched on; ``fields`` the labelled fields of each table.
    """

    uri: str
    sha256: str
    items: list[GoldItem]
    pages: list[tuple[str, int]]
    tables: list[str]
    keys: dict[str, str]
    fields: dict[str, list[str]]
    document_types: dict[str, str] = field(default_factory=dict)

    @property
    def documents(self) -> list[str]:
        """The labelled documents, sorted."""
        return sorted({d for d, _ in self.pages})

    def items_of(self, document_id: str, page: int, table: str) -> list[GoldItem]:
        """The labelled items of one page and table, in file order.

        Args:
            document_id: the document.
            page: the page.
            table: the table.

        Returns:
            The items.
        """
        index = getattr(self, "_index", None)
        if index is None:
            index = {}
            for item in self.items:
                index.setdefault((item.document_id, item.page, item.table), []).append(item)
            self._index = index
        return index.get((document_id, page, table), [])


def read_gold_frame(url: str, storage: Storage) -> tuple[pl.DataFrame, str]:
    """The gold file as a DataFrame of strings, and the sha256 of its bytes.

    Args:
        url: the gold file's URI (.csv, .jsonl or .parquet).
        storage: where it is.

    Returns:
        ``(frame, sha256)``.

    Raises:
        RunError: unknown format, unreadable, a required column missing, or no rows.
    """
    fmt = manifest_format(url, "gold file")
    try:
        data = storage.read_bytes(url)
    except DocumentError as exc:
        raise RunError(f"gold file cannot be read: {exc.message}") from None
    digest = hashlib.sha256(data).hexdigest()
    frame = parse_table(data, fmt, url, "gold file")
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise RunError(f"gold file {url}: missing required column(s) {', '.join(missing)}; "
                       f"found {', '.join(frame.columns) or 'none'}")
    if frame.height == 0:
        raise RunError(f"gold file {url}: has no rows")
    # Booleans stay readable as true/false once cast to text.
    frame = frame.select([pl.col(c).cast(pl.Utf8, strict=False) for c in frame.columns])
    if "page" not in frame.columns:
        frame = frame.with_columns(pl.lit(None, dtype=pl.Utf8).alias("page"))
    if "document_type" not in frame.columns:
        frame = frame.with_columns(pl.lit(None, dtype=pl.Utf8).alias("document_type"))
    return frame, digest


def _reason(column: str | None, check: str) -> str:
    for (col, prefix), text in _REASONS.items():
        if col == column and check.startswith(prefix):
            return text
    return f"{column or 'row'} fails {check}"


def load_gold(url: str, storage: Storage, tables: dict[str, dict[str, Any]] | None = None,
              keys: dict[str, str] | None = None) -> GoldSet:
    """Read and validate a gold file.

    Args:
        url: the gold file's URI.
        storage: where it is.
        tables: the user extraction tables the items may name (table -> field -> Arrow type), besides the
            built-in ``diagnoses``, ``medications`` and ``instructions``; None accepts any table name.
        keys: the field a user table's items are matched on (default: ``name``, else ``text``, else the first
            field labelled for it).

    Returns:
        The gold set.

    Raises:
        RunError: the file is unusable, or rows are bad (every bad row named with its reasons).
    """
    url = st.normalize(url)
    frame, digest = read_gold_frame(url, storage)
    frame = frame.with_row_index(ROW, offset=1).with_columns(pl.col(ROW).cast(pl.Int64))
    problems: dict[int, list[str]] = {}

    def problem(row: int, reason: str) -> None:
        problems.setdefault(row, [])
        if reason not in problems[row]:
            problems[row].append(reason)

    try:
        GoldModel.validate(frame, lazy=True)
    except SchemaErrors as exc:
        for case in exc.failure_cases.iter_rows(named=True):
            if case["index"] is None:
                raise RunError(f"gold file {url}: does not match its schema ({case['check']} on {case['column']})") from None
            check = str(case["check"]).split("(", 1)[0]
            problem(int(frame[ROW][int(case["index"])]), _reason(case["column"], check))
    except SchemaError as exc:  # pragma: no cover - lazy mode reports through SchemaErrors
        raise RunError(f"gold file {url}: does not match its schema ({exc.reason_code})") from None

    field_columns = [c for c in frame.columns if c not in RESERVED and c != ROW]
    known: dict[str, tuple[str, ...] | None] = dict(BUILTIN_FIELDS)
    if tables is not None:
        known.update({name: tuple(columns) for name, columns in tables.items() if name not in known})
    keys = dict(DEFAULT_KEYS, **(keys or {}))

    items: list[GoldItem] = []
    pages: dict[tuple[str, int], None] = {}
    paged: set[str] = set()  # documents labelled page by page (a row of theirs names a page)
    document_types: dict[str, tuple[str, int]] = {}
    for row in frame.iter_rows(named=True):
        number = row[ROW]
        if number in problems:
            continue
        document_id = row["document_id"].strip()
        page = int(float(row["page"])) if not is_empty(row["page"]) else DOCUMENT_PAGE
        if page != DOCUMENT_PAGE:
            paged.add(document_id)
        table = (row["table"] or "").strip()
        values = {c: row[c].strip() for c in field_columns if not is_empty(row[c])}
        code, category = CODE_CATEGORY
        if values.get(code) and not values.get(category):
            values[category] = "|".join(dict.fromkeys(alt.strip()[:3] for alt in values[code].split("|")))
        doc_type = (row["document_type"] or "").strip()
        if doc_type:
            seen = document_types.setdefault(document_id, (doc_type, number))
            if seen[0] != doc_type:
                problem(number, f"document_type differs from row {seen[1]} for the same document")
        for name, value in values.items():
            if len(value) > MAX_VALUE_CHARS:
                problem(number, f"{name} is longer than {MAX_VALUE_CHARS} characters")
        if not table:
            if values:
                problem(number, "has values but no table")
            pages.setdefault((document_id, page))
            continue
        if tables is not None and table not in known:
            problem(number, f"unknown table {table!r} (known: {', '.join(sorted(known))})")
            continue
        allowed = known.get(table)
        if allowed is not None:
            for name in values:
                if name not in allowed:
                    problem(number, f"table {table} has no field {name!r}")
        for name, value in values.items():
            if FIELD_KINDS.get(name) == "bool" and to_bool(value) is None:
                problem(number, f"{name} must be true or false (or yes/no, 1/0)")
        if not values:
            problem(number, f"an item of {table} needs at least one labelled field")
        if number in problems:
            continue
        pages.setdefault((document_id, page))
        items.append(GoldItem(number, document_id, page, table, values))

    if problems:
        shown = [f"row {n}: " + "; ".join(reasons) for n, reasons in sorted(problems.items())[:MAX_PROBLEMS_SHOWN]]
        more = len(problems) - len(shown)
        raise RunError(f"gold file {url}: {len(problems)} bad row(s): " + " | ".join(shown)
                       + (f" | and {more} more" if more > 0 else ""))

    # An empty page labels the whole document, unless other rows of that document name pages: it is then page 1,
    # as gold files written before whole-document answers have it.
    items = [GoldItem(i.row_number, i.document_id, 1, i.table, i.values)
             if i.page == DOCUMENT_PAGE and i.document_id in paged else i for i in items]
    pages = {(d, 1 if p == DOCUMENT_PAGE and d in paged else p): None for d, p in pages}
    table_names = sorted({item.table for item in items})
    fields: dict[str, list[str]] = {}
    for item in items:
        seen_fields = fields.setdefault(item.table, [])
        seen_fields += [f for f in item.values if f not in seen_fields]
    resolved_keys: dict[str, str] = {}
    for table in table_names:
        key = keys.get(table)
        if key is None:
            labelled = fields[table]
            key = "name" if "name" in labelled else "text" if "text" in labelled else labelled[0]
        missing = [item.row_number for item in items if item.table == table and is_empty(item.values.get(key))]
        if missing:
            rows = ", ".join(map(str, missing[:MAX_PROBLEMS_SHOWN])) + (" ..." if len(missing) > MAX_PROBLEMS_SHOWN else "")
            raise RunError(f"gold file {url}: {len(missing)} bad row(s): items of {table} are matched on {key}, "
                           f"which is empty in row(s) {rows}")
        resolved_keys[table] = key
    return GoldSet(url, digest, items, sorted(pages), table_names, resolved_keys, fields,
                   {d: t for d, (t, _) in document_types.items()})
