"""Field-aware matching of extracted items against labelled (gold) items.

Every value is first normalised (``medvlm_core.evals.normalize``: Unicode NFKC, case folded, punctuation and
repeated whitespace removed, aliases and numbers made canonical), then compared according to the kind of field
it is:

========================  ===============================================================================
kind (fields)             rule
========================  ===============================================================================
``name`` (name)           fuzzy: ``rapidfuzz.fuzz.token_sort_ratio`` >= ``name_threshold`` (default 85):
                          word order, case, punctuation and small typos do not matter
``text`` (text,           fuzzy: ``rapidfuzz.fuzz.token_set_ratio`` >= ``text_threshold`` (default 80): a
condition, evidence,      sentence that says the gold text with a few more (or fewer) words still matches
reasoning)
``dose`` (dose, numbers)  numerically: ``500`` = ``500.0`` = ``500 mg`` = ``1,000``/``1000``; ranges ``1-2``
``unit`` (unit)           through aliases: mg = milligram(s), mcg = ug = microgram, mL = cc, units = IU, ...
``route`` (route)         through aliases: PO = oral = by mouth, IV = intravenous, SC = SQ = subcutaneous, ...
``frequency``             the recognised frequency terms agree: BID = b.i.d. = twice daily = twice a day,
                          q12h = every 12 hours, PRN = as needed, QHS = at bedtime, ...; a duration
                          (``for 7 days``) and meal qualifiers (``with meals``) are left out
``bool`` (conditional)    true/false, yes/no, 1/0
``code`` (icd10cm_code,   equal once dots, spaces and case are left out: ``E11.9`` = ``e119``; a labelled
icd10cm_category)         code also scores its category, the first three characters (``gold``)
``exact`` (anything else) equal after normalisation
========================  ===============================================================================

A gold value may list alternatives separated by ``|`` (``Type 2 diabetes mellitus|T2DM``): any one matching
is a match.

Items are paired one to one per page and table by an optimal assignment (``assign``): the pairing with the
most matched items (pairs whose key fields reach the threshold), and among those the highest total similarity.
rapidfuzz computes the similarity matrix (``process.cdist``); the assignment itself is a small Hungarian
algorithm (``_hungarian``), because no library here fits: rapidfuzz has none and scipy's
``linear_sum_assignment`` would add a ~100 MB dependency for matrices of at most a few dozen items. A greedy
pairing (most similar pair first) was not used: it can leave an item unmatched that an optimal pairing matches
(gold A is 95 like extracted X and 90 like Y, gold B is 88 like X only: greedy pairs A-X and loses B).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from rapidfuzz import fuzz, process

from medvlm_core.evals.normalize import alternatives, canonical, is_empty, normalize, to_bool

NAME_THRESHOLD = 85.0
TEXT_THRESHOLD = 80.0
MENTION_THRESHOLD = 90.0

# Field name -> kind, for the built-in tables (and any user field of the same name).
FIELD_KINDS = {
    "name": "name",
    "text": "text",
    "condition": "text",
    "evidence": "text",
    "reasoning": "text",
    "dose": "dose",
    "unit": "unit",
    "route": "route",
    "frequency": "frequency",
    "conditional": "bool",
    "icd10cm_code": "code",
    "icd10cm_category": "code",
}


def similarity(kind: str, gold: Any, predicted: Any) -> float:
    """How alike a gold value (its alternatives) and an extracted value are, 0 to 100.

    Args:
        kind: the field's kind.
        gold: the gold value (may list ``|`` alternatives).
        predicted: the extracted value.

    Returns:
        The best over the alternatives: rapidfuzz's score for fuzzy kinds, else 100 when the canonical forms
        are equal and 0 when not (or when the extracted value is empty).
    """
    if is_empty(predicted):
        return 0.0
    best = 0.0
    for alt in alternatives(gold):
        if kind in ("name", "text"):
            scorer = fuzz.token_sort_ratio if kind == "name" else fuzz.token_set_ratio
            best = max(best, scorer(normalize(alt), normalize(predicted)))
        elif canonical(kind, alt) == canonical(kind, predicted):
            return 100.0
    return float(best)


@dataclass(frozen=True)
class Thresholds:
    """The similarity a fuzzy field needs to match (0 to 100)."""

    name: float = NAME_THRESHOLD
    text: float = TEXT_THRESHOLD
    mention: float = MENTION_THRESHOLD

    def of(self, kind: str) -> float:
        """The threshold of a field kind.

        Args:
            kind: the field's kind.

        Returns:
            ``name``/``text`` thresholds for those kinds, 100 (equality) for the others.
        """
        return self.name if kind == "name" else self.text if kind == "text" else 100.0


def values_match(kind: str, gold: Any, predicted: Any, thresholds: Thresholds) -> bool:
    """Whether an extracted value matches a gold value under its field's rule.

    Args:
        kind: the field's kind.
        gold: the gold value.
        predicted: the extracted value.
        thresholds: the fuzzy thresholds.

    Returns:
        True when they match.
    """
    if kind == "bool":
        return to_bool(gold) is not None and to_bool(gold) == to_bool(predicted)
    return similarity(kind, gold, predicted) >= thresholds.of(kind)


def similarity_matrix(kind: str, gold: Sequence[Any], predicted: Sequence[Any]) -> list[list[float]]:
    """Similarity of every gold value to every extracted value (rapidfuzz ``process.cdist`` for fuzzy kinds).

    Args:
        kind: the key field's kind.
        gold: gold values (each may list alternatives).
        predicted: extracted values.

    Returns:
        ``len(gold)`` rows of ``len(predicted)`` scores, 0 to 100.
    """
    if not gold or not predicted:
        return [[0.0] * len(predicted) for _ in gold]
    if kind not in ("name", "text"):
        return [[similarity(kind, g, p) for p in predicted] for g in gold]
    scorer = fuzz.token_sort_ratio if kind == "name" else fuzz.token_set_ratio
    owners, choices = [], []
    for i, g in enumerate(gold):
        for alt in alternatives(g):
            owners.append(i)
            choices.append(normalize(alt))
    queries = [normalize(p) for p in predicted]
    scores = process.cdist(choices, queries, scorer=scorer, processor=None)
    out = [[0.0] * len(predicted) for _ in gold]
    for row, owner in enumerate(owners):
        for j in range(len(predicted)):
            if queries[j] and scores[row][j] > out[owner][j]:
                out[owner][j] = float(scores[row][j])
    return out


def mentioned(gold: Any, text_normalized: str, threshold: float) -> bool:
    """Whether a free-text answer mentions a gold value (``rapidfuzz.fuzz.partial_ratio``, best alternative).

    Args:
        gold: the gold value (may list alternatives).
        text_normalized: the answer, normalised (``normalize``).
        threshold: the least partial-ratio score (0 to 100) that counts as a mention.

    Returns:
        True when some alternative appears in the text (allowing small differences).
    """
    if not text_normalized:
        return False
    return any(fuzz.partial_ratio(normalize(alt), text_normalized) >= threshold
               for alt in alternatives(gold) if normalize(alt))


def assign(scores: Sequence[Sequence[float]], threshold: float) -> list[tuple[int, int, float]]:
    """One-to-one pairs of gold and extracted items: the most pairs at or above ``threshold``, and among those the
    highest total score (an optimal assignment).

    Args:
        scores: ``scores[i][j]`` is how alike gold item i and extracted item j are (0 to 100).
        threshold: the least score a pair needs.

    Returns:
        ``(gold index, extracted index, score)`` for each pair, sorted by gold index. Of extracted items equally
        like a gold item, the earlier one is paired.
    """
    eligible = [(i, j) for i, row in enumerate(scores) for j, s in enumerate(row) if s >= threshold]
    if not eligible:
        return []
    rows = sorted({i for i, _ in eligible})
    cols = sorted({j for _, j in eligible})
    # Weight: a pair is worth more than any total of scores of pairs (so the count comes first), plus its score.
    big = 101.0 * (min(len(rows), len(cols)) + 1)
    # Ties go to the earlier extracted item: a preference far below any difference of two scores.
    tie = 1e-6 / max(1, len(cols))
    weight = [[(big + scores[i][j] - tie * k) if scores[i][j] >= threshold else 0.0 for k, j in enumerate(cols)]
              for i in rows]
    transposed = len(rows) > len(cols)
    if transposed:
        weight = [list(col) for col in zip(*weight)]
    chosen = _hungarian([[-w for w in row] for row in weight])
    pairs = []
    for r, c in enumerate(chosen):
        i, j = (c, r) if transposed else (r, c)
        gi, pj = rows[i], cols[j]
        if scores[gi][pj] >= threshold:
            pairs.append((gi, pj, float(scores[gi][pj])))
    return sorted(pairs)


def _hungarian(cost: list[list[float]]) -> list[int]:
    """Minimum-cost assignment of every row to a distinct column (rows <= columns), O(rows^2 x columns).

    The shortest-augmenting-path form of the Hungarian algorithm (Kuhn-Munkres) with potentials.

    Args:
        cost: a rows x columns matrix.

    Returns:
        The column chosen for each row.
    """
    n, m = len(cost), len(cost[0])
    inf = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (m + 1)
    owner, way = [0] * (m + 1), [0] * (m + 1)  # owner[j]: the row (1-based) holding column j; 0 = free
    for i in range(1, n + 1):
        owner[0], j0 = i, 0
        minv, used = [inf] * (m + 1), [False] * (m + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = owner[j0], inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    reduced = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if reduced < minv[j]:
                        minv[j], way[j] = reduced, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    chosen = [-1] * n
    for j in range(1, m + 1):
        if owner[j]:
            chosen[owner[j] - 1] = j - 1
    return chosen



def kind_of(field: str, arrow_type: Any = None) -> str:
    """The kind of a field: by its name for the known fields, else by its column type.

    Args:
        field: the field's name.
        arrow_type: its Arrow type in the output table, if known.

    Returns:
        One of name, text, dose, unit, route, frequency, bool, exact.
    """
    if field in FIELD_KINDS:
        return FIELD_KINDS[field]
    text = str(arrow_type or "")
    if text == "bool":
        return "bool"
    if text.startswith(("int", "uint", "float", "double", "decimal")):
        return "dose"
    return "exact"


def unique(values: Iterable[Any]) -> list[Any]:
    """The values in first-seen order without repeats.

    Args:
        values: any hashable values.

    Returns:
        The distinct values.
    """
    return list(dict.fromkeys(values))
