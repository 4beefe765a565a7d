"""Bootstrap intervals and paired comparisons: the documents are resampled with replacement (seeded), the same
resamples for every system, so that the difference between two systems has a paired interval."""

from __future__ import annotations

from typing import Any

import numpy as np

from medvlm_core.evals.scores import ALL, Counts, SystemScores


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
