"""Coded answers end to end: a real structured run (llama.cpp on the generated tiny model) writes code columns,
``medvlm codes link`` re-codes its output append-only and the current views show the new codes, ``medvlm eval``
scores codes, and the command needs no network (the unit tests load and use the code sets offline too)."""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from conftest import batch, write_manifest
from medvlm_core.analytics import EXAMPLE_QUERIES, query
from medvlm_core.codes.abbreviations import ABBREVIATIONS
from medvlm_core.codes.icd10cm import code_set
from medvlm_core.codes.relink import relink
from medvlm_core.inputs import prompts
from medvlm_core.output.structured import CLINICAL_CODED_SCHEMA
from medvlm_core.storage import Storage

pytestmark = pytest.mark.e2e  # pytest -m 'not e2e' leaves these out


def _refused(*args, **kwargs):
    raise OSError("no network in this test")  # the linking must need none


def forced_schema() -> dict:
    """The coded schema, narrowed so that even the random tiny model writes items: one diagnosis whose code the
    model invents (E11.999 is not an ICD-10-CM code), one medication."""
    schema = copy.deepcopy(CLINICAL_CODED_SCHEMA)
    diagnoses = schema["properties"]["diagnoses"]
    diagnoses.update(minItems=1, maxItems=1)
    diagnoses["items"]["properties"].update(name={"const": "T2DM"}, evidence={"const": "x"},
                                            icd10cm_code={"const": "E11.999"})
    diagnoses["items"]["required"] = diagnoses["items"]["required"] + ["icd10cm_code"]
    medications = schema["properties"]["medications"]
    medications.update(minItems=1, maxItems=1)
    medications["items"]["properties"].update(
        name={"enum": ["Glucophage", "Lasix 40 mg"]}, dose={"enum": ["500", "40"]}, unit={"const": "mg"},
        route={"enum": ["PO", "IV"]}, frequency={"enum": ["BID", "q8h PRN"]}, reasoning={"const": "x"},
        condition={"const": ""}, strength={"const": "500 mg"}, form={"const": "tablet"}, duration={"const": "7 days"})
    schema["properties"]["instructions"]["maxItems"] = 0
    return schema


def read(output: Path, table: str) -> list[dict]:
    return ds.dataset(output / table, format="parquet", partitioning="hive").to_table().to_pylist()


def test_a_structured_run_links_codes_and_codes_link_recodes_it(tmp_path, tiny_llava, demo_docs, monkeypatch, capsys):
    monkeypatch.setitem(prompts.SCHEMAS, "clinical_extraction_coded", forced_schema())
    output = tmp_path / "out"
    manifest = write_manifest(tmp_path / "m.csv", demo_docs)
    state = batch(manifest=str(manifest), output=str(output), model=str(tiny_llava.model_path),
                  mmproj=str(tiny_llava.mmproj_path), prompt_id="clinical_extraction_coded", max_tokens=1500,
                  n_ctx=4096, return_state=True)
    assert state.is_completed(), state.message
    codes = code_set()

    # the run wrote the code columns: every code exists, the model's invented code is flagged and not used
    diagnoses = read(output, "diagnoses")
    assert len(diagnoses) == 3 and {d["name"] for d in diagnoses} == {"T2DM"}
    for row in diagnoses:
        assert codes.check(row["icd10cm_code"]).valid and row["icd10cm_code"] == "E11.9"
        assert (row["icd10cm_model_code"], row["icd10cm_model_code_valid"], row["icd10cm_source"]) == (
            "E11.999", False, "search")
        assert row["code_set_release"] == codes.release and row["icd10cm_category"] == "E11"
        assert isinstance(row["negated"], bool)  # the traits, as the model said them
    candidates = read(output, "diagnosis_codes")
    assert {c["code"] for c in candidates if c["rank"] == 1} == {"E11.9"}
    assert all(codes.check(c["code"]).valid for c in candidates)
    expected_frequency = {"BID": (2.0, False), "q8h PRN": (3.0, True)}
    for med in read(output, "medications"):
        generic = {"Glucophage": "metformin", "Lasix 40 mg": "furosemide"}[med["name"]]
        assert (med["generic_name"], med["drugbank_id"] is not None) == (generic, True)
        assert (med["frequency_per_day"], med["prn"]) == expected_frequency[med["frequency"]]
        assert med["route_normalized"] == {"PO": "oral", "IV": "intravenous"}[med["route"]]
        assert (med["dose_unit"], med["strength_value"], med["duration_days"]) == ("mg", 500.0, 7.0)
    storage = Storage()
    meds = query(str(output), EXAMPLE_QUERIES["medications_by_generic_name"], storage).to_pylist()
    assert sum(m["mentions"] for m in meds) == 3
    chapters = query(str(output), EXAMPLE_QUERIES["patients_by_icd10cm_chapter"], storage)
    categories = query(str(output), EXAMPLE_QUERIES["patients_by_icd10cm_category"], storage)
    assert chapters.num_rows == categories.num_rows <= 1  # the random model may call the diagnosis negated

    # a code set "update" (here: the abbreviation list), then medvlm codes link: append-only, current views follow
    with monkeypatch.context() as update:
        update.setitem(ABBREVIATIONS, "t2dm", ("hypothyroidism",))
        summary = relink(str(output), storage)
    assert summary.items == {"diagnoses": 3, "medications": 3}
    current = query(str(output), "select icd10cm_code, icd10cm_source, icd10cm_model_code_valid, code_set_release "
                                 "from diagnoses_current", storage).to_pylist()
    assert [c["icd10cm_code"] for c in current] == ["E03.9"] * 3
    assert {(c["icd10cm_source"], c["icd10cm_model_code_valid"], c["code_set_release"]) for c in current} == {
        ("search", False, codes.release)}
    assert {d["icd10cm_code"] for d in read(output, "diagnoses")} == {"E11.9"}  # the history as the run wrote it
    links = query(str(output), "select distinct link_id from diagnosis_codes_current", storage).to_pylist()
    assert links == [{"link_id": summary.link_id}]

    # the command, with the network refused: links again; its linking is now current
    from medvlm.flows.cli import main

    with monkeypatch.context() as offline:
        for target, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"), (socket, "create_connection")):
            offline.setattr(target, name, _refused)
        assert main(["codes", "link", "--output", str(output)]) == 0
    assert "3 diagnoses, 3 medications linked" in capsys.readouterr().out
    current = query(str(output), "select icd10cm_code from diagnoses_current", storage).to_pylist()
    assert [c["icd10cm_code"] for c in current] == ["E11.9"] * 3
    linkings = query(str(output), "select count(distinct link_id) as n from diagnosis_links", storage).to_pylist()
    assert linkings == [{"n": 2}]
    meds_now = query(str(output), "select generic_name, code_set_release from medications_current", storage).to_pylist()
    assert all(m["generic_name"] and m["code_set_release"].startswith("drug-named-entity-recognition")
               for m in meds_now)

    # medvlm eval scores the codes: exactly, and by category
    from medvlm_core.evals import evaluate

    docs = sorted({d["document_id"] for d in diagnoses})
    gold = tmp_path / "gold.csv"
    gold.write_text("document_id,page,table,name,icd10cm_code\n"
                    f"{docs[0]},1,diagnoses,T2DM,E11.9\n{docs[1]},1,diagnoses,T2DM,E11.65\n")
    evaluation = evaluate(str(output), str(gold), storage, options={"bootstrap_samples": 0})
    fields = {r["field"]: r for r in evaluation.rows if r["section"] == "field" and r["table_name"] == "diagnoses"}
    assert (fields["icd10cm_code"]["tp"], fields["icd10cm_code"]["fp"], fields["icd10cm_code"]["fn"]) == (1, 1, 1)
    assert (fields["icd10cm_category"]["tp"], fields["icd10cm_category"]["fp"]) == (2, 0)
