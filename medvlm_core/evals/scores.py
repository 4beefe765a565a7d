"""The scores of one system (counts per table, field and document type, page results) and how they are counted:
gold and extracted items paired on their key field, each labelled field checked (rules in
``medvlm_core.evals.scoring``); ``Evaluation`` holds every system's scores."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from medvlm_core.evals import matching
from medvlm_core.evals.answers import Answer, System
from medvlm_core.evals.gold import DOCUMENT_PAGE, GoldItem, GoldSet
from medvlm_core.evals.matching import Thresholds, kind_of
from medvlm_core.evals.normalize import is_empty, normalize, valid_value
from medvlm_core.evals.options import EvalOptions

ALL = "all"
ALL_FIELDS = "all_fields"
NO_ANSWER = ("error", "truncated", "missing")


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
    """Per-field counts of one page and table (rules in ``medvlm_core.evals.scoring``'s docstring), and ``all_fields``.

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
        if f != key and not is_empty(value) and not valid_value(kind, value):
            bad.append(f)
    return bad


def document_answer(document_id: str, pages: list[Answer],
                    document_answers: dict[str, Answer]) -> tuple[Answer | None, list[Answer]]:
    """The answer a gold row labelling a whole document is scored against, and the answers holding its items.

    A document-level row (a document-scope answer, or a file that could not be opened) is that answer. Without
    one (a page-scope run), the document's page answers together are: ok when every page is, its text their
    texts in page order, its items all of theirs.

    Args:
        document_id: the document.
        pages: the system's page answers of the document, in page order.
        document_answers: the system's document-level rows by document.

    Returns:
        ``(answer or None when the document has none, the answers whose items count)``.
    """
    whole = document_answers.get(document_id)
    if whole is not None:
        return whole, [whole]
    if not pages:
        return None, []
    failed = next((p for p in pages if p.status != "ok"), None)
    text = "\n\n".join(p.completion or "" for p in pages)
    merged = Answer(document_id, DOCUMENT_PAGE, failed.status if failed else "ok", failed.error_type if failed else None,
                    None, None, text)
    return merged, pages


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
    by_document: dict[str, list[Answer]] = {}
    for (document_id, _), answer in sorted(answers.items()):
        by_document.setdefault(document_id, []).append(answer)
    for document_id, page in gold.pages:
        if page == DOCUMENT_PAGE:
            answer, parts = document_answer(document_id, by_document.get(document_id, []), document_answers)
        else:
            answer = answers.get((document_id, page)) or document_answers.get(document_id)
            parts = [answer] if answer is not None else []
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
                predicted = [item for part in parts for item in items.get(table, {}).get((part.result_key, part.run_id), [])
                             ] if status == "ok" else []
                match = match_table(golds, predicted, gold.keys[table], kinds[table], thresholds)
                result.tables[table] = match
                got = match.counts
                for f, c in count_fields(match, gold.fields[table], gold.keys[table]).items():
                    fields.setdefault((table, f), Counts()).add(c.tp, c.fp, c.fn)
            else:
                text = normalize(answer.completion) if status == "ok" else ""
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
