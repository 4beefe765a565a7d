"""The ``evals`` and ``review`` tables an evaluation writes into the output (their rows, Arrow tables and files)
and the headline markdown the CLI and the flow's artifact show."""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa

from medvlm_core.evals.scores import ALL, Counts, Evaluation, SystemScores
from medvlm_core.output.tables import EVALS, REVIEW
from medvlm_core.storage import Storage

# Derived from the tables' one definition (``medvlm_core.output.tables``).
EVALS_SCHEMA = EVALS.arrow_schema()
REVIEW_SCHEMA = REVIEW.arrow_schema()


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
    return EVALS.rows_to_arrow(evaluation.rows)


def review_table(evaluation: Evaluation) -> pa.Table:
    """The ``review`` rows as an Arrow table.

    Args:
        evaluation: the evaluation.

    Returns:
        The table (``REVIEW_SCHEMA``).
    """
    return REVIEW.rows_to_arrow(evaluation.review_rows)


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
