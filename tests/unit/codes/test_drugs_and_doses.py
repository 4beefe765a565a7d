"""Drug names to generic names and ids (the offline dictionary); doses, strengths, frequencies, routes, durations."""

from __future__ import annotations

import pytest

from medvlm_core.codes import doses
from medvlm_core.codes.abbreviations import DRUG_ABBREVIATIONS, register_drug
from medvlm_core.codes.drugs import drug_dictionary
from support.offline import no_network, prefect_server  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def drugs():
    return drug_dictionary()


@pytest.mark.parametrize("written, generic, how", [
    ("metformin", "metformin", "exact"),
    ("Glucophage", "metformin", "exact"),                     # a brand
    ("metformin HCl ER 500 mg tablet", "metformin", "salt"),  # salt, release, strength and form left out
    ("Metformin 500 mg PO BID", "metformin", "stripped"),
    ("levothyroxine sodium", "levothyroxine", "salt"),        # the generic as written, not the salt's alias
    ("amlodipine besylate", "amlodipine", "salt"),
    ("HCTZ", "hydrochlorothiazide", "abbreviation"),           # the curated list
    ("ASA 81", "aspirin", "abbreviation"),
    ("Colace", "docusate", "abbreviation"),                    # the dictionary says "stool softeners": curated wins
    ("Percocet", "oxycodone and acetaminophen", "abbreviation"),  # a brand the dictionary lacks
    ("Novolog", "insulin aspart", "exact"),                    # "(rdna origin)" left out of the generic name
    ("lisinipril", "lisinopril", "fuzzy"),                     # misspelt
    ("insulin glargene", "insulin glargine", "fuzzy"),
    ("lisinopril/HCTZ", "lisinopril / hydrochlorothiazide", "combination"),
])
def test_names_as_written_resolve_to_generic_names(drugs, written, generic, how):
    found = drugs.lookup(written)
    assert found is not None and (found.generic_name, found.match) == (generic, how), found
    assert 0 < found.score <= 1


def test_identifiers_brands_and_what_is_not_a_drug(drugs):
    found = drugs.lookup("Glucophage")
    assert (found.drugbank_id, found.medline_plus_id) == ("DB00331", "a696005") and found.mesh_id
    for nothing in ("not stated", "", "N/A", "qqqqzzz"):
        assert drugs.lookup(nothing) is None
    assert drugs.release.startswith("drug-named-entity-recognition 2.")


def test_the_drug_list_is_extendable(drugs, monkeypatch):
    monkeypatch.setitem(DRUG_ABBREVIATIONS, "placeholder", "")
    register_drug({"FooBrandX": "metformin"})
    try:
        drugs.lookup.cache_clear()
        assert drugs.lookup("foobrandx").generic_name == "metformin"
    finally:
        DRUG_ABBREVIATIONS.pop("foobrandx", None)
        drugs.lookup.cache_clear()


@pytest.mark.parametrize("dose, unit, value, high, canonical", [
    ("500 mg", None, 500, None, "mg"), ("500", "mg", 500, None, "mg"), ("1,000mg", None, 1000, None, "mg"),
    ("0.5 mL", None, 0.5, None, "mL"), ("1-2 tabs", None, 1, 2, "tablet"), ("1 to 2 tablets", None, 1, 2, "tablet"),
    ("1/2 tab", None, 0.5, None, "tablet"), ("two puffs", None, 2, None, "puff"), ("10 units", None, 10, None, "unit"),
    ("100 mcg", None, 100, None, "mcg"), ("5 mg/ml", None, 5, None, "mg/mL"), ("10 mg/5 mL", None, 10, None, "mg/5 mL"),
    ("20", "milligrams", 20, None, "mg"), ("2 gtts", None, 2, None, "drop"), ("81mg", None, 81, None, "mg"),
    ("vitamin D3 1000 units", None, 1000, None, "unit"),  # a number inside a word is not an amount
])
def test_amounts(dose, unit, value, high, canonical):
    assert doses.parse_amount(dose, unit) == doses.Amount(value, high, canonical)


@pytest.mark.parametrize("written", ["not stated", "", None, "as directed"])
def test_no_amount(written):
    assert doses.parse_amount(written) is None


@pytest.mark.parametrize("frequency, per_day, prn", [
    ("BID", 2, False), ("b.i.d.", 2, False), ("twice daily", 2, False), ("TID", 3, False), ("QID", 4, False),
    ("q8h", 3, False), ("every 12 hours", 2, False), ("q4-6h PRN", 6, True), ("Q6H PRN", 4, True),
    ("daily", 1, False), ("QD", 1, False), ("once a day", 1, False), ("qHS", 1, False), ("at bedtime", 1, False),
    ("3 times a day", 3, False), ("4x/day", 4, False), ("every other day", 0.5, False), ("once weekly", 0.1429, False),
    ("twice weekly", 0.2857, False), ("monthly", 0.0333, False), ("TID with meals", 3, False), ("AC", 3, False),
    ("1 tab po bid for 10 days", 2, False), ("PRN", None, True), ("as needed for pain", None, True),
    ("stat", None, False), ("not stated", None, False),
])
def test_frequencies(frequency, per_day, prn):
    assert doses.parse_frequency(frequency) == doses.Frequency(per_day, prn)


@pytest.mark.parametrize("route, canonical", [
    ("PO", "oral"), ("p.o.", "oral"), ("by mouth", "oral"), ("SQ", "subcutaneous"), ("sub-q", "subcutaneous"),
    ("subcut", "subcutaneous"), ("IV push", "intravenous"), ("IM", "intramuscular"), ("SL", "sublingual"),
    ("PR", "rectal"), ("inhaled", "inhalation"), ("neb", "inhalation"), ("topical", "topical"),
    ("per NG tube", "enteral"), ("OU", "ophthalmic"), ("transdermal patch", "transdermal"), ("not stated", None),
])
def test_routes(route, canonical):
    assert doses.normalize_route(route) == canonical


@pytest.mark.parametrize("written, days", [
    ("for 7 days", 7), ("x10d", 10), ("2 weeks", 14), ("x 5 days", 5), ("1 month", 30), ("BID", None), (None, None),
])
def test_durations(written, days):
    assert doses.parse_duration(written) == days
