"""Value normalisation: the form a gold or extracted value is compared in.

Every value is normalised (Unicode NFKC, case folded, punctuation and repeated whitespace removed); units,
routes and frequencies are mapped to a canonical term through aliases (mg = milligram(s), PO = oral = by mouth,
BID = b.i.d. = twice daily, ...) and doses to their number(s) (``500 mg`` -> ``500``, ``1,000`` -> ``1000``).
``canonical`` gives the comparable form of a value of each field kind (``medvlm_core.evals.matching`` says
which rule each kind follows) and ``valid_value`` whether an extracted value is usable as it stands.

A gold value may list alternatives separated by ``|`` (``alternatives``).
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Any

ALTERNATIVES = "|"

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
        kind: the field's kind (``FIELD_KINDS``: name, text, dose, unit, route, frequency, bool, code, exact).
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
    if kind == "code":  # an ICD-10-CM code: E11.9 = e119 = "E11 .9"
        return re.sub(r"[^0-9A-Za-z]", "", unicodedata.normalize("NFKC", str(value))).upper()
    return normalize(value)


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
