"""The linking stage on a chunk's rows, the coded prompt (its own id: clinical_extraction keeps its result keys),
the tables' definitions, scoring codes in medvlm eval, and ``medvlm codes`` lookups."""

from __future__ import annotations

import json
from datetime import datetime, timezone


from medvlm_core.codes import linking
from medvlm_core.evals.gold import BUILTIN_FIELDS
from medvlm_core.evals.matching import Thresholds, kind_of, values_match
from medvlm_core.inputs.prompts import get_prompt
from medvlm_core.output import results
from medvlm_core.output.code_tables import CODE_TABLES, DIAGNOSIS_CODE_COLUMNS, MEDICATION_CODE_COLUMNS
from medvlm_core.output.structured import CLINICAL_CODED_SCHEMA, CLINICAL_SCHEMA, flatten, tables_for
from support.offline import no_network, prefect_server  # noqa: F401  (fixtures)

KEYS = {"run_id": "r1", "result_key": "ab" * 32, "document_id": "d", "page": 1, "patient_id": "P", "encounter_id": "E"}
AT = datetime(2026, 12, 6, tzinfo=timezone.utc)
# clinical_extraction's prompt hash at the release before codes: the text and schema of its prompt, and so the
# result key of every answer it has given, must not change (the coded fields have a prompt id of their own).
CLINICAL_EXTRACTION_SHA256 = "1bd3085c1cdb8a521feac27ef3255aec5bc7f26a464637e73119c7d7802ced6a"

def clinical_tables(prompt_id="clinical_extraction_coded", schema=CLINICAL_CODED_SCHEMA):
    return {name: ([], arrow) for name, (_, arrow) in tables_for(prompt_id, schema).items()}


def test_clinical_extraction_keeps_its_prompt_hash_and_the_coded_prompt_has_its_own():
    assert get_prompt("clinical_extraction").sha256 == CLINICAL_EXTRACTION_SHA256
    coded = get_prompt("clinical_extraction_coded")
    assert coded.schema == CLINICAL_CODED_SCHEMA and coded.sha256 != CLINICAL_EXTRACTION_SHA256
    items = CLINICAL_CODED_SCHEMA["properties"]["diagnoses"]["items"]
    assert {"icd10cm_code", "negated", "historical", "family_history", "hypothetical"} <= set(items["properties"])
    assert "icd10cm_code" not in items["required"] and "negated" in items["required"]  # the code is optional
    meds = CLINICAL_CODED_SCHEMA["properties"]["medications"]["items"]
    assert {"strength", "form", "duration"} <= set(meds["required"])
    assert "negated" not in CLINICAL_SCHEMA["properties"]["diagnoses"]["items"]["properties"]  # unchanged


def test_both_clinical_prompts_write_the_same_columns_ending_with_the_linked_ones():
    plain, coded = tables_for("clinical_extraction", CLINICAL_SCHEMA), tables_for("clinical_extraction_coded",
                                                                                 CLINICAL_CODED_SCHEMA)
    for table in ("diagnoses", "medications", "instructions"):
        assert plain[table][1].equals(coded[table][1])
    names = plain["diagnoses"][1].names
    assert names[-len(DIAGNOSIS_CODE_COLUMNS):] == [c.name for c in DIAGNOSIS_CODE_COLUMNS]
    assert plain["medications"][1].names[-len(MEDICATION_CODE_COLUMNS):] == [c.name for c in MEDICATION_CODE_COLUMNS]
    assert names.count("icd10cm_code") == 1 and {"negated", "hypothetical"} <= set(names)


def test_the_model_code_is_checked_and_an_invented_one_is_never_used():
    answer = {"diagnoses": [
        {"name": "T2DM", "evidence": "A1c 8.9", "icd10cm_code": "E11.999", "negated": False, "historical": False,
         "family_history": False, "hypothetical": False},                    # invented: flagged, the search's code
        {"name": "HTN", "evidence": "", "icd10cm_code": "i10"},              # valid (dots and case aside): kept
        {"name": "hip fracture", "evidence": ""},                            # none given: the search's code
        {"name": "not stated", "evidence": ""},                              # nothing to link
    ], "medications": [
        {"name": "Glucophage", "dose": "500", "unit": "mg", "route": "PO", "frequency": "BID", "strength": "500 mg",
         "form": "tablet", "duration": "for 30 days"},
        {"name": "Tylenol", "dose": "1-2", "unit": "tabs", "route": "by mouth", "frequency": "q4-6h PRN"},
    ], "instructions": []}
    rows = flatten("clinical_extraction_coded", CLINICAL_CODED_SCHEMA, answer, KEYS)
    tables = clinical_tables()
    for name, table_rows in rows.items():
        tables[name][0].extend(table_rows)
    linking.link_structured(tables, "r1", AT)
    t2dm, htn, hip, empty = tables["diagnoses"][0]
    assert (t2dm["icd10cm_code"], t2dm["icd10cm_source"], t2dm["icd10cm_model_code"],
            t2dm["icd10cm_model_code_valid"]) == ("E11.9", "search", "E11.999", False)
    assert (htn["icd10cm_code"], htn["icd10cm_source"], htn["icd10cm_model_code_valid"], htn["icd10cm_billable"]) \
        == ("I10", "model", True, True)
    assert htn["icd10cm_chapter"].startswith("09 ") and htn["icd10cm_category"] == "I10" and htn["icd10cm_score"] == 1.0
    assert (hip["icd10cm_category"], hip["icd10cm_source"], hip["icd10cm_model_code"]) == ("S72", "search", None)
    assert empty["icd10cm_code"] is None and empty["code_set_release"].startswith("ICD-10-CM")
    candidates = tables["diagnosis_codes"][0]
    assert {c["item_index"] for c in candidates} == {0, 1, 2} and all(c["link_id"] == "r1" for c in candidates)
    assert [c["rank"] for c in candidates if c["item_index"] == 0] == [1, 2, 3, 4, 5]
    assert [c["code"] for c in candidates if c["chosen"] and c["item_index"] == 1] == ["I10"]
    glucophage, tylenol = tables["medications"][0]
    assert {k: glucophage[k] for k in ("generic_name", "drugbank_id", "dose_value", "dose_unit", "strength_value",
                                        "strength_unit", "frequency_per_day", "prn", "route_normalized",
                                        "duration_days")} == {
        "generic_name": "metformin", "drugbank_id": "DB00331", "dose_value": 500.0, "dose_unit": "mg",
        "strength_value": 500.0, "strength_unit": "mg", "frequency_per_day": 2.0, "prn": False,
        "route_normalized": "oral", "duration_days": 30.0}
    assert (tylenol["generic_name"], tylenol["dose_value"], tylenol["dose_max"], tylenol["dose_unit"],
            tylenol["frequency_per_day"], tylenol["prn"]) == ("acetaminophen", 1.0, 2.0, "tablet", 6.0, True)
    # every table passes its checks and is written in its schema
    for name, (table_rows, arrow) in tables.items():
        results.validate_table(name, results.to_table(table_rows, arrow, name))
    import polars as pl

    from medvlm_core.validation import passes

    codes = CODE_TABLES["diagnosis_codes"]
    assert passes(codes.pandera_schema(), pl.from_arrow(codes.rows_to_arrow(candidates)))


def test_a_failed_linking_writes_the_answers_unlinked(monkeypatch, caplog):
    tables = clinical_tables()
    tables["diagnoses"][0].append(dict(KEYS, item_index=0, name="T2DM", icd10cm_code="E11.999"))

    def broken(*args, **kwargs):
        raise RuntimeError("no code set")

    monkeypatch.setattr(linking, "link_diagnosis", broken)
    linking.link_structured(tables, "r1", AT)
    [row] = tables["diagnoses"][0]
    assert row["icd10cm_code"] is None and row["icd10cm_model_code"] == "E11.999"  # never passed off as checked
    assert "diagnosis_codes" not in tables and "medvlm codes link" in caplog.text


def test_a_chunk_without_clinical_tables_is_left_alone():
    tables = {"vitals": ([{"name": "BP"}], None)}
    linking.link_structured(tables, "r1", AT)
    assert tables == {"vitals": ([{"name": "BP"}], None)}


def test_eval_scores_codes_exactly_and_by_category():
    assert {"icd10cm_code", "icd10cm_category", "negated"} <= set(BUILTIN_FIELDS["diagnoses"])
    assert {"generic_name", "strength"} <= set(BUILTIN_FIELDS["medications"])
    t = Thresholds()
    assert kind_of("icd10cm_code") == "code"
    assert values_match("code", "E11.9", "e119", t) and values_match("code", "E11.65|E11.9", "E11.9", t)
    assert not values_match("code", "E11.65", "E11.9", t) and values_match("code", "E11", "E11", t)


def test_codes_command_lookups_as_json(capsys):
    from medvlm.flows.cli import main

    assert main(["codes", "icd10cm", "T2DM", "HTN", "--top", "2", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in out] == ["T2DM", "HTN"] and [len(r["candidates"]) for r in out] == [2, 2]
    assert out[0]["candidates"][0] == {"code": "E11.9", "description": "Type 2 diabetes mellitus without complications",
                                       "score": 1.0, "billable": True}
    assert main(["codes", "icd10cm", "--validate", "E11.9", "E11.999", "--format", "json"]) == 1  # one is invalid
    checks = json.loads(capsys.readouterr().out)
    assert [(c["code"], c["valid"], c["billable"]) for c in checks] == [("E11.9", True, True),
                                                                         ("E11.999", False, False)]
    assert main(["codes", "drug", "Glucophage", "nonsenseqq", "--format", "json"]) == 0
    drugs = json.loads(capsys.readouterr().out)
    assert (drugs[0]["generic_name"], drugs[0]["drugbank_id"], drugs[0]["score"]) == ("metformin", "DB00331", 1.0)
    assert drugs[1]["generic_name"] is None
    assert main(["codes", "icd10cm", "afib"]) == 0 and "I48.91" in capsys.readouterr().out


def test_the_docs_name_every_coded_column():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[3] / "docs" / "codes.md").read_text(encoding="utf-8")
    keys = {"run_id", "result_key", "document_id", "page", "patient_id", "encounter_id", "item_index"}
    columns = {c.name for table in CODE_TABLES.values() for c in table.columns} | {
        c.name for c in DIAGNOSIS_CODE_COLUMNS + MEDICATION_CODE_COLUMNS}
    assert not [c for c in sorted(columns - keys) if f"`{c}`" not in page]
