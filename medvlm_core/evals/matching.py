"""Field-aware matching of extracted items against labelled (gold) items.

Every value is first normalised (Unicode NFKC, case folded, punctuation and repeated whitespace removed), then
compared according to the kind of field it is:

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

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Sequence

from rapidfuzz import fuzz, process

NAME_THRESHOLD = 85.0
TEXT_THRESHOLD = 80.0
MENTION_THRESHOLD = 90.0
ALTERNATIVES = "|"

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
}

UNIT_ALIASES = {
    "mg": ["mg", "mgs", "milligram", "milligrams", "milligramme", "milligrammes"],
    "g": ["g", "gm", "gms", "gram", "grams", "gramme", "grammes"],
    "mcg": ["mcg", "ug", "microgram", "micrograms", "microgramme"],
    "ng": ["ng", "nanogram", "nanograms"],
    "kg": ["kg", "kilogram", "kilograms"],
    "ml": ["ml", "mls", "milliliter", "milliliters", "millilitre", "millilitres", "cc"],
    "l": ["l", "liter", "liters", "litre", "litres"],
    "unit": ["unit", "units", "u", "iu", "ius", "international unit", "international units"],
    "meq": ["meq", "milliequivalent", "milliequivalents"],
    "mmol": ["mmol", "millimole", "millimoles"],
    "%": ["%", "percent", "per cent"],
    "mg/ml": ["mg ml", "mg per ml"],
    "mg/kg": ["mg kg", "mg per kg"],
    "tablet": ["tablet", "tablets", "tab", "tabs"],
    "capsule": ["capsule", "capsules", "cap", "caps"],
    "puff": ["puff", "puffs"],
    "drop": ["drop", "drops", "gtt", "gtts"],
    "application": ["application", "applications", "appl"],
    "patch": ["patch", "patches"],
    "spray": ["spray", "sprays"],
    "suppository": ["suppository", "suppositories", "supp"],
}

ROUTE_ALIASES = {
    "oral": ["po", "oral", "orally", "by mouth", "per os", "mouth", "per oral"],
    "intravenous": ["iv", "intravenous", "intravenously", "ivp", "iv push"],
    "intramuscular": ["im", "intramuscular", "intramuscularly"],
    "subcutaneous": ["sc", "sq", "subq", "subcut", "sub q", "subcutaneous", "subcutaneously"],
    "topical": ["top", "topical", "topically", "cutaneous", "to the skin", "on the skin"],
    "inhaled": ["inh", "inhaled", "inhalation", "by inhalation", "nebulised", "nebulized"],
    "rectal": ["pr", "rectal", "rectally", "per rectum"],
    "sublingual": ["sl", "sublingual", "sublingually", "under the tongue"],
    "transdermal": ["td", "transdermal", "transdermally"],
    "nasal": ["nasal", "intranasal", "nasally", "in the nose"],
    "ophthalmic": ["ophthalmic", "eye", "in the eye", "in each eye", "ou"],
    "otic": ["otic", "ear", "in the ear"],
    "vaginal": ["pv", "vaginal", "vaginally"],
}

# Frequency terms: canonical code -> phrases (normalised, dots dropped). Longest phrases are replaced first.
FREQUENCY_ALIASES = {
    "once daily": ["qd", "od", "daily", "once daily", "once a day", "once per day", "every day", "each day",
                   "1 time daily", "one time daily", "1 time a day", "one time a day", "1x daily", "1 x daily",
                   "q24h", "q 24h", "q 24 h", "every 24 hours", "every 24 hrs"],
    "twice daily": ["bid", "bd", "twice daily", "twice a day", "twice per day", "two times daily", "two times a day",
                    "2 times daily", "2 times a day", "2x daily", "2 x daily"],
    "three times daily": ["tid", "tds", "three times daily", "three times a day", "thrice daily", "3 times daily",
                          "3 times a day", "3x daily", "3 x daily"],
    "four times daily": ["qid", "qds", "four times daily", "four times a day", "4 times daily", "4 times a day",
                         "4x daily", "4 x daily"],
    "at bedtime": ["qhs", "hs", "at bedtime", "nightly", "at night", "every night", "each night", "before bed"],
    "every morning": ["qam", "every morning", "each morning", "in the morning"],
    "every evening": ["qpm", "every evening", "each evening", "in the evening"],
    "as needed": ["prn", "as needed", "as required", "when required", "if needed", "when needed"],
    "every other day": ["qod", "every other day", "alternate days", "on alternate days"],
    "weekly": ["weekly", "once weekly", "once a week", "every week", "qw", "q1w", "qwk"],
    "monthly": ["monthly", "once monthly", "once a month", "every month"],
    "once": ["once", "stat", "one time", "single dose"],
}
_EVERY_HOURS = re.compile(r"\b(?:every|q)\s*(\d+)\s*(?:-|to)?\s*(\d+)?\s*(?:hours?|hrs?|h)\b|\b(\d+)\s*hourly\b")
_DURATION = re.compile(r"\b(?:for|x)\s*\d+\s*(?:more\s+)?(?:days?|d|weeks?|wks?|months?|mos?)\b")
_MEALS = re.compile(r"\b(?:with|after|before)\s+(?:meals?|food|breakfast|lunch|dinner|supper)\b")

_WORD_NUMBERS = {"half": 0.5, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
                 "nine": 9, "ten": 10, "twelve": 12}
_NUMBER = re.compile(r"\d+(?:\.\d+)?|\.\d+")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TRUE = {"true", "t", "yes", "y", "1", "1.0"}
_FALSE = {"false", "f", "no", "n", "0", "0.0"}


def _phrase_index(aliases: dict[str, list[str]]) -> dict[str, str]:
    return {phrase: canonical for canonical, phrases in aliases.items() for phrase in phrases}


_UNITS = _phrase_index(UNIT_ALIASES)
_ROUTES = _phrase_index(ROUTE_ALIASES)
_FREQUENCY_PHRASES = sorted(_phrase_index(FREQUENCY_ALIASES).items(), key=lambda kv: -len(kv[0]))
_FREQUENCY_PATTERN = re.compile(r"\b(" + "|".join(re.escape(p) for p, _ in _FREQUENCY_PHRASES) + r")\b")
_FREQUENCY_CODE = dict(_FREQUENCY_PHRASES)


@lru_cache(maxsize=65536)
def normalize(value: Any, drop_dots: bool = False) -> str:
    """A value as compared: NFKC, case folded, punctuation to spaces, whitespace collapsed.

    Args:
        value: any value (None gives ``""``).
        drop_dots: join abbreviations written with dots (``b.i.d.`` -> ``bid``, ``p.o.`` -> ``po``) instead of
            splitting them; a decimal point between digits is always kept.

    Returns:
        The normalised text.
    """
    if value is None:
        return ""
    text = unicodedata.normalize("NFKC", str(value)).casefold().replace("\u03bc", "u")  # NFKC turns µ into μ
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", "" if drop_dots else " ", text)
    text = re.sub(r"[^\w\s%.]|_", " ", text)
    return " ".join(text.split())


def alternatives(value: Any) -> list[str]:
    """The alternatives a gold value lists (``a|b``), each stripped; one for a plain value.

    Args:
        value: a gold value.

    Returns:
        The non-empty alternatives (strings), or ``[value]`` for a non-string.
    """
    if not isinstance(value, str):
        return [value]
    return [part.strip() for part in value.split(ALTERNATIVES) if part.strip()]


def is_empty(value: Any) -> bool:
    """Whether a value counts as not given (None, or blank text).

    Args:
        value: a gold or extracted value.

    Returns:
        True for None and blank strings (booleans and numbers are values).
    """
    return value is None or (isinstance(value, str) and not value.strip())


def to_bool(value: Any) -> bool | None:
    """A boolean from true/false, yes/no, 1/0 (any case), or a bool.

    Args:
        value: the value.

    Returns:
        The boolean, or None when it is not one.
    """
    if isinstance(value, bool):
        return value
    text = normalize(value)
    return True if text in _TRUE else False if text in _FALSE else None


def canonical_unit(value: Any) -> str | None:
    """The canonical unit (``mg``, ``mcg``, ``ml``, ``unit``, ``tablet``, ...), or None when not recognised.

    Args:
        value: a unit as written.

    Returns:
        The canonical unit or None.
    """
    return _UNITS.get(normalize(value, drop_dots=True))


def canonical_route(value: Any) -> str | None:
    """The canonical route (``oral``, ``intravenous``, ``subcutaneous``, ...), or None when not recognised.

    Args:
        value: a route as written.

    Returns:
        The canonical route or None.
    """
    return _ROUTES.get(normalize(value, drop_dots=True))


@lru_cache(maxsize=65536)
def frequency_terms(value: Any) -> frozenset[str]:
    """The frequency terms recognised in a frequency (durations and meal qualifiers left out).

    Args:
        value: a frequency as written (``1 tab b.i.d. with meals for 7 days``).

    Returns:
        Canonical terms (``{"twice daily"}``; ``every N hours`` as ``qNh``), empty when none is recognised.
    """
    text = _MEALS.sub(" ", _DURATION.sub(" ", normalize(value, drop_dots=True)))
    terms = set()
    for match in _EVERY_HOURS.finditer(text):
        low, high, hourly = match.group(1), match.group(2), match.group(3)
        terms.add(f"q{hourly}h" if hourly else f"q{low}-{high}h" if high else f"q{low}h")
    text = _EVERY_HOURS.sub(" ", text)
    terms.update(_FREQUENCY_CODE[m.group(1)] for m in _FREQUENCY_PATTERN.finditer(text))
    return frozenset(terms)


@lru_cache(maxsize=65536)
def canonical_number(value: Any) -> str | None:
    """The number(s) a dose says, canonical: ``500 mg`` -> ``500``, ``1,000`` -> ``1000``, ``1 - 2`` -> ``1-2``.

    Args:
        value: a dose as written (or a number).

    Returns:
        The numbers joined by ``-``, or None when there is none.
    """
    if isinstance(value, bool) or value is None:
        return None
    text = _THOUSANDS.sub("", unicodedata.normalize("NFKC", str(value)).casefold())
    numbers = [float(n) for n in _NUMBER.findall(text)]
    if not numbers:
        numbers = [float(_WORD_NUMBERS[w]) for w in normalize(text).split() if w in _WORD_NUMBERS]
    if not numbers:
        return None
    return "-".join(("%f" % n).rstrip("0").rstrip(".") for n in numbers)


def canonical(kind: str, value: Any) -> Any:
    """The form two values of a field are compared in (see the module docstring).

    Args:
        kind: the field's kind (``FIELD_KINDS``: name, text, dose, unit, route, frequency, bool, exact).
        value: one value (not a ``|`` list).

    Returns:
        Something comparable with ``==`` (for fuzzy kinds, the normalised text).
    """
    if kind == "bool":
        return to_bool(value)
    if kind == "dose":
        return canonical_number(value) or normalize(value)
    if kind == "unit":
        return canonical_unit(value) or normalize(value, drop_dots=True)
    if kind == "route":
        return canonical_route(value) or normalize(value, drop_dots=True)
    if kind == "frequency":
        return frequency_terms(value) or normalize(value, drop_dots=True)
    return normalize(value)


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


def valid_value(kind: str, value: Any) -> bool:
    """Whether an extracted value is usable as it stands (the review's validity check).

    Args:
        kind: the field's kind.
        value: the extracted value.

    Returns:
        False for a dose without a number, a unit, route or frequency none of the aliases knows, and a boolean
        that is not one; True otherwise (empty values are judged by the caller).
    """
    if kind == "dose":
        return canonical_number(value) is not None
    if kind == "unit":
        return canonical_unit(value) is not None
    if kind == "route":
        return canonical_route(value) is not None
    if kind == "frequency":
        return bool(frequency_terms(value))
    if kind == "bool":
        return to_bool(value) is not None
    return True


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
