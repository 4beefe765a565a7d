"""The evaluation's HTML report: one self-contained file (inline CSS, plots embedded as base64 PNG).

The plots are drawn with matplotlib's object API (``matplotlib.figure.Figure``, the Agg renderer), never pyplot,
so making a report changes no global matplotlib state in the caller's process. The report is a file in the
output that a person opens; unlike logs and artifacts it shows the gold and extracted items of the worst pages.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

from medvlm_core.evals.answers import ITEM_COLUMNS
from medvlm_core.evals.scores import ALL_FIELDS, NO_ANSWER, Evaluation, PageResult, SystemScores

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px 36px; color: #1d2330; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #d5d9e0; }
h3 { font-size: 15px; margin-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0 12px 0; font-size: 13px; }
th, td { border: 1px solid #d5d9e0; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f2f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.meta { color: #5a6270; font-size: 13px; } .note { background: #fff8e1; border: 1px solid #f0d98a; padding: 6px 10px;
  font-size: 13px; margin: 8px 0; } .right { color: #1b7f3b; } .wrong { color: #b3261e; } .miss { color: #8a5a00; }
img { max-width: 100%; } code { font-size: 12px; }
"""

_COLORS = ["#3b6fb6", "#e07b39", "#4aa564", "#a05db5", "#c9a227", "#5bb5c9", "#d0587e", "#7a7a7a"]


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode("ascii")}">'


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def score_bars(evaluation: Evaluation) -> str | None:
    """Per-table and per-field bars (F1 for structured runs, mention recall for free text), one colour per run.

    Args:
        evaluation: the evaluation.

    Returns:
        An ``<img>`` tag, or None when nothing was scored.
    """
    from matplotlib.figure import Figure

    labels: list[str] = []
    for scores in evaluation.systems:
        for table in scores.system.tables:
            for name in [f"{table}: items"] + [f"{table}: {f}" for t, f in sorted(scores.fields) if t == table]:
                if name not in labels:
                    labels.append(name)
    if not labels:
        return None
    height = max(3.0, 0.28 * len(labels) * max(1, len(evaluation.systems)) + 1.2)
    fig = Figure(figsize=(9, height))
    ax = fig.subplots()
    n = len(evaluation.systems)
    bar = 0.8 / n
    for k, scores in enumerate(evaluation.systems):
        values = []
        for name in labels:
            table, part = name.split(": ", 1)
            counts = scores.tables.get(table) if part == "items" else scores.fields.get((table, part))
            metric = "f1" if scores.system.kind == "structured" else "recall"
            value = getattr(counts, metric) if counts is not None else None
            values.append(value if value is not None else 0.0)
        positions = [i + k * bar for i in range(len(labels))]
        kind = "F1" if scores.system.kind == "structured" else "mention recall"
        ax.barh(positions, values, height=bar, color=_COLORS[k % len(_COLORS)], label=f"{scores.system.label} ({kind})")
    ax.set_yticks([i + bar * (n - 1) / 2 for i in range(len(labels))])
    ax.set_yticklabels([name.replace(": items", " (items)") for name in labels], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("score (0 to 1)")
    ax.set_title("Scores per table and field")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def calibration_plot(evaluation: Evaluation) -> str | None:
    """The calibration curve of each structured run with confidences: share right against mean confidence per bin.

    Args:
        evaluation: the evaluation.

    Returns:
        An ``<img>`` tag, or None when no run has confidences.
    """
    from matplotlib.figure import Figure

    curves = [(s, [b for b in s.calibration if b["bin_low"] is not None and b["n"]]) for s in evaluation.systems]
    curves = [(s, bins) for s, bins in curves if bins]
    if not curves:
        return None
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=1, label="perfectly calibrated")
    for k, (scores, bins) in enumerate(curves):
        xs = [b["mean_confidence"] for b in bins]
        ys = [b["accuracy"] for b in bins]
        sizes = [20 + 180 * b["n"] / max(x["n"] for x in bins) for b in bins]
        color = _COLORS[k % len(_COLORS)]
        ax.plot(xs, ys, color=color, linewidth=1.5, label=scores.system.label)
        ax.scatter(xs, ys, s=sizes, color=color, alpha=0.7)
        threshold = scores.review.get("threshold")
        if threshold is not None:
            ax.axvline(threshold, color=color, linestyle=":", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("mean confidence in the bin")
    ax.set_ylabel("share of items right (all fields)")
    ax.set_title("Calibration (marker size: items; dotted: review threshold)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def comparison_plot(evaluation: Evaluation) -> str | None:
    """The differences to the baseline (all tables), with their bootstrap intervals.

    Args:
        evaluation: the evaluation.

    Returns:
        An ``<img>`` tag, or None without comparisons.
    """
    from matplotlib.figure import Figure

    rows = [c for c in evaluation.comparisons if c["difference"] is not None]
    if not rows:
        return None
    fig = Figure(figsize=(8, max(2.5, 0.35 * len(rows) + 1)))
    ax = fig.subplots()
    labels = [f"{c['system']} vs {c['baseline']}: {c['table']} {c['metric']}" for c in rows]
    ys = list(range(len(rows)))
    diffs = [c["difference"] for c in rows]
    low = [c["difference"] - c["ci_low"] if c["ci_low"] is not None else 0 for c in rows]
    high = [c["ci_high"] - c["difference"] if c["ci_high"] is not None else 0 for c in rows]
    ax.errorbar(diffs, ys, xerr=[low, high], fmt="o", color=_COLORS[0], capsize=3)
    ax.axvline(0, color="#999999", linewidth=1)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("difference (run minus baseline), 95% bootstrap interval")
    ax.set_title("Comparison")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested run parameters as ``generation.max_tokens``-style keys, so that only the leaves that differ show."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _values(values: dict[str, Any]) -> str:
    return "; ".join(f"{_e(k)}: <b>{_e(v)}</b>" for k, v in values.items() if v not in (None, ""))


def _item_values(item: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    return {f: item.get(f) for f in fields if item.get(f) not in (None, "")}


def worst_pages(scores: SystemScores, evaluation: Evaluation) -> list[PageResult]:
    """The system's worst labelled pages: lowest F1 (or recall) first, then most errors.

    Args:
        scores: the system's scores.
        evaluation: the evaluation (its ``worst_pages`` option).

    Returns:
        Up to ``worst_pages`` pages; pages where nothing was labelled nor extracted are left out.
    """
    def badness(r: PageResult) -> tuple[float, int]:
        value = r.counts.f1 if scores.system.kind == "structured" else r.counts.recall
        return (value if value is not None else 1.0, -(r.counts.fp + r.counts.fn))

    candidates = [r for r in scores.page_results if r.counts.tp + r.counts.fp + r.counts.fn]
    return sorted(candidates, key=badness)[: evaluation.options.worst_pages]


def _page_section(result: PageResult, scores: SystemScores, evaluation: Evaluation) -> str:
    gold = evaluation.gold
    status = _e(result.status) + (f" ({_e(result.error_type)})" if result.error_type else "")
    value = result.counts.f1 if scores.system.kind == "structured" else result.counts.recall
    parts = [f"<h3>{_e(result.document_id)} page {result.page}: {status}, "
             f"{'F1' if scores.system.kind == 'structured' else 'recall'} {_num(value)}</h3>"]
    rows = []
    if scores.system.kind == "structured":
        for table, match in result.tables.items():
            fields = gold.fields.get(table, [])
            paired = {gi: pj for gi, pj, _ in match.pairs}
            for gi, g in enumerate(match.gold):
                if gi in paired:
                    p = match.predicted[paired[gi]]
                    wrong = match.wrong_fields[gi]
                    verdict = ('<span class="right">right</span>' if not wrong else
                               '<span class="wrong">wrong: ' + _e(", ".join(wrong)) + "</span>")
                    rows.append([_e(table), _values(g.values), _values(_item_values(p, fields)), verdict])
                else:
                    rows.append([_e(table), _values(g.values), "", '<span class="miss">missed</span>'])
            for pj, p in enumerate(match.predicted):
                if pj not in paired.values():
                    rows.append([_e(table), "", _values(_item_values(p, fields) or _item_values(p, [k for k in p if k not in ITEM_COLUMNS])),
                                 '<span class="wrong">not in gold</span>'])
        parts.append(_table(["table", "gold item", "extracted item", "verdict"], rows) if rows else
                     "<p class='meta'>no items</p>")
    else:
        for table, found in result.mentions.items():
            for g, hit in found:
                rows.append([_e(table), _values(g.values), '<span class="right">mentioned</span>' if hit else
                             '<span class="miss">not mentioned</span>'])
        parts.append(_table(["table", "gold item", "in the answer"], rows))
        if result.completion:
            text = result.completion[:600] + (" ..." if len(result.completion) > 600 else "")
            parts.append(f"<p class='meta'>answer: <code>{_e(text)}</code></p>")
    return "\n".join(parts)


def render_report(evaluation: Evaluation, review_counts: dict[str, int] | None = None) -> str:
    """The report as one HTML document.

    Args:
        evaluation: the evaluation.
        review_counts: system label -> rows it has in the review table (default: counted from the evaluation).

    Returns:
        The HTML text.
    """
    if review_counts is None:
        review_counts = {}
        for r in evaluation.review_rows:
            review_counts[r["system"]] = review_counts.get(r["system"], 0) + 1
    gold = evaluation.gold
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>medvlm eval {_e(evaluation.eval_id)}</title>"
           f"<style>{_CSS}</style></head><body>",
           f"<h1>medvlm evaluation {_e(evaluation.eval_id)}</h1>",
           f"<p class='meta'>output <code>{_e(evaluation.output)}</code> · gold <code>{_e(gold.uri)}</code> "
           f"(sha256 {_e(gold.sha256[:16])}…) · {len(gold.documents)} documents, {len(gold.pages)} pages, "
           f"{len(gold.items)} labelled items in {_e(', '.join(gold.tables))} · {evaluation.created_at:%Y-%m-%d %H:%M} UTC</p>"]
    for note in evaluation.notes:
        out.append(f"<div class='note'>{_e(note)}</div>")

    # what was scored
    params = [_flat(s.system.params) for s in evaluation.systems]
    differing = sorted({k for p in params for k in p if len({json.dumps(q.get(k), sort_keys=True) for q in params}) > 1})
    rows = []
    for s, flat in zip(evaluation.systems, params):
        shown = ", ".join(f"{k}={json.dumps(flat.get(k))}" for k in differing)
        rows.append([_e(s.system.label), _e(s.system.run_id or "current answers"), _e(s.system.prompt_id),
                     _e(s.system.kind.replace("_", " ")), _e(s.system.model_name), _e(shown)])
    out += ["<h2>Runs scored</h2>",
            _table(["run", "run id", "prompt", "kind", "model", "parameters that differ"], rows)]

    # headline
    rows = []
    for r in evaluation.headline():
        ci = "–" if r["ci_low"] is None else f"{r['ci_low']:.3f} – {r['ci_high']:.3f}"
        rows.append([_e(r["system"]), _e(r["table"]), _num(r["precision"]), _num(r["recall"]), _num(r["f1"]), ci,
                     r["gold_items"], r["pages_without_answer"]])
    out += ["<h2>Scores</h2>",
            "<p class='meta'>Micro-averaged over the labelled pages. Free-text runs: the recall of the gold names "
            "mentioned in the answer (no precision). The interval is F1's (recall's) 95% bootstrap interval over "
            "documents. Pages without an answer count as misses.</p>",
            _table(["run", "table", "precision", "recall", "F1", "95% CI", "gold items", "pages without answer"],
                   rows, {2, 3, 4, 6, 7})]
    bars = score_bars(evaluation)
    if bars:
        out.append(bars)

    # fields
    rows = []
    for s in evaluation.systems:
        for (table, f), c in sorted(s.fields.items()):
            rows.append([_e(s.system.label), _e(table), _e(f + (" (every labelled field right)" if f == ALL_FIELDS else "")),
                         c.tp, c.fp, c.fn, _num(c.precision), _num(c.recall), _num(c.f1)])
    if rows:
        out += ["<h2>Per field</h2>",
                _table(["run", "table", "field", "TP", "FP", "FN", "precision", "recall", "F1"], rows,
                       {3, 4, 5, 6, 7, 8})]

    # comparison
    if evaluation.comparisons:
        rows = [[_e(c["system"]), _e(c["baseline"]), _e(c["table"]), _e(c["metric"]), _num(c["baseline_value"]),
                 _num(c["system_value"]), "–" if c["difference"] is None else f"{c['difference']:+.3f}",
                 "–" if c["ci_low"] is None else f"{c['ci_low']:+.3f} – {c['ci_high']:+.3f}"]
                for c in evaluation.comparisons]
        out += ["<h2>Comparison</h2>",
                "<p class='meta'>Each run against the first run of its kind, on the same bootstrap resamples of the "
                "documents (a paired interval): an interval that excludes 0 is a difference the sample supports.</p>",
                _table(["run", "baseline", "table", "metric", "baseline", "run", "difference", "95% CI"], rows,
                       {4, 5, 6})]
        plot = comparison_plot(evaluation)
        if plot:
            out.append(plot)

    # pages without answer and document types
    rows = []
    for s in evaluation.systems:
        for status in ("ok",) + NO_ANSWER:
            pages, items = s.pages.get(status, [0, 0])
            if pages:
                rows.append([_e(s.system.label), _e(status), pages, items])
    out += ["<h2>Pages by answer status</h2>",
            "<p class='meta'>error: an error row; truncated: the answer was cut off at max_tokens; missing: no row "
            "for the page in the run. Their labelled items count as misses above.</p>",
            _table(["run", "status", "labelled pages", "labelled items on them"], rows, {2, 3})]
    rows = []
    for s in evaluation.systems:
        for (doc_type, table), c in sorted(s.document_types.items()):
            rows.append([_e(s.system.label), _e(doc_type), _e(table), c.tp + c.fn, _num(c.precision),
                         _num(c.recall), _num(c.f1)])
    if rows:
        out += ["<h2>Per document type</h2>",
                _table(["run", "document type", "table", "gold items", "precision", "recall", "F1"], rows,
                       {3, 4, 5, 6})]

    # calibration and review
    structured = [s for s in evaluation.systems if s.review]
    if structured:
        out.append("<h2>Confidence and review</h2>")
        plot = calibration_plot(evaluation)
        out.append(plot or "<div class='note'>The extracted items carry no confidence (or none was extracted on a "
                           "labelled page): review is routed by page status and validity only.</div>")
        rows = []
        for s in structured:
            r = s.review
            rows.append([_e(s.system.label), _e(r["mode"]), _num(r["target_precision"], 2),
                         _num(r["suggested_threshold"]) if r["suggested_threshold"] is not None else "none reaches it",
                         _num(r["threshold"]), r["items_total"], r["items_accepted"], _num(r["precision_accepted"]),
                         _num(r["coverage"]), review_counts.get(s.system.label, 0)])
        out.append(_table(["run", "routed by", "target precision", "suggested threshold", "threshold used",
                           "items on labelled pages", "accepted", "precision of accepted", "share accepted",
                           "rows in review table"], rows, {5, 6, 7, 8, 9}))
        rows = []
        for s in structured:
            for b in s.calibration:
                if b["n"]:
                    span = "no confidence" if b["bin_low"] is None else f"{b['bin_low']:.2f} – {b['bin_high']:.2f}"
                    rows.append([_e(s.system.label), span, b["n"], b["correct"], _num(b["accuracy"]),
                                 _num(b["mean_confidence"])])
        if rows:
            out.append(_table(["run", "confidence", "items", "right", "share right", "mean confidence"], rows,
                              {2, 3, 4, 5}))

    # worst pages
    out.append("<h2>Worst pages</h2>")
    for s in evaluation.systems:
        pages = worst_pages(s, evaluation)
        out.append(f"<h3>{_e(s.system.label)}</h3>")
        if not pages:
            out.append("<p class='meta'>no page with labelled or extracted items</p>")
        out += [_page_section(p, s, evaluation) for p in pages]
    out.append("</body></html>")
    return "\n".join(out)

