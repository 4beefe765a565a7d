"""Scoring runs against a gold file: precision, recall and F1 per table and field, comparisons with bootstrap
intervals, calibration of the confidences and the review list.

What is scored (a *system* is one run and prompt id, or the output's current answers for a prompt id when no run
is named):

* Structured answers (``clinical_extraction``, user extractions): on every labelled page, gold and extracted
  items of each table are paired one to one on their key field (``matching.assign``). A pair is a true
  positive (TP), an unpaired extracted item a false positive (FP), an unpaired gold item a false negative (FN);
  precision = TP / (TP + FP), recall = TP / (TP + FN), F1 their harmonic mean (micro-averaged: counts summed over
  pages before dividing). A field is scored over the items that label it: a paired item whose value matches is
  a TP; a wrong value is an FP and an FN; a missing value an FN; a value of an unpaired extracted item an FP.
  ``all_fields`` counts an item as right only when it is paired and every labelled field matches.
* Free-text answers (any other prompt, e.g. ``clinical_analysis``): the recall of the gold items' key values
  (names, texts) mentioned in the answer (``matching.mentioned``). There is no precision.
* A labelled page without an answer (an error row, a truncated answer, or no row in the run) adds nothing
  extracted: its gold items are all misses. The ``pages`` rows count those pages and items separately. A
  labelled page the system has no row for and no gold item of its tables (a page asked another prompt) is not
  one of its pages.
* Intervals: the documents are resampled with replacement (``bootstrap_samples`` times, seeded), the same
  resamples for every system, so that the difference between two systems has a paired interval (the 2.5th and
  97.5th percentiles).
* Calibration: extracted items on labelled answered pages, by confidence bin, with the share that is right
  (``all_fields``). The suggested review threshold is the lowest confidence at which the items at or above it
  (and valid) reach ``target_precision``; the items below it, the invalid ones and the pages without an answer
  are the review list (over every page of the run, labelled or not).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterator

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa

from medvlm_core import storage as st
from medvlm_core.analytics import CURRENT_SUFFIX, register_views, table_names_of
from medvlm_core.errors import RunError
from medvlm_core.evals import matching
from medvlm_core.evals.gold import BUILTIN_FIELDS, GoldItem, GoldSet, load_gold
from medvlm_core.evals.matching import Thresholds, is_empty, kind_of
from medvlm_core.evals.options import EvalOptions
from medvlm_core.inputs.manifest import manifest_format, parse_table
from medvlm_core.storage import Storage
from medvlm_core.output.structured import KEY_FIELDS

STRUCTURED_PROMPT = "clinical_extraction"
ALL = "all"
ALL_FIELDS = "all_fields"
NO_ANSWER = ("error", "truncated", "missing")
# Tables the evaluation itself writes into the output (never scored as extractions).
EVAL_TABLES = ("evals", "review")
ITEM_COLUMNS = {name for name, _ in KEY_FIELDS} | {"section", "run_date"}

EVALS_SCHEMA = pa.schema([
    ("eval_id", pa.string()), ("created_at", pa.timestamp("us", tz="UTC")), ("gold_uri", pa.string()),
    ("gold_sha256", pa.string()), ("scored_runs", pa.string()), ("system", pa.string()), ("run_id", pa.string()),
    ("prompt_id", pa.string()), ("kind", pa.string()), ("section", pa.string()), ("table_name", pa.string()),
    ("field", pa.string()), ("document_type", pa.string()), ("baseline", pa.string()), ("metric", pa.string()),
    ("value", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("n", pa.int64()),
    ("tp", pa.int64()), ("fp", pa.int64()), ("fn", pa.int64()), ("precision", pa.float64()),
    ("recall", pa.float64()), ("f1", pa.float64()), ("bin_low", pa.float64()), ("bin_high", pa.float64()),
    ("accuracy", pa.float64()), ("mean_confidence", pa.float64()),
])

REVIEW_SCHEMA = pa.schema([
    ("eval_id", pa.string()), ("system", pa.string()), ("run_id", pa.string()), ("result_key", pa.string()),
    ("document_id", pa.string()), ("page", pa.int32()), ("patient_id", pa.string()), ("encounter_id", pa.string()),
    ("table_name", pa.string()), ("item_index", pa.int32()), ("confidence", pa.float64()), ("reason", pa.string()),
    ("gold_status", pa.string()), ("page_status", pa.string()), ("item_json", pa.string()),
])


@dataclass
class Counts:
    """True positives, false positives and false negatives, and the scores they give."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, tp: int = 0, fp: int = 0, fn: int = 0) -> None:
        """Add counts.

        Args:
            tp: true positives.
            fp: false positives.
            fn: false negatives.
        """
        self.tp += tp
        self.fp += fp
        self.fn += fn

    @property
    def precision(self) -> float | None:
        """TP / (TP + FP); None when nothing was extracted."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        """TP / (TP + FN); None when nothing was labelled."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    @property
    def f1(self) -> float | None:
        """2 TP / (2 TP + FP + FN); None when nothing was labelled nor extracted."""
        total = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / total if total else None


@dataclass
class System:
    """What is scored: one run's answers to one prompt id (``run_id`` None: the output's current answers)."""

    label: str
    run_id: str | None
    prompt_id: str | None
    kind: str  # "structured" or "free_text"
    tables: list[str]
    model_name: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Answer:
    """A page's answer row in a system (the latest of the run for the page)."""

    document_id: str
    page: int | None
    status: str
    error_type: str | None
    result_key: str | None
    run_id: str | None
    completion: str | None = None


@dataclass
class TableMatch:
    """One page and table: the gold and extracted items, their pairs and what each pair got right."""

    gold: list[GoldItem]
    predicted: list[dict[str, Any]]
    pairs: list[tuple[int, int, float]]
    wrong_fields: dict[int, list[str]]  # gold index -> labelled fields the paired item got wrong
    counts: Counts

    def right_items(self) -> set[int]:
        """The extracted items that are right: paired, with every labelled field matching.

        Returns:
            Their indices in ``predicted``.
        """
        return {pj for gi, pj, _ in self.pairs if not self.wrong_fields[gi]}


@dataclass
class PageResult:
    """One labelled page of one system: its status and its matches (or mentions, for free text)."""

    document_id: str
    page: int
    status: str
    error_type: str | None
    tables: dict[str, TableMatch] = field(default_factory=dict)
    mentions: dict[str, list[tuple[GoldItem, bool]]] = field(default_factory=dict)
    completion: str | None = None
    counts: Counts = field(default_factory=Counts)


@dataclass
class SystemScores:
    """Every score of one system."""

    system: System
    tables: dict[str, Counts]
    fields: dict[tuple[str, str], Counts]
    document_types: dict[tuple[str, str], Counts]
    per_document: dict[str, np.ndarray]  # table (or "all") -> documents x (tp, fp, fn)
    pages: dict[str, list[int]]  # status -> [pages, gold items on them]
    page_results: list[PageResult]
    calibration: list[dict[str, Any]] = field(default_factory=list)
    review: dict[str, Any] = field(default_factory=dict)
    intervals: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)


@dataclass
class Evaluation:
    """The result of ``evaluate``: the scores, the rows of the evals and review tables, and what the report shows."""

    eval_id: str
    created_at: datetime
    output: str
    gold: GoldSet
    systems: list[SystemScores]
    comparisons: list[dict[str, Any]]
    options: EvalOptions
    rows: list[dict[str, Any]] = field(default_factory=list)
    review_rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def headline(self) -> list[dict[str, Any]]:
        """The headline table: one row per system and table (and ``all``), scores only (no document data).

        Returns:
            Rows with system, table, precision, recall, f1, its interval, gold items and unanswered pages.
        """
        out = []
        for scores in self.systems:
            unanswered = sum(scores.pages.get(s, [0, 0])[0] for s in NO_ANSWER)
            for table in [ALL] + scores.system.tables:
                counts = scores.tables.get(table)
                if counts is None:
                    continue
                low, high = scores.intervals.get(table, (None, None))
                out.append({
                    "system": scores.system.label, "kind": scores.system.kind, "table": table,
                    "precision": _round(counts.precision) if scores.system.kind == "structured" else None,
                    "recall": _round(counts.recall),
                    "f1": _round(counts.f1) if scores.system.kind == "structured" else None,
                    "ci_low": _round(low), "ci_high": _round(high),
                    "gold_items": counts.tp + counts.fn, "pages_without_answer": unanswered,
                })
        return out


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(value, digits)


# -- loading the answers --------------------------------------------------------------------------------


def _extraction_tables(con: duckdb.DuckDBPyConnection) -> dict[str, dict[str, str]]:
    """Structured tables of the output: table -> item field -> Arrow-ish type name (the item columns only)."""
    names = table_names_of(con)
    out = {}
    for name in sorted(names):
        if name.endswith(CURRENT_SUFFIX) or name in EVAL_TABLES or name in ("completions", "runs", "quarantine",
                                                                               "document_status"):
            continue
        columns = {r[0]: r[1] for r in con.execute(f"select column_name, column_type from (describe {name})").fetchall()}
        if {"document_id", "result_key", "run_id", "item_index"} <= set(columns):
            out[name] = {c: _type_name(t) for c, t in columns.items() if c not in ITEM_COLUMNS}
    return out


def _type_name(duckdb_type: str) -> str:
    t = duckdb_type.upper()
    if t == "BOOLEAN":
        return "bool"
    if t in ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT"):
        return "int64"
    if t in ("FLOAT", "DOUBLE", "REAL") or t.startswith("DECIMAL"):
        return "double"
    return "string"


def _system_filter(system: System) -> tuple[str, dict[str, Any]]:
    source = "completions" if system.run_id else "completions" + CURRENT_SUFFIX
    where = "prompt_id is not distinct from $prompt"
    params: dict[str, Any] = {"prompt": system.prompt_id}
    if system.run_id:
        where += " and run_id = $run"
        params["run"] = system.run_id
    return f"select * from {source} where {where}", params


def _latest_rows_sql(system: System, extra_where: str = "") -> tuple[str, dict[str, Any]]:
    rows, params = _system_filter(system)
    return (f"select * from ({rows}) {extra_where} qualify row_number() over (partition by document_id, page "
            f"order by created_at desc, run_id desc, manifest_row desc) = 1"), params


def find_systems(con: duckdb.DuckDBPyConnection, gold: GoldSet, run_ids: list[str] | None,
                 extraction_tables: dict[str, dict[str, str]]) -> tuple[list[System], list[str]]:
    """The systems to score: each named run's prompt ids (in the order given), or the current answers'.

    Args:
        con: a connection with the output's views.
        gold: the gold set.
        run_ids: runs to score; None or empty: the current answers.
        extraction_tables: the output's user extraction tables.

    Returns:
        ``(systems, notes)``; a note says why a system was left out.

    Raises:
        RunError: a named run has no completion rows in the output.
    """
    runs: list[tuple[str | None, list[str | None]]] = []
    if run_ids:
        for run_id in run_ids:
            found = con.execute("select distinct prompt_id from completions where run_id = $run order by prompt_id",
                                {"run": run_id}).fetchall()
            if not found:
                raise RunError(f"run {run_id} has no completion rows in the output")
            runs.append((run_id, [r[0] for r in found]))
    else:
        found = con.execute(f"select distinct prompt_id from completions{CURRENT_SUFFIX} order by prompt_id").fetchall()
        runs.append((None, [r[0] for r in found]))
    systems, notes = [], []
    for run_id, prompts in runs:
        for prompt_id in prompts:
            base = run_id or "current"
            label = base if len(prompts) == 1 else f"{base} {prompt_id}"
            if prompt_id == STRUCTURED_PROMPT:
                kind, tables = "structured", [t for t in gold.tables if t in BUILTIN_FIELDS]
            elif prompt_id in extraction_tables:
                kind, tables = "structured", [t for t in gold.tables if t == prompt_id]
            else:
                kind, tables = "free_text", list(gold.tables)
            if not tables:
                notes.append(f"{label}: left out, its prompt {prompt_id} fills none of the gold file's tables")
                continue
            system = System(label, run_id, prompt_id, kind, tables)
            rows, params = _system_filter(system)
            meta = con.execute(f"select any_value(model_name), any_value(params_json) from ({rows})", params).fetchone()
            system.model_name = meta[0]
            try:
                system.params = json.loads(meta[1]) if meta[1] else {}
            except ValueError:
                system.params = {}
            systems.append(system)
    return systems, notes


def load_answers(con: duckdb.DuckDBPyConnection, system: System) -> tuple[dict[tuple[str, int], Answer], dict[str, Answer]]:
    """The system's answers on the labelled documents (a registered ``_gold_documents`` relation).

    Args:
        con: a connection with the output's views and ``_gold_documents``.
        system: the system.

    Returns:
        ``(page answers by (document, page), document-level rows by document)`` (a document-level row: the
        file could not be fetched or opened).
    """
    sql, params = _latest_rows_sql(system, "where document_id in (select document_id from _gold_documents)")
    columns = "document_id, page, status, error_type, result_key, run_id, completion"
    pages, documents = {}, {}
    for row in con.execute(f"select {columns} from ({sql})", params).fetchall():
        answer = Answer(*row)
        if answer.page is None:
            documents[answer.document_id] = answer
        else:
            pages[(answer.document_id, int(answer.page))] = answer
    return pages, documents


def iter_items(con: duckdb.DuckDBPyConnection, system: System, table: str, gold_only: bool = True,
               batch_rows: int = 50_000) -> Iterator[dict[str, Any]]:
    """The extracted items of one table of a system, read a batch at a time (a big run is never held whole).

    Args:
        con: a connection with the output's views (and ``_gold_documents`` when ``gold_only``).
        system: the system.
        table: the table.
        gold_only: read only the labelled documents' rows.
        batch_rows: rows converted to Python at a time.

    Yields:
        Items (all columns, as dicts).
    """
    if table not in table_names_of(con):
        return
    source = table if system.run_id else table + CURRENT_SUFFIX
    where = ["run_id = $run"] if system.run_id else []
    if gold_only:
        where.append("document_id in (select document_id from _gold_documents)")
    sql = f"select * from {source}" + (" where " + " and ".join(where) if where else "") + " order by item_index"
    reader = con.sql(sql, params={"run": system.run_id} if system.run_id else {}).to_arrow_reader(batch_rows)
    for batch in reader:
        yield from batch.to_pylist()


def load_items(con: duckdb.DuckDBPyConnection, system: System, table: str,
               keys: set[tuple[str, str]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The extracted items of one table on the labelled documents, for the given answers, in item order.

    Args:
        con: a connection with the output's views and ``_gold_documents``.
        system: the system.
        table: the table.
        keys: ``(result_key, run_id)`` of the answers whose items are wanted.

    Returns:
        ``(result_key, run_id)`` -> items (all columns, as dicts).
    """
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    if not keys:
        return out
    for item in iter_items(con, system, table):
        key = (item["result_key"], item["run_id"])
        if key in keys:
            out.setdefault(key, []).append(item)
    return out


def document_types_from_manifests(con: duckdb.DuckDBPyConnection, storage: Storage, systems: list[System]) -> dict[str, str]:
    """Document types from a ``document_type`` column of the scored runs' manifests, where they have one.

    Args:
        con: a connection with the output's views.
        storage: reads the manifests.
        systems: the scored systems (their runs name the manifests; the current answers: every run's).

    Returns:
        Document id -> type; manifests that cannot be read or have no such column add nothing.
    """
    run_ids = sorted({s.run_id for s in systems if s.run_id})
    sql, params = "select distinct manifest_uri from runs where manifest_uri is not null", {}
    if all(s.run_id for s in systems):  # named runs: their manifests; the current answers: every run's
        sql, params = sql + " and list_contains($runs, run_id)", {"runs": run_ids}
    try:
        uris = [r[0] for r in con.execute(sql, params).fetchall()]
    except duckdb.Error:
        return {}
    types: dict[str, str] = {}
    for uri in uris:
        try:
            fmt = manifest_format(uri)
            frame = parse_table(storage.read_bytes(uri), fmt, uri)
        except Exception:  # an unknown format, an unreadable or moved manifest: no types from it
            continue
        if "document_type" not in frame.columns or "document_id" not in frame.columns:
            continue
        for doc, doc_type in frame.select(pl.col("document_id").cast(pl.Utf8), pl.col("document_type").cast(pl.Utf8)).iter_rows():
            if doc and doc_type and str(doc_type).strip():
                types.setdefault(str(doc).strip(), str(doc_type).strip())
    return types


# -- matching and counting ------------------------------------------------------------------------------


def field_kinds(gold: GoldSet, extraction_tables: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """The kind of every labelled field of every gold table (``matching.kind_of``).

    Args:
        gold: the gold set.
        extraction_tables: the output's user extraction tables and their field types.

    Returns:
        Table -> field -> kind.
    """
    return {table: {f: kind_of(f, extraction_tables.get(table, {}).get(f)) for f in fields}
            for table, fields in gold.fields.items()}


def match_table(gold: list[GoldItem], predicted: list[dict[str, Any]], key: str, kinds: dict[str, str],
                thresholds: Thresholds) -> TableMatch:
    """Pair one page's gold and extracted items of a table and count what is right.

    Args:
        gold: the gold items.
        predicted: the extracted items (dicts of their values).
        key: the field items are paired on.
        kinds: field -> kind.
        thresholds: the fuzzy thresholds.

    Returns:
        The pairs, the wrongly extracted fields of each pair, and the item counts.
    """
    key_kind = kinds.get(key, kind_of(key))
    scores = matching.similarity_matrix(key_kind, [g.values[key] for g in gold], [p.get(key) for p in predicted])
    pairs = matching.assign(scores, thresholds.of(key_kind)) if key_kind != "bool" else []
    wrong: dict[int, list[str]] = {}
    for gi, pj, _ in pairs:
        wrong[gi] = [f for f, v in gold[gi].values.items() if f != key
                     and not matching.values_match(kinds.get(f, kind_of(f)), v, predicted[pj].get(f), thresholds)]
    counts = Counts(len(pairs), len(predicted) - len(pairs), len(gold) - len(pairs))
    return TableMatch(gold, predicted, pairs, wrong, counts)


def count_fields(match: TableMatch, fields: list[str], key: str) -> dict[str, Counts]:
    """Per-field counts of one page and table (rules in the module docstring), and ``all_fields``.

    Args:
        match: the page's match.
        fields: the table's labelled fields.
        key: the key field (its counts are the items').

    Returns:
        Field -> counts.
    """
    out = {f: Counts() for f in fields}
    paired_gold = {gi: pj for gi, pj, _ in match.pairs}
    paired_pred = set(paired_gold.values())
    for gi, g in enumerate(match.gold):
        for f in g.values:
            if gi not in paired_gold:
                out[f].add(fn=1)
            elif f == key or f not in match.wrong_fields[gi]:
                out[f].add(tp=1)
            elif is_empty(match.predicted[paired_gold[gi]].get(f)):
                out[f].add(fn=1)
            else:
                out[f].add(fp=1, fn=1)
    for pj, p in enumerate(match.predicted):
        if pj not in paired_pred:
            for f in fields:
                if not is_empty(p.get(f)):
                    out[f].add(fp=1)
    exact = sum(1 for gi in paired_gold if not match.wrong_fields[gi])
    out[ALL_FIELDS] = Counts(exact, len(match.predicted) - exact, len(match.gold) - exact)
    return out


def item_validity(item: dict[str, Any], key: str, kinds: dict[str, str]) -> list[str]:
    """The fields of an extracted item that are not usable as they stand (``matching.valid_value``).

    Args:
        item: the extracted item.
        key: its table's key field (an empty key is invalid).
        kinds: field -> kind.

    Returns:
        The invalid fields (empty: valid).
    """
    bad = [key] if is_empty(item.get(key)) else []
    for f, kind in kinds.items():
        value = item.get(f)
        if f != key and not is_empty(value) and not matching.valid_value(kind, value):
            bad.append(f)
    return bad


def score_system(system: System, gold: GoldSet, answers: dict[tuple[str, int], Answer], document_answers: dict[str, Answer],
                 items: dict[str, dict[tuple[str, str], list[dict[str, Any]]]], kinds: dict[str, dict[str, str]],
                 document_types: dict[str, str], options: EvalOptions) -> SystemScores:
    """Score one system on every labelled page.

    Args:
        system: the system.
        gold: the gold set.
        answers: its page answers (``load_answers``).
        document_answers: its document-level rows.
        items: table -> ``(result_key, run_id)`` -> extracted items.
        kinds: table -> field -> kind.
        document_types: document -> type.
        options: the evaluation's options.

    Returns:
        The scores (calibration and review are added by ``calibrate``).
    """
    thresholds = Thresholds(options.name_threshold, options.text_threshold, options.mention_threshold)
    documents = gold.documents
    doc_index = {d: i for i, d in enumerate(documents)}
    per_document = {t: np.zeros((len(documents), 3), dtype=np.int64) for t in [ALL] + system.tables}
    tables = {t: Counts() for t in [ALL] + system.tables}
    fields: dict[tuple[str, str], Counts] = {}
    doc_types: dict[tuple[str, str], Counts] = {}
    pages: dict[str, list[int]] = {}
    results = []
    for document_id, page in gold.pages:
        answer = answers.get((document_id, page)) or document_answers.get(document_id)
        if answer is None and not any(gold.items_of(document_id, page, t) for t in system.tables):
            continue  # neither asked of this system nor labelled for its tables (another prompt's page)
        status = answer.status if answer is not None else "missing"
        result = PageResult(document_id, page, status, answer.error_type if answer else None)
        if system.kind == "free_text" and status == "ok":
            result.completion = answer.completion
        gold_on_page = 0
        for table in system.tables:
            golds = gold.items_of(document_id, page, table)
            gold_on_page += len(golds)
            if system.kind == "structured":
                predicted = items.get(table, {}).get((answer.result_key, answer.run_id), []) if status == "ok" else []
                match = match_table(golds, predicted, gold.keys[table], kinds[table], thresholds)
                result.tables[table] = match
                got = match.counts
                for f, c in count_fields(match, gold.fields[table], gold.keys[table]).items():
                    fields.setdefault((table, f), Counts()).add(c.tp, c.fp, c.fn)
            else:
                text = matching.normalize(answer.completion) if status == "ok" else ""
                found = [(g, matching.mentioned(g.values[gold.keys[table]], text, thresholds.mention)) for g in golds]
                result.mentions[table] = found
                hits = sum(1 for _, hit in found if hit)
                got = Counts(hits, 0, len(found) - hits)
            result.counts.add(got.tp, got.fp, got.fn)
            for target in (table, ALL):
                tables[target].add(got.tp, got.fp, got.fn)
                per_document[target][doc_index[document_id]] += (got.tp, got.fp, got.fn)
                doc_type = document_types.get(document_id)
                if doc_type:
                    doc_types.setdefault((doc_type, target), Counts()).add(got.tp, got.fp, got.fn)
        counted = pages.setdefault(status if status in NO_ANSWER else "ok", [0, 0])
        counted[0] += 1
        counted[1] += gold_on_page
        results.append(result)
    return SystemScores(system, tables, fields, doc_types, per_document, pages, results)


# -- uncertainty ----------------------------------------------------------------------------------------


def bootstrap_weights(documents: int, samples: int, seed: int) -> np.ndarray | None:
    """How often each document is drawn in each bootstrap resample (the same for every system: paired).

    Args:
        documents: how many documents there are.
        samples: resamples.
        seed: the generator's seed.

    Returns:
        A ``samples x documents`` matrix of counts (each row sums to ``documents``), or None for none.
    """
    if samples <= 0 or documents <= 0:
        return None
    rng = np.random.default_rng(seed)
    return rng.multinomial(documents, np.full(documents, 1.0 / documents), size=samples)


def metric_samples(weights: np.ndarray, counts: np.ndarray, metric: str) -> np.ndarray:
    """A metric over each bootstrap resample.

    Args:
        weights: ``bootstrap_weights``.
        counts: documents x (tp, fp, fn).
        metric: precision, recall or f1.

    Returns:
        One value per resample (NaN where undefined).
    """
    totals = weights @ counts.astype(np.float64)
    tp, fp, fn = totals[:, 0], totals[:, 1], totals[:, 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "precision":
            return tp / (tp + fp)
        if metric == "recall":
            return tp / (tp + fn)
        return 2 * tp / (2 * tp + fp + fn)


def interval(samples: np.ndarray) -> tuple[float | None, float | None]:
    """The 95% percentile interval of bootstrap samples.

    Args:
        samples: the values (NaN ignored).

    Returns:
        ``(2.5th, 97.5th percentile)``, or ``(None, None)`` when no sample is defined.
    """
    finite = samples[~np.isnan(samples)]
    if finite.size == 0:
        return None, None
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


def _metric_value(counts: Counts, metric: str) -> float | None:
    return getattr(counts, metric)


def compare(systems: list[SystemScores], weights: np.ndarray | None) -> list[dict[str, Any]]:
    """Each system against the first one of the same kind scored on the same tables: the difference of each metric
    and its paired interval.

    Args:
        systems: the scored systems, in order.
        weights: ``bootstrap_weights`` (None: no intervals).

    Returns:
        Rows: baseline, system, table, metric, baseline and system values, difference, interval.
    """
    out = []
    groups: dict[tuple[str, tuple[str, ...]], list[SystemScores]] = {}
    for s in systems:  # comparable: the same kind of answer, scored on the same tables
        groups.setdefault((s.system.kind, tuple(s.system.tables)), []).append(s)
    for (kind, _), group in groups.items():
        metrics = ("precision", "recall", "f1") if kind == "structured" else ("recall",)
        if len(group) < 2:
            continue
        base = group[0]
        for other in group[1:]:
            for table in [ALL] + base.system.tables:
                for metric in metrics:
                    a, b = _metric_value(base.tables[table], metric), _metric_value(other.tables[table], metric)
                    low = high = None
                    if weights is not None:
                        diff = (metric_samples(weights, other.per_document[table], metric)
                                - metric_samples(weights, base.per_document[table], metric))
                        low, high = interval(diff)
                    out.append({"baseline": base.system.label, "system": other.system.label, "kind": kind,
                                "table": table, "metric": metric, "baseline_value": a, "system_value": b,
                                "difference": None if a is None or b is None else b - a, "ci_low": low, "ci_high": high})
    return out


# -- calibration and review -----------------------------------------------------------------------------


def calibrate(scores: SystemScores, gold: GoldSet, kinds: dict[str, dict[str, str]], options: EvalOptions) -> None:
    """Add the calibration table and the review threshold to a structured system's scores.

    Items considered: those extracted on labelled answered pages. An item is right when it is paired and every
    labelled field matches (``all_fields``); it is valid when ``item_validity`` finds nothing.

    Args:
        scores: the system's scores (changed in place: ``calibration`` and ``review``).
        gold: the gold set.
        kinds: table -> field -> kind.
        options: target precision, review threshold and bins.
    """
    items = []  # (confidence, right, valid)
    for result in scores.page_results:
        for table, match in result.tables.items():
            right = match.right_items()
            for pj, item in enumerate(match.predicted):
                valid = not item_validity(item, gold.keys[table], kinds[table])
                items.append((item.get("confidence"), pj in right, valid))
    bins = options.confidence_bins
    rows = []
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = [(c, r) for c, r, _ in items if c is not None and (low <= c < high or (b == bins - 1 and c == high))]
        rows.append({"bin_low": low, "bin_high": high, "n": len(inside),
                     "correct": sum(1 for _, r in inside if r),
                     "accuracy": (sum(1 for _, r in inside if r) / len(inside)) if inside else None,
                     "mean_confidence": (sum(c for c, _ in inside) / len(inside)) if inside else None})
    unknown = [r for c, r, _ in items if c is None]
    if unknown:
        rows.append({"bin_low": None, "bin_high": None, "n": len(unknown), "correct": sum(unknown),
                     "accuracy": sum(unknown) / len(unknown), "mean_confidence": None})
    scores.calibration = rows

    with_confidence = [(c, r, v) for c, r, v in items if c is not None]
    mode = "confidence" if with_confidence else "validity"
    suggested = None
    if with_confidence:
        for t in sorted({c for c, _, _ in with_confidence}):
            accepted = [r for c, r, v in with_confidence if c >= t and v]
            if accepted and sum(accepted) / len(accepted) >= options.target_precision:
                suggested = t
                break
    threshold = options.review_threshold if options.review_threshold is not None else suggested
    if mode == "confidence":
        accepted = [r for c, r, v in items if v and c is not None and threshold is not None and c >= threshold]
    else:
        accepted = [r for _, r, v in items if v]
    scores.review = {
        "mode": mode, "target_precision": options.target_precision, "suggested_threshold": suggested,
        "threshold": threshold, "items_total": len(items), "items_accepted": len(accepted),
        "precision_accepted": (sum(accepted) / len(accepted)) if accepted else None,
        "coverage": (len(accepted) / len(items)) if items else None,
    }


def review_rows(con: duckdb.DuckDBPyConnection, scores: SystemScores, gold: GoldSet, kinds: dict[str, dict[str, str]],
                eval_id: str) -> list[dict[str, Any]]:
    """The review list of a structured system over every page of it (labelled or not).

    An item goes to review when its confidence is below the threshold (``low_confidence``; every item when no
    threshold reaches the target: ``no_safe_threshold``; an item without a confidence: ``no_confidence``) or
    when a value is not usable (``invalid:<fields>``); without confidences (``validity`` mode) only the latter.
    A page without an answer goes to review as one row (``no_answer:<status>``).

    Args:
        con: a connection with the output's views.
        scores: the system's scores, calibrated.
        gold: the gold set (items on labelled pages get ``gold_status`` right or wrong, others ``unlabelled``).
        kinds: table -> field -> kind.
        eval_id: the evaluation's id.

    Returns:
        Rows of the ``review`` table.
    """
    system, review = scores.system, scores.review
    verdict: dict[tuple[str, str, str, int], str] = {}
    for result in scores.page_results:
        for table, match in result.tables.items():
            right = match.right_items()
            for pj, item in enumerate(match.predicted):
                verdict[(item["result_key"], item["run_id"], table, item["item_index"])] = (
                    "right" if pj in right else "wrong")
    base = {"eval_id": eval_id, "system": system.label}
    out = []
    labelled = {d for d, _ in gold.pages}
    sql, params = _latest_rows_sql(system)
    answered: set[tuple[str, str]] = set()
    for row in con.sql(f"select document_id, page, status, result_key, run_id, patient_id, encounter_id from ({sql})",
                       params=params).to_arrow_table().to_pylist():
        if row["status"] == "ok":
            answered.add((row["result_key"], row["run_id"]))
            continue
        out.append(dict(base, run_id=row["run_id"], result_key=row["result_key"], document_id=row["document_id"],
                        page=row["page"], patient_id=row["patient_id"], encounter_id=row["encounter_id"],
                        table_name=None, item_index=None, confidence=None, reason=f"no_answer:{row['status']}",
                        gold_status="labelled" if row["document_id"] in labelled else "unlabelled",
                        page_status=row["status"], item_json=None))
    threshold = review["threshold"]
    for table in system.tables:
        key = gold.keys[table]
        for item in iter_items(con, system, table, gold_only=False):
            if (item["result_key"], item["run_id"]) not in answered:
                continue
            reasons = []
            confidence = item.get("confidence")
            if review["mode"] == "confidence":
                if confidence is None:
                    reasons.append("no_confidence")
                elif threshold is None:
                    reasons.append("no_safe_threshold")
                elif confidence < threshold:
                    reasons.append("low_confidence")
            bad = item_validity(item, key, kinds[table])
            if bad:
                reasons.append("invalid:" + ",".join(bad))
            if not reasons:
                continue
            values = {k: v for k, v in item.items() if k not in ITEM_COLUMNS}
            out.append(dict(base, run_id=item["run_id"], result_key=item["result_key"],
                            document_id=item["document_id"], page=item["page"], patient_id=item.get("patient_id"),
                            encounter_id=item.get("encounter_id"), table_name=table, item_index=item["item_index"],
                            confidence=confidence, reason=";".join(reasons),
                            gold_status=verdict.get((item["result_key"], item["run_id"], table, item["item_index"]),
                                                    "unlabelled"),
                            page_status="ok", item_json=json.dumps(values, sort_keys=True, default=str)))
    return out


# -- the whole evaluation -------------------------------------------------------------------------------


def evaluate(output: str, gold_uri: str, storage: Storage, run_ids: list[str] | None = None,
             options: EvalOptions | dict[str, Any] | None = None, eval_id: str | None = None,
             now: datetime | None = None) -> Evaluation:
    """Score an output's answers against a gold file (module docstring); nothing is written.

    Args:
        output: the output folder or ``s3://`` prefix.
        gold_uri: the gold file.
        storage: reads both.
        run_ids: the runs to score, in order (the first is the baseline of the comparison); None: the current answers.
        options: the evaluation's options.
        eval_id: the evaluation's id (default: a new one).
        now: the evaluation's time (default: now).

    Returns:
        The evaluation, with the rows of the ``evals`` and ``review`` tables.

    Raises:
        RunError: a bad gold file (naming the rows), an output without completions, an unknown run.
    """
    from medvlm_core.output.results import utc_now
    from medvlm_core.run.context import make_run_id

    options = EvalOptions.parse(options)
    now = now or utc_now()
    eval_id = eval_id or make_run_id(now)
    output = st.normalize(output)
    con = duckdb.connect()
    try:
        con.execute("set parquet_metadata_cache = true")
        register_views(con, output, storage, current=not run_ids)
        if "completions" not in table_names_of(con):
            raise RunError(f"output {output}: no completions table (no published run)")
        extraction = _extraction_tables(con)
        user_tables = {t: list(cols) for t, cols in extraction.items() if t not in BUILTIN_FIELDS}
        gold = load_gold(gold_uri, storage, tables=user_tables, keys=options.key_fields)
        con.register("_gold_documents", pa.table({"document_id": gold.documents}))
        systems, notes = find_systems(con, gold, run_ids, extraction)
        if not systems:
            raise RunError("nothing to score: " + ("; ".join(notes) or "no answers in the output"))
        doc_types = dict(document_types_from_manifests(con, storage, systems), **gold.document_types)
        kinds = field_kinds(gold, extraction)
        weights = bootstrap_weights(len(gold.documents), options.bootstrap_samples, options.seed)
        scored: list[SystemScores] = []
        review: list[dict[str, Any]] = []
        for system in systems:
            answers, document_answers = load_answers(con, system)
            keys = {(a.result_key, a.run_id) for a in answers.values() if a.status == "ok"}
            items = {t: load_items(con, system, t, keys) for t in system.tables} if system.kind == "structured" else {}
            scores = score_system(system, gold, answers, document_answers, items, kinds, doc_types, options)
            metric = "f1" if system.kind == "structured" else "recall"
            if weights is not None:
                scores.intervals = {t: interval(metric_samples(weights, c, metric)) for t, c in scores.per_document.items()}
            if system.kind == "structured":
                calibrate(scores, gold, kinds, options)
                review += review_rows(con, scores, gold, kinds, eval_id)
            scored.append(scores)
        comparisons = compare(scored, weights)
    finally:
        con.close()
    evaluation = Evaluation(eval_id, now, output, gold, scored, comparisons, options, notes=notes)
    evaluation.rows = eval_rows(evaluation)
    evaluation.review_rows = review
    return evaluation


def eval_rows(evaluation: Evaluation) -> list[dict[str, Any]]:
    """Every score of an evaluation as rows of the ``evals`` table (``EVALS_SCHEMA``; no item text).

    Args:
        evaluation: the evaluation.

    Returns:
        The rows: sections table, mentions, field, document_type, pages, calibration, review, comparison.
    """
    runs = ",".join(dict.fromkeys(s.system.run_id or "current" for s in evaluation.systems))
    base = {"eval_id": evaluation.eval_id, "created_at": evaluation.created_at, "gold_uri": evaluation.gold.uri,
            "gold_sha256": evaluation.gold.sha256, "scored_runs": runs}
    rows: list[dict[str, Any]] = []

    def add(scores: SystemScores | None, section: str, **values: Any) -> None:
        row = dict({name: None for name in EVALS_SCHEMA.names}, **base, section=section)
        if scores is not None:
            s = scores.system
            row.update(system=s.label, run_id=s.run_id, prompt_id=s.prompt_id, kind=s.kind)
        row.update(values)
        rows.append(row)

    def counted(c: Counts, structured: bool) -> dict[str, Any]:
        return {"tp": c.tp, "fp": c.fp if structured else None, "fn": c.fn, "n": c.tp + c.fn,
                "precision": c.precision if structured else None, "recall": c.recall,
                "f1": c.f1 if structured else None}

    for scores in evaluation.systems:
        structured = scores.system.kind == "structured"
        metric = "f1" if structured else "recall"
        for table in [ALL] + scores.system.tables:
            counts = scores.tables[table]
            low, high = scores.intervals.get(table, (None, None))
            add(scores, "table" if structured else "mentions", table_name=table, metric=metric,
                value=getattr(counts, metric), ci_low=low, ci_high=high, **counted(counts, structured))
        for (table, f), counts in sorted(scores.fields.items()):
            add(scores, "field", table_name=table, field=f, metric="f1", value=counts.f1, **counted(counts, True))
        for (doc_type, table), counts in sorted(scores.document_types.items()):
            add(scores, "document_type", table_name=table, document_type=doc_type, metric=metric,
                value=getattr(counts, metric), **counted(counts, structured))
        for status, (pages, items) in sorted(scores.pages.items()):
            add(scores, "pages", field=status, metric="pages", value=float(pages), n=pages, fn=items)
        for b in scores.calibration:
            add(scores, "calibration", metric="accuracy", value=b["accuracy"], n=b["n"], tp=b["correct"],
                bin_low=b["bin_low"], bin_high=b["bin_high"], accuracy=b["accuracy"], mean_confidence=b["mean_confidence"])
        if scores.review:
            r = scores.review
            for name in ("target_precision", "suggested_threshold", "threshold", "precision_accepted", "coverage",
                         "items_total", "items_accepted"):
                value = r[name]
                add(scores, "review", field=r["mode"], metric=name, value=None if value is None else float(value))
    by_label = {s.system.label: s for s in evaluation.systems}
    for c in evaluation.comparisons:
        add(by_label[c["system"]], "comparison", baseline=c["baseline"], table_name=c["table"], metric=c["metric"] + "_difference",
            value=c["difference"], ci_low=c["ci_low"], ci_high=c["ci_high"], n=len(evaluation.gold.documents))
    for row in rows:
        for name in ("value", "ci_low", "ci_high", "precision", "recall", "f1", "accuracy", "mean_confidence"):
            if isinstance(row.get(name), float) and math.isnan(row[name]):
                row[name] = None
    return rows


def evals_table(evaluation: Evaluation) -> pa.Table:
    """The ``evals`` rows as an Arrow table.

    Args:
        evaluation: the evaluation.

    Returns:
        The table (``EVALS_SCHEMA``).
    """
    return pa.Table.from_pylist([{n: r.get(n) for n in EVALS_SCHEMA.names} for r in evaluation.rows], schema=EVALS_SCHEMA)


def review_table(evaluation: Evaluation) -> pa.Table:
    """The ``review`` rows as an Arrow table.

    Args:
        evaluation: the evaluation.

    Returns:
        The table (``REVIEW_SCHEMA``).
    """
    return pa.Table.from_pylist([{n: r.get(n) for n in REVIEW_SCHEMA.names} for r in evaluation.review_rows],
                                schema=REVIEW_SCHEMA)


def write_evaluation(evaluation: Evaluation, storage: Storage, report_html: str | None = None) -> dict[str, str]:
    """Write the ``evals`` and ``review`` tables (one file each) and the HTML report into the output.

    Args:
        evaluation: the evaluation.
        storage: writes the output.
        report_html: the report's HTML (None: no report file).

    Returns:
        What was written: ``evals``, ``review`` (and ``report``) -> URL.
    """
    from medvlm_core.output.paths import OutputLayout
    from medvlm_core.output.results import write_parquet

    layout = OutputLayout.of(evaluation.output)
    day = f"{evaluation.created_at:%Y-%m-%d}"
    written = {}
    for name, table in (("evals", evals_table(evaluation)), ("review", review_table(evaluation))):
        url = layout.table_part(name, day, evaluation.eval_id)
        write_parquet(storage, url, table)
        written[name] = url
    if report_html is not None:
        url = layout.eval_report(evaluation.eval_id)
        storage.write_bytes_atomic(url, report_html.encode("utf-8"))
        written["report"] = url
    return written


def headline_markdown(evaluation: Evaluation) -> str:
    """The headline table and the comparisons as markdown (scores only: the artifact and the CLI show it).

    Args:
        evaluation: the evaluation.

    Returns:
        Markdown text.
    """
    def fmt(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}"

    lines = [f"medvlm eval `{evaluation.eval_id}`: gold `{evaluation.gold.sha256[:12]}` "
             f"({len(evaluation.gold.pages)} pages, {len(evaluation.gold.items)} items, "
             f"{len(evaluation.gold.documents)} documents)", "",
             "| run | table | precision | recall | F1 | 95% CI | gold items | pages without answer |",
             "|---|---|---|---|---|---|---|---|"]
    for r in evaluation.headline():
        ci = "–" if r["ci_low"] is None else f"{r['ci_low']:.3f} to {r['ci_high']:.3f}"
        lines.append(f"| {r['system']} | {r['table']} | {fmt(r['precision'])} | {fmt(r['recall'])} | {fmt(r['f1'])} "
                     f"| {ci} | {r['gold_items']} | {r['pages_without_answer']} |")
    if evaluation.comparisons:
        lines += ["", "| run | vs | table | metric | difference | 95% CI |", "|---|---|---|---|---|---|"]
        for c in evaluation.comparisons:
            if c["table"] != ALL:
                continue
            ci = "–" if c["ci_low"] is None else f"{c['ci_low']:+.3f} to {c['ci_high']:+.3f}"
            diff = "–" if c["difference"] is None else f"{c['difference']:+.3f}"
            lines.append(f"| {c['system']} | {c['baseline']} | {c['table']} | {c['metric']} | {diff} | {ci} |")
    for scores in evaluation.systems:
        r = scores.review
        if r:
            threshold = "none reaches it" if r["suggested_threshold"] is None else f"{r['suggested_threshold']:.3f}"
            lines.append("")
            lines.append(f"{scores.system.label}: review by {r['mode']}; threshold for precision "
                         f"{r['target_precision']:.2f}: {threshold}")
    return "\n".join(lines)

