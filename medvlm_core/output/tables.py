"""The output tables, each defined once: its columns, their types, nullability, checks and a one-line description.

Everything else is derived from these definitions, so a column cannot be added in one place and forgotten in
another:

* ``Table.arrow_schema()``: the Parquet schema every writer uses (``results.to_table``, the merges at publish).
  Arrow fields stay nullable, as every file written so far has them: nullability is the pandera schema's to
  enforce, and an older run's file keeps the same schema as a new one.
* ``Table.pandera_schema()``: the checks every table passes before it is written (``validate_table``).
* ``Table.rows_to_arrow(rows)``: rows (dicts) to an Arrow table. A key that is not a column is an error
  (``UnknownColumnError``): a misspelt column must not be written as null without a word. A column a row leaves
  out is null.
* The docs' column tables (``markdown``), built by the docs site's hook.

``STRUCTURED_KEYS`` are the leading columns of every structured extraction table (``structured.tables_for``);
the rest of such a table comes from the prompt's JSON schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pyarrow

from medvlm_core import errors
from medvlm_core.output import status as row_status

TIMESTAMP = pyarrow.timestamp("us", tz="UTC")
# The scopes of an answer and the methods of a document answer (``run/documents.py``).
SCOPES = ("page", "document")
METHODS = ("single_prompt", "map_reduce")
HEX64 = r"^[0-9a-f]{64}$"



@dataclass(frozen=True)
class Check:
    """A check on a column's values, by the name of pandera's built-in check (``ge``, ``isin``, ``str_matches``)
    and its argument. Kept as data so that the tables load without pandera (it is imported to validate) and the
    docs can print it."""

    kind: str
    value: Any

    def to_pandera(self) -> Any:
        """The pandera ``Check``."""
        import pandera.polars as pa

        return getattr(pa.Check, self.kind)(list(self.value) if isinstance(self.value, tuple) else self.value)

    def __str__(self) -> str:
        if self.kind == "isin":
            return "one of " + ", ".join(f"`{v}`" for v in self.value)
        return {"ge": ">= {}", "str_matches": "matches `{}`"}.get(self.kind, self.kind + " {}").format(self.value)


def _ge(n: int) -> tuple[Check, ...]:
    return (Check("ge", n),)


class UnknownColumnError(ValueError):
    """A row names a column its table does not have (a bug in the code that built the row)."""


@dataclass(frozen=True)
class Column:
    """One column of an output table.

    Attributes:
        name: the column's name.
        type: its Arrow type.
        description: one line for the docs.
        nullable: whether a null passes the table's checks (the Arrow field stays nullable either way).
        checks: pandera checks on its values (nulls are not checked).
        unique: whether its values are unique within one written table.
    """

    name: str
    type: pyarrow.DataType
    description: str
    nullable: bool = True
    checks: tuple[Check, ...] = ()
    unique: bool = False


@dataclass(frozen=True)
class Table:
    """An output table: its columns and the checks that span several columns.

    Attributes:
        name: the table's folder under an output.
        description: one line for the docs.
        columns: the columns, in file order.
        row_checks: functions over pandera's ``PolarsData`` returning one boolean per row, by name.
    """

    name: str
    description: str
    columns: tuple[Column, ...]
    row_checks: tuple[Callable[[Any], Any], ...] = field(default=())

    @property
    def column_names(self) -> tuple[str, ...]:
        """The columns' names, in file order."""
        return tuple(c.name for c in self.columns)

    def arrow_schema(self) -> pyarrow.Schema:
        """The table's Parquet schema (every field nullable; see the module docstring)."""
        return pyarrow.schema([(c.name, c.type) for c in self.columns])

    def pandera_schema(self) -> Any:
        """The table's pandera schema (``pandera.polars.DataFrameSchema``): each column's dtype, nullability,
        checks and uniqueness, and the row checks. A frame may lack only nullable columns (a table written by an
        older medvlm)."""
        import pandera.polars as pa
        import polars as pl

        columns = {
            c.name: pa.Column(pl.from_arrow(pyarrow.array([], c.type)).dtype,
                              checks=[check.to_pandera() for check in c.checks], nullable=c.nullable,
                              unique=c.unique, required=not c.nullable)
            for c in self.columns
        }
        checks = [pa.Check(function, name=function.__name__) for function in self.row_checks]
        return pa.DataFrameSchema(columns, checks=checks, name=self.name, strict=False)

    def rows_to_arrow(self, rows: Iterable[dict[str, Any]]) -> pyarrow.Table:
        """Rows as an Arrow table in this table's schema; a column a row leaves out is null.

        Args:
            rows: the rows, as dicts keyed by column name.

        Returns:
            The Arrow table.

        Raises:
            UnknownColumnError: a row has a key that is not a column of this table.
        """
        return rows_to_arrow(rows, self.arrow_schema(), self.name)

    def markdown(self) -> str:
        """The columns as a Markdown table (name, type, nullable, description) for the docs."""
        lines = ["| column | type | null | description |", "|---|---|---|---|"]
        for c in self.columns:
            rules = "; ".join(str(check) for check in c.checks) + ("; unique" if c.unique else "")
            lines.append(f"| `{c.name}` | {c.type} | {'yes' if c.nullable else 'no'} | {c.description}"
                         + (f" ({rules.strip('; ')})" if rules else "") + " |")
        return "\n".join(lines)


def rows_to_arrow(rows: Iterable[dict[str, Any]], schema: pyarrow.Schema, table_name: str = "") -> pyarrow.Table:
    """Rows as an Arrow table in ``schema``; a column a row leaves out is null.

    Args:
        rows: the rows, as dicts keyed by column name.
        schema: the table's schema.
        table_name: named in the error.

    Returns:
        The Arrow table.

    Raises:
        UnknownColumnError: a row has a key that is not a column of the schema.
    """
    rows = list(rows)
    known = set(schema.names)
    for number, row in enumerate(rows, 1):
        unknown = row.keys() - known
        if unknown:
            raise UnknownColumnError(f"row {number} for the {table_name or 'output'} table has keys that are not "
                                     f"its columns: {sorted(unknown)}")
    return pyarrow.Table.from_pylist(rows, schema=schema)


def _hex64(name: str, description: str, nullable: bool = False) -> Column:
    return Column(name, pyarrow.string(), description, nullable, (Check("str_matches", HEX64),))


def _count(name: str, description: str, nullable: bool = False) -> Column:
    return Column(name, pyarrow.int64(), description, nullable, _ge(0))


def status_matches_error_fields(data: Any) -> Any:
    """An answered row (ok, truncated) has a completion and no error; any other row has an error type and message."""
    import polars as pl

    answered = pl.col("status").is_in(list(row_status.ANSWERED))
    return data.lazyframe.select(
        pl.when(answered)
        .then(pl.col("error_type").is_null() & pl.col("completion").is_not_null())
        .otherwise(pl.col("error_type").is_not_null() & pl.col("error_message").is_not_null())
    )


S = pyarrow.string()
I32 = pyarrow.int32()
LIST_I32 = pyarrow.list_(pyarrow.int32())
I64 = pyarrow.int64()
F64 = pyarrow.float64()
BOOL = pyarrow.bool_()

COMPLETIONS = Table("completions", "One row per document page and prompt: the model's answer or the error.", (
    Column("run_id", S, "The run that wrote the row.", nullable=False),
    _hex64("result_key", "sha256 of document id, image sha256, page, model, mmproj, prompt and parameters: "
                         "the same inputs always give the same key."),
    Column("document_id", S, "The manifest's document id.", nullable=False),
    Column("page", I32, "1-based page number; null when the document could not be opened.", checks=_ge(1)),
    Column("page_count", I32, "Pages in the document file."),
    Column("manifest_row", I64, "The manifest row (1-based) the page came from.", nullable=False,
           checks=_ge(1)),
    Column("image_uri", S, "Where the document file was read."),
    _hex64("image_sha256", "sha256 of the page's decoded pixels.", nullable=True),
    Column("image_format", S, "The file's format (PNG, JPEG, TIFF, PDF, ...)."),
    Column("image_width", I32, "Page width in pixels as given to the model."),
    Column("image_height", I32, "Page height in pixels as given to the model."),
    Column("patient_id", S, "The manifest's patient id (never logged)."),
    Column("encounter_id", S, "The manifest's encounter id."),
    Column("prompt_id", S, "The prompt's id in the prompt library (or the manifest's)."),
    _hex64("prompt_sha256", "sha256 of the prompt text."),
    Column("model_name", S, "The model's name (GGUF general.name or file name)."),
    _hex64("model_sha256", "sha256 of the text model GGUF."),
    _hex64("mmproj_sha256", "sha256 of the vision projector GGUF."),
    Column("chat_format", S, "The chat format the model was prompted with."),
    Column("params_json", S, "Every parameter that changes the answer, as JSON (part of the result key)."),
    Column("completion", S, "The answer (without the reasoning block of a reasoning model)."),
    Column("finish_reason", S, "stop, length, ... as llama.cpp reports it."),
    Column("prompt_tokens", I32, "Tokens in the prompt, image included."),
    Column("completion_tokens", I32, "Tokens generated.", checks=_ge(0)),
    Column("fetch_ms", F64, "Time to read the document file."),
    Column("preprocess_ms", F64, "Time to decode the page into the model's image."),
    Column("latency_ms", F64, "Time from the request entering the engine to its answer."),
    Column("reasoning", S, "A reasoning model's thinking block, apart from the answer."),
    Column("reasoning_tokens", I32, "Tokens of the thinking block."),
    Column("reasoning_budget_hit", BOOL, "Whether medvlm's reasoning budget closed the thinking block."),
    Column("mean_logprob", F64, "Mean log-probability of the answer's tokens (a confidence)."),
    Column("min_logprob", F64, "Least log-probability of the answer's tokens."),
    Column("top_logprobs", S, "With --logprobs N: the alternatives per token as JSON."),
    Column("status", S, "ok, error or truncated.", nullable=False, checks=(Check("isin", tuple(row_status.WRITTEN)),)),
    Column("error_type", S, "A stable error type (errors.ERROR_TYPES) when status is not ok.",
           checks=(Check("isin", tuple(errors.ERROR_TYPES)),)),
    Column("error_message", S, "What went wrong, without document text."),
    Column("created_at", TIMESTAMP, "When the row was made (UTC)."),
    # Whole-document answers (docs/documents.md). Rows written before scopes existed have nulls here: page rows.
    Column("scope", S, "page: the answer of one page; document: of a whole document (page null, pages listed).",
           checks=(Check("isin", tuple(SCOPES)),)),
    Column("pages", LIST_I32, "At document scope: the pages answered, in order."),
    Column("method", S, "At document scope: single_prompt (all pages in one prompt) or map_reduce (each page, "
                        "then a text-only consolidation).", checks=(Check("isin", tuple(METHODS)),)),
    Column("image_token_budget", I32, "At document scope, single_prompt: the image tokens per page it was "
                                      "lowered to so the document fits (null: not lowered)."),
), row_checks=(status_matches_error_fields,))

RUNS = Table("runs", "One row per run: its counts, parameters, throughput and memory plan.", (
    Column("run_id", S, "The run's id (also names its files).", nullable=False, unique=True),
    Column("flow_run_id", S, "The orchestrator's run: the Prefect flow run id, or airflow:DAG/RUN/TASK."),
    Column("status", S, "How the run ended."),
    Column("started_at", TIMESTAMP, "When the run started (UTC)."),
    Column("finished_at", TIMESTAMP, "When the run published (UTC)."),
    Column("wall_seconds", F64, "Seconds from start to publish."),
    Column("manifest_uri", S, "The manifest the run read."),
    Column("output_uri", S, "The output it published into."),
    Column("model_name", S, "The model's name."),
    Column("model_sha256", S, "sha256 of the text model GGUF."),
    Column("mmproj_sha256", S, "sha256 of the vision projector GGUF."),
    Column("chat_format", S, "The chat format used."),
    Column("prompt_id", S, "The run's default prompt id."),
    Column("prompt_sha256", S, "sha256 of the default prompt's text."),
    Column("params_json", S, "The run's parameters as JSON."),
    _count("manifest_rows", "Rows in the manifest."),
    _count("quarantined_rows", "Rows refused before processing (the quarantine table)."),
    _count("skipped_rows", "Rows whose every page was already done in the output."),
    _count("skipped_pages", "Pages skipped because their result key was done.", nullable=True),
    _count("processed_rows", "Rows sent to the model."),
    _count("pages_ok", "Pages answered ok."),
    _count("pages_error", "Pages that ended in an error row."),
    _count("pages_truncated", "Pages whose answer hit the token limit.", nullable=True),
    Column("reconciled", BOOL, "manifest_rows = quarantined_rows + processed_rows + skipped_rows."),
    _count("prompt_tokens", "Prompt tokens over the run.", nullable=True),
    _count("completion_tokens", "Generated tokens over the run.", nullable=True),
    Column("pages_per_second", F64, "Pages answered per wall-clock second."),
    Column("completion_tokens_per_second", F64, "Generated tokens per wall-clock second."),
    _count("storage_retries", "Object-store calls repeated after a transient failure, up to the publish.",
           nullable=True),
    Column("n_parallel", I64, "Pages decoded together (lowered by the memory plan to fit)."),
    Column("memory_needed_mb", F64, "The memory plan's estimate."),
    Column("memory_budget_mb", F64, "The memory budget it was held to."),
    Column("medvlm_version", S, "The medvlm version that ran."),
    Column("scope", S, "page or document (the run's scope)."),
    _count("documents_ok", "At document scope: documents answered (ok or truncated).", nullable=True),
    _count("documents_error", "At document scope: documents that ended in an error row.", nullable=True),
))

QUARANTINE = Table("quarantine", "Manifest rows refused before processing, with the row as given and the reason.", (
    Column("run_id", S, "The run that refused the row.", nullable=False),
    Column("manifest_uri", S, "The manifest."),
    Column("row_number", I64, "The row's 1-based number in the manifest.", nullable=False, checks=_ge(1)),
    Column("row_json", S, "The row as given, as JSON.", nullable=False),
    Column("column", S, "The column of the first failed check."),
    Column("check", S, "The first failed check."),
    Column("failing_value", S, "The value that failed it."),
    Column("reason", S, "Every problem of the row, readable ('row 7: page must be an integer >= 1').",
           nullable=False),
    Column("created_at", TIMESTAMP, "When the row was refused (UTC)."),
))

EVALS = Table("evals", "Written by medvlm eval: every score, one row each (scores only, no item text).", (
    Column("eval_id", S, "The evaluation's id (also names its files)."),
    Column("created_at", TIMESTAMP, "When the evaluation ran (UTC)."),
    Column("gold_uri", S, "The gold file scored against."),
    Column("gold_sha256", S, "sha256 of the gold file."),
    Column("scored_runs", S, "The runs scored, as JSON."),
    Column("system", S, "The system (a run, or a model and prompt) the row scores."),
    Column("run_id", S, "The run scored."),
    Column("prompt_id", S, "Its prompt id."),
    Column("kind", S, "structured or free_text."),
    Column("section", S, "table, field, document_type, mentions, pages, calibration, review or comparison."),
    Column("table_name", S, "The extraction table, or all."),
    Column("field", S, "The field, or all_fields."),
    Column("document_type", S, "The document type, for the document_type section."),
    Column("baseline", S, "The system compared against, for the comparison section."),
    Column("metric", S, "The metric a comparison or threshold row is about."),
    Column("value", F64, "The metric's value."),
    Column("ci_low", F64, "Low end of the 95% bootstrap interval."),
    Column("ci_high", F64, "High end of the 95% bootstrap interval."),
    Column("n", I64, "How many items or pages the row counts."),
    Column("tp", I64, "True positives."),
    Column("fp", I64, "False positives."),
    Column("fn", I64, "False negatives."),
    Column("precision", F64, "TP / (TP + FP)."),
    Column("recall", F64, "TP / (TP + FN)."),
    Column("f1", F64, "2 TP / (2 TP + FP + FN)."),
    Column("bin_low", F64, "Calibration bin's low confidence."),
    Column("bin_high", F64, "Calibration bin's high confidence."),
    Column("accuracy", F64, "Share right in the calibration bin."),
    Column("mean_confidence", F64, "Mean confidence in the calibration bin."),
))

REVIEW = Table("review", "Written by medvlm eval: the items a person should check, one row each.", (
    Column("eval_id", S, "The evaluation that routed the item."),
    Column("system", S, "The system scored."),
    Column("run_id", S, "The run that extracted the item."),
    Column("result_key", S, "The completion row's key (to join back)."),
    Column("document_id", S, "The document."),
    Column("page", I32, "The page."),
    Column("patient_id", S, "The manifest's patient id."),
    Column("encounter_id", S, "The manifest's encounter id."),
    Column("table_name", S, "The extraction table the item is in."),
    Column("item_index", I32, "The item's index in its table for that page."),
    Column("confidence", F64, "The item's confidence."),
    Column("reason", S, "low_confidence, no_safe_threshold, no_confidence, invalid:FIELDS or no_answer:STATUS."),
    Column("gold_status", S, "right or wrong on a labelled page, else unlabelled."),
    Column("page_status", S, "The page's answer status."),
    Column("item_json", S, "The item's values as JSON."),
))

# The leading columns of every structured extraction table; the prompt's JSON schema gives the rest.
STRUCTURED_KEYS = (
    Column("run_id", S, "The run that wrote the row.", nullable=False),
    _hex64("result_key", "The completion row's key: joins the item to its page's answer."),
    Column("document_id", S, "The document.", nullable=False),
    Column("page", I32, "The page."),
    Column("patient_id", S, "The manifest's patient id."),
    Column("encounter_id", S, "The manifest's encounter id."),
    Column("item_index", I32, "The item's 0-based index on its page.", nullable=False, checks=_ge(0)),
    Column("confidence", F64, "exp(mean log-probability) of the tokens of the item's values: ~1 when the model "
                              "was sure of every value."),
    Column("pages", LIST_I32, "At document scope: the pages the item's evidence is on, within the document "
                              "(null when the model gave none)."),
)

# The tables every run writes, and those medvlm eval writes.
RUN_TABLES = {t.name: t for t in (COMPLETIONS, RUNS, QUARANTINE)}
EVAL_TABLES = {t.name: t for t in (EVALS, REVIEW)}


# -- the review workbench (medvlm review): a person's corrections and who opened which page ---------------

CORRECTION_ACTIONS = ("accept", "edit", "delete", "add", "reviewed")


def correction_names_its_item(data: Any) -> Any:
    """An ``edit`` or ``add`` row names a field; ``accept`` and ``delete`` name an item and no field; ``reviewed``
    (the page is done for the table) names neither item nor field; no row names both a model item and an added one."""
    import polars as pl

    action, item, added, field_ = (pl.col("action"), pl.col("item"), pl.col("added_item"), pl.col("field"))
    one_item = item.is_not_null() ^ added.is_not_null()
    return data.lazyframe.select(
        pl.when(action == "reviewed").then(item.is_null() & added.is_null() & field_.is_null())
        .when(action == "add").then(added.is_not_null() & item.is_null() & field_.is_not_null())
        .when(action == "edit").then(one_item & field_.is_not_null())
        .otherwise(one_item & field_.is_null())
    )


CORRECTIONS = Table("corrections", "Written by medvlm review: every reviewer action, one row each (append-only).", (
    Column("submission_id", S, "One submission of a reviewer (one file): its rows were sent together.",
           nullable=False),
    Column("seq", I32, "The row's order within its submission.", nullable=False, checks=_ge(0)),
    Column("created_at", TIMESTAMP, "When the submission was recorded (UTC).", nullable=False),
    Column("reviewer", S, "Who made the correction (--reviewer or the login).", nullable=False),
    Column("run_id", S, "The run of the answer corrected.", nullable=False),
    _hex64("result_key", "The answer's key (the completion row): joins the correction to the page's items."),
    Column("document_id", S, "The document.", nullable=False),
    Column("page", I32, "The page."),
    Column("prompt_id", S, "The answer's prompt id."),
    Column("table_name", S, "The extraction table corrected.", nullable=False,
           checks=(Check("str_matches", r"^[a-z][a-z0-9_]{0,62}$"),)),
    Column("item", I32, "The model's item (its item_index); null for an added item or a page-level row.",
           checks=_ge(0)),
    Column("added_item", S, "Id of an item the reviewer added (every row of that item has it)."),
    Column("action", S, "accept, edit (one row per field), delete, add (one row per field) or reviewed (the page "
                        "is done for the table).", nullable=False, checks=(Check("isin", CORRECTION_ACTIONS),)),
    Column("field", S, "The field edited or added."),
    Column("value_before", S, "The field's value before (the model's, or an earlier correction's), as text."),
    Column("value_after", S, "The field's value after, as text (null: cleared)."),
), row_checks=(correction_names_its_item,))

ACCESS_LOG = Table("access_log", "Written by medvlm review: who opened which document page, and when (the audit "
                                 "trail).", (
    Column("accessed_at", TIMESTAMP, "When (UTC).", nullable=False),
    Column("reviewer", S, "Who.", nullable=False),
    Column("action", S, "page (the page and its items were shown), image (its image was sent) or export (gold "
                        "exported).", nullable=False, checks=(Check("isin", ("page", "image", "export")),)),
    Column("document_id", S, "The document (null for an export)."),
    Column("page", I32, "The page."),
    Column("run_id", S, "The run of the answer shown."),
    _hex64("result_key", "The answer shown.", nullable=True),
    Column("client", S, "The client's address as the server saw it."),
))

# The tables the review workbench writes (never scored, never given a current view).
REVIEW_TABLES = {t.name: t for t in (CORRECTIONS, ACCESS_LOG)}


def structured_table(name: str, extra: Iterable[Column] = ()) -> Table:
    """A structured extraction table: the ``STRUCTURED_KEYS`` then ``extra`` (from the prompt's JSON schema).

    Args:
        name: the table's name.
        extra: its own columns.

    Returns:
        The table.
    """
    return Table(name, "A structured extraction table: one row per extracted item.", STRUCTURED_KEYS + tuple(extra))


def validate_table(table_name: str, table: pyarrow.Table) -> None:
    """Check an Arrow table against its definition before it is written.

    A table that is neither a run, eval nor review table is held to the structured keys' checks.

    Args:
        table_name: the table's name.
        table: the rows.

    Raises:
        RuntimeError: the table breaks a check (a bug: rows are built by medvlm, not by users); the message
            names the columns and checks, never the values.
    """
    if table.num_rows == 0:
        return
    import polars as pl
    from pandera.errors import SchemaError, SchemaErrors

    from medvlm_core.validation import passes

    definition = (RUN_TABLES.get(table_name) or EVAL_TABLES.get(table_name) or REVIEW_TABLES.get(table_name)
                  or structured_table(table_name))
    schema = definition.pandera_schema()
    frame = pl.from_arrow(table)
    if passes(schema, frame):
        return
    try:
        schema.validate(frame, lazy=True)
    except (SchemaErrors, SchemaError) as exc:
        cases = getattr(exc, "failure_cases", None)
        detail = "" if cases is None else "; ".join(
            sorted({f"{c['column']}:{c['check']}" for c in cases.select("column", "check").iter_rows(named=True)})
        )
        raise RuntimeError(f"refusing to write an invalid {table_name} table ({detail})") from None
