"""Corrections: submissions turned into rows (the value before from the server, errors that never echo a value),
the append-only ``corrections`` table (one file per submission), the verified views and ``document_status``."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
from review_builders import STORAGE, T0, build_output, key, submit

from medvlm_core import analytics
from medvlm_core.analytics import query
from medvlm_core.output.tables import ACCESS_LOG, CORRECTIONS, REVIEW_TABLES
from medvlm_core.review.corrections import write_corrections
from medvlm_core.review.submit import CorrectionError, submission_rows

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def prefect_server():
    """Nothing here uses Prefect (overrides the session's autouse test server)."""
    yield


def rows(out: Path, sql: str) -> list[dict]:
    return query(str(out), sql, STORAGE).to_pylist()


def test_the_review_tables_are_defined_once_and_documented():
    assert set(REVIEW_TABLES) == {"corrections", "access_log"}
    page = (ROOT / "docs" / "review.md").read_text()
    for table in (CORRECTIONS, ACCESS_LOG):  # the docs list every column of both tables
        section = page.split(f"### `{table.name}`", 1)[1].split("###", 1)[0]
        documented = re.findall(r"^\| `([a-z_]+)` \|", section, re.M)
        assert documented == list(table.column_names), table.name


def test_corrections_become_the_verified_view(tmp_path):
    out = build_output(tmp_path)
    d1 = [{"table": "vitals", "item": 0, "action": "accept"},
          {"table": "vitals", "item": 1, "action": "edit", "values": {"name": "Heart rate", "value": ""}},
          {"table": "vitals", "action": "add", "values": {"name": "SpO2", "value": "98"}}]
    written = submit(out, "d1", "vitals", "alice", d1, 1)
    edit = [r for r in written if r["action"] == "edit"]
    # one row per changed field, the value before as the server read it (the model's), a cleared field null
    assert [(r["field"], r["value_before"], r["value_after"]) for r in edit] == [("name", "HR", "Heart rate"),
                                                                                ("value", "72", None)]
    # d2: delete one medication, restore it later with an edit; two reviewers edit the same dose: the later wins
    submit(out, "d2", "clinical_extraction", "bob", [{"table": "medications", "item": 0, "action": "delete"}], 2)
    submit(out, "d2", "clinical_extraction", "bob", [
        {"table": "medications", "item": 1, "action": "edit", "values": {"dose": "20", "conditional": "yes"}}], 3)
    submit(out, "d2", "clinical_extraction", "carol", [
        {"table": "medications", "item": 1, "action": "edit", "values": {"dose": "25"}},
        {"table": "diagnoses", "item": 0, "action": "delete"}], 4)
    submit(out, "d2", "clinical_extraction", "alice", [
        {"table": "medications", "item": 0, "action": "edit", "values": {"dose": "500"}}], 5)
    # every submission is its own file; the model's files are untouched
    files = sorted(p.name for p in (out / "corrections").rglob("*.parquet"))
    assert len(files) == 5 and all(f.startswith("part-s") for f in files)

    vitals = rows(out, "select document_id, item_index, name, value, verified_by from vitals_verified "
                       "order by document_id, item_index nulls last")
    assert vitals == [
        {"document_id": "d1", "item_index": 0, "name": "BP", "value": "120/80", "verified_by": "alice"},
        {"document_id": "d1", "item_index": 1, "name": "Heart rate", "value": None, "verified_by": "alice"},
        {"document_id": "d1", "item_index": None, "name": "SpO2", "value": "98", "verified_by": "alice"},
        {"document_id": "d5", "item_index": 0, "name": "T", "value": "37.1", "verified_by": None},
        {"document_id": "d6", "item_index": 0, "name": "RR", "value": "16", "verified_by": None}]
    meds = rows(out, "select item_index, name, dose, conditional, verified_by from medications_verified "
                     "order by item_index")
    assert meds == [{"item_index": 0, "name": "Metformin", "dose": "500", "conditional": False, "verified_by": "alice"},
                    {"item_index": 1, "name": "Lisinopril", "dose": "25", "conditional": True, "verified_by": "carol"}]
    assert rows(out, "select document_id, name from diagnoses_verified") == [{"document_id": "d6", "name": "Asthma"}]
    # the model's rows are as they were
    assert rows(out, "select dose from medications order by item_index") == [{"dose": "abc"}, {"dose": "10"}]
    # the review tables have no current view
    names = set(analytics.query(str(out), "select view_name from duckdb_views() where not internal", STORAGE)
                .column("view_name").to_pylist())
    assert {"corrections", "vitals_verified", "medications_verified"} <= names
    assert not {"corrections_current", "access_log_current", "corrections_verified"} & names

    # page done: the items nobody decided are accepted by the reviewer, then the page is reviewed
    done = submit(out, "d5", "vitals", "dan", [{"table": "vitals", "action": "reviewed"}], 6)
    assert [(r["action"], r["item"]) for r in done] == [("accept", 0), ("reviewed", None)]
    status = {r["document_id"]: r["reviewed"] for r in rows(out, "select document_id, reviewed from document_status")}
    assert status == {"d1": 0, "d2": 0, "d3": 0, "d4": 0, "d5": 1, "d6": 0}
    assert analytics.document_status(str(out), STORAGE, "d5").to_pylist()[0]["reviewed"] == 1

    # a later run answers d1 again under a new key: its items are current, unreviewed; the corrections stay
    build_output(tmp_path, run_id="r2", at=T0 + timedelta(hours=1), only={"d1", "d5"}, model="m2")
    later = rows(out, "select run_id, item_index, name, verified_by from vitals_verified where document_id = 'd1' "
                      "order by item_index")
    assert later == [{"run_id": "r2", "item_index": 0, "name": "BP", "verified_by": None},
                     {"run_id": "r2", "item_index": 1, "name": "HR", "verified_by": None}]
    status = {r["document_id"]: r["reviewed"] for r in rows(out, "select document_id, reviewed from document_status")}
    assert status["d5"] == 0  # reviewed the answer that is no longer current
    assert rows(out, "select count(*) as n from corrections") == [{"n": 13}]


def test_a_bad_submission_names_the_rule_never_the_value(tmp_path):
    out = build_output(tmp_path)
    secret = "Zyxwvut-secret"
    cases = [
        ({"table": "prescriptions", "item": 0, "action": "accept"}, "table must be one of this page's tables"),
        ({"table": "vitals", "item": 7, "action": "accept"}, "no such item on this page"),
        ({"table": "vitals", "action": "accept"}, "name the item"),
        ({"table": "vitals", "item": 0, "action": "approve"}, "action must be one of"),
        ({"table": "vitals", "item": 0, "action": "edit", "values": {secret: "x"}}, "has no field"),
        ({"table": "vitals", "item": 0, "action": "edit", "values": {"name": secret * 200}}, "longer than 2000"),
        ({"table": "vitals", "item": 0, "action": "edit", "values": {"name": {"a": secret}}}, "must be text"),
        ({"table": "vitals", "action": "add", "values": {"name": ""}}, "at least one value"),
        ({"table": "vitals", "action": "add"}, "needs values"),
    ]
    for action, message in cases:
        with pytest.raises(CorrectionError) as caught:
            submit(out, "d1", "vitals", "alice", [action], 1)
        assert message in str(caught.value), (action, str(caught.value))
        if "has no field" not in message:  # (a field's name is named, as the schema spells it)
            assert secret not in str(caught.value)
    with pytest.raises(CorrectionError, match="must be true or false"):
        submit(out, "d2", "clinical_extraction", "a", [
            {"table": "medications", "item": 0, "action": "edit", "values": {"conditional": "perhaps"}}], 1)
    with pytest.raises(CorrectionError, match="no page"):
        submit(out, "d4", "clinical_extraction", "a", [{"table": "diagnoses", "action": "reviewed"}], 1)
    with pytest.raises(CorrectionError, match="actions must be a list"):
        submission_rows({"actions": []}, None, "a", T0, "s")
    assert not (out / "corrections").exists()


def test_an_invalid_correction_row_is_never_written(tmp_path):
    out = build_output(tmp_path)
    row = {"submission_id": "s1", "seq": 0, "created_at": T0, "reviewer": "a", "run_id": "r1",
           "result_key": key("r1", "d1", "vitals", "m1"), "document_id": "d1", "page": 1, "table_name": "vitals",
           "item": 0, "action": "edit"}  # an edit without a field
    with pytest.raises(RuntimeError, match="invalid corrections table"):
        write_corrections(STORAGE, str(out), [row], T0)
    with pytest.raises(ValueError, match="one submission per file"):
        write_corrections(STORAGE, str(out), [dict(row, field="name"), dict(row, field="name", submission_id="s2")], T0)
