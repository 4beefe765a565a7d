"""Calibration of a structured system's confidences: accuracy by confidence bin, and the review threshold that
reaches the target precision."""

from __future__ import annotations

from medvlm_core.evals.gold import GoldSet
from medvlm_core.evals.options import EvalOptions
from medvlm_core.evals.scores import SystemScores, item_validity


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
