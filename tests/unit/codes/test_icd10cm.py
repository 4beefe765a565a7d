"""The ICD-10-CM code set: loading (once per process), checking codes, and the search over how clinicians write."""

from __future__ import annotations

import pytest

from medvlm_core.codes import text
from medvlm_core.codes.abbreviations import ABBREVIATIONS, register
from medvlm_core.codes.icd10cm import code_set
from support.offline import no_network, prefect_server  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def codes():
    return code_set()


def test_the_code_set_is_loaded_once_and_names_its_release(codes):
    assert code_set() is codes
    assert codes.release.startswith("ICD-10-CM April 1, 2026 (simple-icd-10-cm ")


@pytest.mark.parametrize("written, normalized, valid, billable", [
    ("E11.9", "E11.9", True, True),
    ("e119", "E11.9", True, True),      # dots and case do not matter
    (" I10 ", "I10", True, True),        # a category that is billable itself
    ("E11", "E11", True, False),        # a category with children
    ("S72.001A", "S72.001A", True, True),  # a 7th-character extension is checked, though not searched
    ("E11.999", None, False, False),    # the shape of a code, not a code: invented
    ("Z99.99Z", None, False, False),
    ("4", None, False, False),          # a chapter is not a code
    ("E08-E13", None, False, False),    # nor a block
    ("", None, False, False),
])
def test_codes_are_checked(codes, written, normalized, valid, billable):
    check = codes.check(written)
    assert (check.normalized, check.valid, check.billable) == (normalized, valid, billable)
    assert (check.description is not None) == valid


def test_chapters_and_descriptions(codes):
    assert codes.chapter("E11.9") == "04 Endocrine, nutritional and metabolic diseases (E00-E89)"
    assert codes.chapter("I10") == "09 Diseases of the circulatory system (I00-I99)"
    assert codes.chapter("XX") is None
    assert codes.descriptions(["B20", "nope"]) == {"B20": "Human immunodeficiency virus [HIV] disease"}


# How clinicians write: abbreviations, lay and eponym forms, misspellings, word order, qualifiers.
@pytest.mark.parametrize("written, code", [
    ("T2DM", "E11.9"), ("DM II", "E11.9"), ("type II diabetes", "E11.9"), ("diabetes", "E11.9"),
    ("HTN", "I10"), ("high blood pressure", "I10"), ("CKD stage 3", "N18.30"), ("CKD3a", "N18.31"),
    ("CHF", "I50.9"), ("COPD", "J44.9"), ("AKI", "N17.9"), ("UTI", "N39.0"), ("afib", "I48.91"),
    ("a-fib with RVR", "I48.91"), ("GERD", "K21.9"), ("heart attack", "I21.9"), ("stroke", "I63.9"),
    ("pnuemonia", "J18.9"), ("hypertenshun", "I10"), ("osteoperosis", "M81.0"), ("HIV", "B20"),
    ("failure heart congestive", "I50.9"), ("T2DM with CKD", "E11.22"), ("diabetic nephropathy", "E11.21"),
    ("acute on chronic systolic heart failure", "I50.23"), ("cellulitis of left leg", "L03.116"),
    ("Hashimoto's thyroiditis", "E06.3"), ("major depressive disorder", "F32.9"),
])
def test_the_search_reads_clinical_writing(codes, written, code):
    found = codes.search(written, 5)
    assert found and found[0].code == code, [(c.code, c.score) for c in found]
    assert 0 < found[0].score <= 1 and found == sorted(found, key=lambda c: -c.score)


def test_categories_give_way_to_billable_children_and_the_choice_is_billable(codes):
    found = codes.search("coronary artery disease", 5)
    assert found[0].category == "I25"
    chosen = codes.billable_choice(found[0], "coronary artery disease")
    assert chosen.billable and chosen.code.startswith(found[0].code) and chosen.code == "I25.10"
    # a code that needs a 7th character keeps its (valid, not billable) search code
    hip = codes.search("hip fracture", 1)[0]
    assert hip.category == "S72" and codes.billable_choice(hip, "hip fracture").billable is False


def test_nothing_matches_nonsense_and_code_scores(codes):
    assert codes.search("zzqx qqzz", 5) == []
    assert codes.code_score("I10", "hypertension") == 1.0
    assert codes.code_score("E11.9", "hypertension") < 0.2
    assert codes.code_score("S72.001A", "hip fracture") == 0.0  # extensions are not searched


def test_query_reading_with_and_without_and_abbreviations():
    reading = text.query_terms("T2DM without complications")[0]
    assert {"type", "2", "diabete"} <= reading.required and reading.negated == {"complication"}
    terms = text.code_text_terms("Migraine without aura, intractable, without status migrainosus")
    assert "intractable" in terms.required and {"aura", "status", "migrainosus"} <= terms.negated
    assert "primary" in text.code_text_terms("Essential (primary) hypertension").optional
    # an ambiguous abbreviation is read in each meaning, the first first; the words as written come last
    readings = text.expansions("MS")
    assert readings[:2] == [["multiple", "sclerosis"], ["mitral", "stenosis"]] and readings[-1] == ["ms"]
    assert text.expansions("mm") == [["multiple", "myeloma"], ["mm"]]
    assert ["nodule", "8", "mm"] in text.expansions("nodule 8 mm")  # a unit inside a phrase stays a unit


def test_the_abbreviation_list_is_extendable(codes, monkeypatch):
    monkeypatch.setitem(ABBREVIATIONS, "xyzzy", ("pulmonary embolism",))
    register({"plughx": "iron deficiency anemia"})
    try:
        assert codes.search("xyzzy", 1)[0].category == "I26"
        assert codes.search("PLUGHX", 1)[0].code == "D50.9"
    finally:
        ABBREVIATIONS.pop("plughx", None)
