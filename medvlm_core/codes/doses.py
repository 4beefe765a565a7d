"""Doses, strengths, frequencies, routes and durations as written -> numbers, canonical units and flags.

* ``parse_amount``: ``500 mg`` -> 500 mg; ``1,000mg`` -> 1000 mg; ``1-2 tabs`` -> 1 to 2 tablet; ``1/2 tab`` -> 0.5
  tablet; ``two puffs`` -> 2 puff; ``10 mg/5 mL`` -> 10 mg/5 mL (a concentration keeps its unit whole).
* ``parse_frequency``: administrations per day and a PRN flag: BID -> 2, TID -> 3, q8h -> 3, q4-6h -> 6 (the most
  a range allows), weekly -> 1/7, every other day -> 0.5, ``at bedtime`` -> 1; ``PRN``, ``as needed`` -> prn.
  A frequency said only as "with meals" (``AC``) is 3 a day. A single dose (``stat``, ``once``) has no rate.
* ``normalize_route``: PO -> oral, IV -> intravenous, SC/SQ/subcut -> subcutaneous, SL -> sublingual, PR ->
  rectal, inhaled/neb/MDI -> inhalation, ... (the names are the ones the FDA route list uses, lowercase).
* ``parse_duration``: ``for 7 days`` / ``x10d`` / ``2 weeks`` -> days.

Unrecognised text gives None (never a guess): the model's own text stays in its column beside the number.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

UNITS = {
    "mg": "mg", "milligram": "mg", "milligrams": "mg", "mgs": "mg", "mcg": "mcg", "ug": "mcg", "microgram": "mcg",
    "micrograms": "mcg", "g": "g", "gm": "g", "gram": "g", "grams": "g", "gms": "g", "kg": "kg", "ml": "mL",
    "mls": "mL", "cc": "mL", "milliliter": "mL", "milliliters": "mL", "millilitre": "mL", "l": "L", "liter": "L",
    "litre": "L", "unit": "unit", "units": "unit", "u": "unit", "iu": "unit", "meq": "mEq", "mmol": "mmol", "%": "%",
    "tab": "tablet", "tabs": "tablet", "tablet": "tablet", "tablets": "tablet", "cap": "capsule", "caps": "capsule",
    "capsule": "capsule", "capsules": "capsule", "puff": "puff", "puffs": "puff", "inhalation": "puff",
    "inhalations": "puff", "drop": "drop", "drops": "drop", "gtt": "drop", "gtts": "drop", "patch": "patch",
    "patches": "patch", "application": "application", "applications": "application", "spray": "spray",
    "sprays": "spray", "suppository": "suppository", "suppositories": "suppository", "vial": "vial", "vials": "vial",
    "ampule": "ampule", "sachet": "sachet", "scoop": "scoop", "tsp": "teaspoon", "teaspoon": "teaspoon",
    "teaspoons": "teaspoon", "tbsp": "tablespoon", "tablespoon": "tablespoon", "lozenge": "lozenge",
    "pen": "pen", "mcg/hr": "mcg/h", "mg/kg": "mg/kg",
}
ROUTES = {
    "po": "oral", "oral": "oral", "orally": "oral", "by mouth": "oral", "per os": "oral", "mouth": "oral",
    "pos": "oral", "sl": "sublingual", "sublingual": "sublingual", "sublingually": "sublingual",
    "under the tongue": "sublingual", "buccal": "buccal", "iv": "intravenous", "intravenous": "intravenous",
    "intravenously": "intravenous", "ivp": "intravenous", "iv push": "intravenous", "ivpb": "intravenous",
    "iv piggyback": "intravenous", "infusion": "intravenous", "im": "intramuscular", "intramuscular": "intramuscular",
    "intramuscularly": "intramuscular", "sc": "subcutaneous", "sq": "subcutaneous", "subq": "subcutaneous",
    "sub q": "subcutaneous", "subcut": "subcutaneous", "subcutaneous": "subcutaneous",
    "subcutaneously": "subcutaneous", "sub cutaneous": "subcutaneous", "top": "topical", "topical": "topical",
    "topically": "topical", "to skin": "topical", "cutaneous": "topical", "dermal": "topical", "td": "transdermal",
    "transdermal": "transdermal", "patch": "transdermal", "inh": "inhalation", "inhaled": "inhalation",
    "inhalation": "inhalation", "inhaler": "inhalation", "via inhaler": "inhalation", "neb": "inhalation",
    "nebulized": "inhalation", "nebulizer": "inhalation", "nebulised": "inhalation", "mdi": "inhalation",
    "by inhalation": "inhalation", "nasal": "nasal", "intranasal": "nasal", "intranasally": "nasal",
    "each nostril": "nasal", "in each nostril": "nasal", "ophthalmic": "ophthalmic", "ophth": "ophthalmic",
    "eye": "ophthalmic", "both eyes": "ophthalmic", "ou": "ophthalmic", "od": "ophthalmic", "os": "ophthalmic",
    "otic": "otic", "ear": "otic", "both ears": "otic", "pr": "rectal", "rectal": "rectal", "rectally": "rectal",
    "per rectum": "rectal", "pv": "vaginal", "vaginal": "vaginal", "vaginally": "vaginal", "ng": "enteral",
    "per ng": "enteral", "ngt": "enteral", "peg": "enteral", "per peg": "enteral", "g tube": "enteral",
    "per g tube": "enteral", "j tube": "enteral", "enteral": "enteral", "it": "intrathecal",
    "intrathecal": "intrathecal", "id": "intradermal", "intradermal": "intradermal", "epidural": "epidural",
    "intra articular": "intra-articular", "intraarticular": "intra-articular", "intravitreal": "intravitreal",
}
_WORD_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
                 "ten": 10, "half": 0.5, "a": 1, "an": 1, "single": 1, "once": 1, "twice": 2, "thrice": 3}
_NUMBER = r"(\d+(?:\.\d+)?(?:\s*/\s*\d+(?![\d.]*\s*(?:ml|l)\b))?|one|two|three|four|five|six|seven|eight|nine|ten|half)"
_AMOUNT = re.compile(r"(?<![a-z0-9.])" + _NUMBER + r"(?:\s*(?:-|to)\s*" + _NUMBER + r")?"
                     r"\s*([a-z%]+(?:\s*/\s*\d*\s*[a-z]+)?)?")
# named frequencies -> administrations a day
_NAMED = [
    (r"\b(?:qid|four times (?:a |per )?day|four times daily|4 times (?:a |per )?day|4 ?x ?(?:a |per |/ ?)?day)\b", 4.0),
    ((r"\b(?:tid|three times (?:a |per )?day|three times daily|3 times (?:a |per )?day|"
      r"3 ?x ?(?:a |per |/ ?)?day)\b"), 3.0),
    ((r"\b(?:bid|twice (?:a |per )?day|twice daily|two times (?:a |per )?day|2 times (?:a |per )?day|"
      r"2 ?x ?(?:a |per |/ ?)?day)\b"), 2.0),
    (r"\b(?:5 times (?:a |per )?day|five times (?:a |per )?day|5 ?x ?(?:a |per |/ ?)?day)\b", 5.0),
    (r"\b(?:tiw|three times (?:a |per )?week|3 ?x ?(?:a |per |/ ?)?week)\b", 3 / 7),
    (r"\b(?:biw|twice (?:a |per )?week|twice weekly|two times (?:a |per )?week|2 ?x ?(?:a |per |/ ?)?week)\b", 2 / 7),
    (r"\b(?:every other week|every 2 weeks|every two weeks|biweekly|q2 ?wk?s?)\b", 1 / 14),
    (r"\b(?:weekly|once (?:a |per )?week|every week|qweek|qwk|q ?1 ?wk|1 ?x ?(?:a |per |/ ?)?week)\b", 1 / 7),
    (r"\b(?:every 4 weeks|every four weeks|q4 ?wk?s?)\b", 1 / 28),
    (r"\b(?:monthly|once (?:a |per )?month|every month|q ?month)\b", 1 / 30),
    (r"\b(?:qod|every other day|alternate days|on alternate days|every 2 days|every two days)\b", 0.5),
    (r"\b(?:hourly|every hour)\b", 24.0),
    ((r"\b(?:qd|od|daily|once daily|once (?:a |per )?day|every day|qday|1 ?x ?(?:a |per |/ ?)?day|"
      r"each (?:morning|evening|night|day)|every (?:morning|evening|night)|qam|qpm|qhs|hs|nightly|at night|"
      r"at bedtime|bedtime|in the (?:morning|evening)|qnoon|once at night|1 time (?:a |per )?day)\b"), 1.0),
]
_NAMED_PATTERNS = [(re.compile(p), n) for p, n in _NAMED]
_EVERY_HOURS = re.compile(r"\b(?:q|every)\s*(\d+(?:\.\d+)?)\s*(?:(?:-|to)\s*(\d+(?:\.\d+)?)\s*)?"
                          r"(?:h|hr|hrs|hour|hours)\b")
_TIMES_DAILY = re.compile(r"\b(\d+)\s*(?:x|times)\s*(?:a |per |/ ?)?(?:day|daily)\b")
_MEALS = re.compile(r"\b(?:ac|pc|with meals|before meals|after meals|with each meal|tid ac|tid pc)\b")
_PRN = re.compile(r"\b(?:prn|as needed|as required|when required|if needed|when needed|as directed prn|on demand)\b")
_SINGLE = re.compile(r"\b(?:stat|now|once only|single dose|one dose|x ?1 dose|one time)\b")
_DURATION = re.compile(r"\b(?:for|x|times|during|over)?\s*"
                       r"(\d+(?:\.\d+)?|one|two|three|four|five|six|seven|eight|nine|ten)"
                       r"\s*-?\s*(d|day|days|wk|wks|week|weeks|mo|month|months)\b")
_DAYS = {"d": 1, "day": 1, "days": 1, "wk": 7, "wks": 7, "week": 7, "weeks": 7, "mo": 30, "month": 30, "months": 30}


@dataclass(frozen=True)
class Amount:
    """A dose or strength: a number (or a range), and its canonical unit (None when none was written)."""

    value: float
    value_max: float | None
    unit: str | None


@dataclass(frozen=True)
class Frequency:
    """How often: administrations per day (None: not a rate, or not recognised) and whether as needed."""

    per_day: float | None
    prn: bool


def _clean(text: object) -> str:
    text = unicodedata.normalize("NFKC", str(text or "")).casefold().replace("µ", "u").replace("½", " 1/2")
    text = re.sub(r"(?<=[a-z])\.(?=[a-z])|(?<=[a-z])\.(?![0-9])", "", text)  # b.i.d. -> bid, p.o. -> po
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # 1,000 -> 1000
    return " ".join(re.sub(r"[^0-9a-z%/.\- ]+", " ", text).split())


def _number(token: str) -> float | None:
    if token in _WORD_NUMBERS:
        return float(_WORD_NUMBERS[token])
    if "/" in token:
        top, _, bottom = token.partition("/")
        try:
            return float(top) / float(bottom) if float(bottom) else None
        except ValueError:
            return None
    try:
        return float(token)
    except ValueError:
        return None


def canonical_unit(unit: str | None) -> str | None:
    """The canonical form of a unit (``milligrams`` -> ``mg``, ``cc`` -> ``mL``, ``tabs`` -> ``tablet``).

    Args:
        unit: a unit as written.

    Returns:
        The canonical unit; a concentration's parts each made canonical (``mg/ml`` -> ``mg/mL``); None when not
        recognised.
    """
    text = _clean(unit).replace(" ", "")
    if not text:
        return None
    if text in UNITS:
        return UNITS[text]
    if "/" in text:
        top, _, bottom = text.partition("/")
        amount = re.match(r"^(\d*(?:\.\d+)?)([a-z]+)$", bottom)
        if top in UNITS and amount and amount.group(2) in UNITS:
            return f"{UNITS[top]}/{amount.group(1) + ' ' if amount.group(1) else ''}{UNITS[amount.group(2)]}"
    return None


def parse_amount(text: object, unit: object = None) -> Amount | None:
    """The first amount in a dose or strength as written (and its separate unit, if the unit is a column of its own).

    Args:
        text: ``500 mg``, ``1-2 tabs``, ``10 mg/5 mL``, ``two puffs``, ``500``.
        unit: the unit written apart (``mg``), used when ``text`` has none.

    Returns:
        The amount, or None when ``text`` has no number.
    """
    cleaned = _clean(text)
    for match in _AMOUNT.finditer(cleaned):
        low = _number(match.group(1))
        if low is None or match.group(1) in ("a",):
            continue
        high = _number(match.group(2)) if match.group(2) else None
        written = match.group(3)
        found = canonical_unit(written) if written else None
        if written and found is None and not canonical_unit(unit):
            # "500 daily": a word that is not a unit; the separate unit column may still say it
            found = None
        return Amount(low, high if high is not None and high != low else None, found or canonical_unit(unit))
    return None


def parse_frequency(text: object) -> Frequency:
    """Administrations per day and the PRN flag of a frequency as written.

    Args:
        text: ``BID``, ``q6h PRN``, ``every 4-6 hours as needed``, ``once weekly``, ``at bedtime``.

    Returns:
        The frequency (``per_day`` None when the text names no rate: ``PRN`` alone, ``stat``, or unrecognised).
    """
    cleaned = _clean(text)
    prn = bool(_PRN.search(cleaned))
    without_duration = _DURATION.sub(" ", cleaned)
    every = _EVERY_HOURS.search(without_duration)
    if every:
        shortest = min(float(every.group(1)), float(every.group(2) or every.group(1)))
        return Frequency(round(24.0 / shortest, 4) if shortest else None, prn)
    times = _TIMES_DAILY.search(without_duration)
    if times:
        return Frequency(float(times.group(1)), prn)
    for pattern, per_day in _NAMED_PATTERNS:
        if pattern.search(without_duration):
            return Frequency(round(per_day, 4), prn)
    if _MEALS.search(without_duration):
        return Frequency(3.0, prn)
    if _SINGLE.search(without_duration):
        return Frequency(None, prn)
    return Frequency(None, prn)


def normalize_route(text: object) -> str | None:
    """The canonical route of a route as written.

    Args:
        text: ``PO``, ``by mouth``, ``SQ``, ``IV push``, ``inhaled``.

    Returns:
        ``oral``, ``intravenous``, ``subcutaneous``, ... or None when not recognised.
    """
    cleaned = _clean(text).replace("-", " ").replace("/", " ")
    if cleaned in ROUTES:
        return ROUTES[cleaned]
    words = cleaned.split()
    for size in (3, 2, 1):
        for start in range(len(words) - size + 1):
            phrase = " ".join(words[start:start + size])
            if phrase in ROUTES:
                return ROUTES[phrase]
    return None


def parse_duration(text: object) -> float | None:
    """A duration as written, in days.

    Args:
        text: ``for 7 days``, ``x10d``, ``2 weeks``, ``1 month``.

    Returns:
        Days, or None when no duration is written.
    """
    match = _DURATION.search(_clean(text).replace("x", "x "))
    if not match:
        return None
    amount = _number(match.group(1))
    return None if amount is None else amount * _DAYS[match.group(2)]
