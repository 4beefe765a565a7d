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

The parts: ``answers`` (reading the output), ``scores`` (pairing and counting), ``bootstrap`` (intervals and
comparisons), ``calibration``, ``review`` (the review list) and ``tables`` (the ``evals`` and ``review`` tables);
``evaluate`` here puts them together.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import duckdb
import pyarrow as pa

from medvlm_core import storage as st
from medvlm_core.analytics import register_views, table_names_of
from medvlm_core.errors import RunError
from medvlm_core.evals.answers import (
    document_types_from_manifests,
    extraction_tables_of,
    find_systems,
    load_answers,
    load_items,
)
from medvlm_core.evals.bootstrap import bootstrap_weights, compare, interval, metric_samples
from medvlm_core.evals.calibration import calibrate
from medvlm_core.evals.gold import BUILTIN_FIELDS, load_gold
from medvlm_core.evals.options import EvalOptions
from medvlm_core.evals.review import review_rows
from medvlm_core.evals.scores import Evaluation, SystemScores, field_kinds, score_system
from medvlm_core.evals.tables import eval_rows
from medvlm_core.storage import Storage


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
        extraction = extraction_tables_of(con)
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
