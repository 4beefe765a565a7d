"""What to check (the queue's reasons, thresholds, order and filters) and the gold export (which pages, which
items, which fields), on hand-built outputs; the exported file loads and scores with ``medvlm eval``'s code."""

from __future__ import annotations

import csv
import json
from datetime import timedelta

import pytest
from review_builders import STORAGE, T0, build_output, submit

from medvlm_core.analytics import connect
from medvlm_core.errors import RunError
from medvlm_core.evals import evaluate
from medvlm_core.evals.gold import load_gold
from medvlm_core.output import results
from medvlm_core.output.tables import EVALS
from medvlm_core.review.export import export_gold
from medvlm_core.review.queue import build_queue, counts, mark_done, next_page, select


@pytest.fixture(scope="module")
def prefect_server():
    """Nothing here uses Prefect (overrides the session's autouse test server)."""
    yield


def queue_of(out, threshold=0.5, picked=()):
    con = connect(str(out), STORAGE)
    try:
        queue = build_queue(con, STORAGE, threshold, picked)
        mark_done(con, queue.entries)
        return queue
    finally:
        con.close()


def described(queue) -> list[tuple]:
    return [(e.document_id, e.table_name, e.item, e.reason) for e in queue.entries]


def test_the_queue_reasons_order_and_thresholds(tmp_path):
    out = build_output(tmp_path)
    queue = queue_of(out, picked=["d6"])
    assert described(queue) == [
        ("d6", None, None, "picked"), ("d6", None, None, "picked"),  # its two answers (two prompts)
        ("d3", None, None, "no_answer:error"),  # d4 has no page: nothing to show
        ("d2", "medications", 0, "invalid:dose"),  # sure, but its dose is no number
        ("d5", "vitals", 0, "no_confidence"),
        ("d1", "vitals", 1, "low_confidence"),  # 0.2
        ("d2", "medications", 1, "low_confidence"),  # 0.4
    ]
    assert queue.thresholds == {"vitals": 0.5, "clinical_extraction": 0.5}
    assert {e.document_type for e in queue.entries if e.document_id in ("d1", "d3")} == {"lab_report"}
    # filters and counts
    assert [e.document_id for e in select(queue.entries, table="vitals")] == ["d6", "d5", "d1"]
    assert [e.document_id for e in select(queue.entries, document_type="lab_report")] == ["d3", "d1"]
    assert [e.item for e in select(queue.entries, reason="low_confidence")] == [1, 1]
    assert counts(queue.entries) == {"done": 0, "left": 7, "total": 7}
    # the latest evaluation's threshold for a prompt replaces --threshold for it
    day = f"{T0:%Y-%m-%d}"
    rows = [{"eval_id": e, "created_at": T0 + timedelta(hours=h), "section": "review", "metric": "threshold",
             "prompt_id": "vitals", "value": v} for e, h, v in (("e1", 1, 0.9), ("e2", 2, 0.1))]
    results.write_parquet(STORAGE, str(out / "evals" / f"run_date={day}" / "part-e.parquet"), EVALS.rows_to_arrow(rows))
    queue = queue_of(out)
    assert queue.thresholds == {"vitals": 0.1, "clinical_extraction": 0.5}
    assert queue.threshold_source == {"vitals": "eval e2", "clinical_extraction": "--threshold"}
    assert ("d1", "vitals", 1, "low_confidence") not in described(queue)  # 0.2 is above the eval's 0.1
    # done: an item acted on, or its page marked done
    submit(out, "d2", "clinical_extraction", "a", [{"table": "medications", "item": 0, "action": "accept"}], 1)
    submit(out, "d3", "clinical_extraction", "a", [{"table": "diagnoses", "action": "reviewed"}], 2)
    queue = queue_of(out)
    assert {(e.document_id, e.item) for e in queue.entries if e.done} == {("d2", 0), ("d3", None)}
    left = select(queue.entries, state="left")
    nxt = next_page(queue.entries, None)
    assert nxt is left[0] and next_page(queue.entries, (nxt.result_key, nxt.run_id)).document_id != nxt.document_id


def test_the_gold_export(tmp_path):
    out = build_output(tmp_path)
    with pytest.raises(RunError, match="no corrections yet"):
        export_gold(str(out), STORAGE, str(tmp_path / "g.csv"))
    # d1 (vitals): accept, delete, add; d2 (clinical): the dose fixed, a missed medication, page done for all three
    submit(out, "d1", "vitals", "a", [{"table": "vitals", "item": 1, "action": "delete"},
                                      {"table": "vitals", "action": "add", "values": {"name": "SpO2", "value": "97"}},
                                      {"table": "vitals", "action": "reviewed"}], 1)
    submit(out, "d2", "clinical_extraction", "a", [
        {"table": "medications", "item": 0, "action": "edit", "values": {"dose": "500"}},
        {"table": "medications", "action": "add", "values": {"name": "Aspirin", "dose": "81", "unit": "mg"}},
        {"table": "medications", "action": "add", "values": {"dose": "5"}},  # no name: cannot be gold
        *({"table": t, "action": "reviewed"} for t in ("diagnoses", "medications", "instructions"))], 2)
    # d6 asked both prompts, reviewed for vitals only: its page cannot be gold for the clinical tables
    submit(out, "d6", "vitals", "a", [{"table": "vitals", "action": "reviewed"}], 3)
    gold = tmp_path / "gold.csv"
    result = export_gold(str(out), STORAGE, str(gold), reviewer="exporter")
    assert (result.pages, result.tables) == (2, ["diagnoses", "medications", "vitals"])
    assert result.notes == ["1 page(s) left out: reviewed for only some of the file's tables while their answers fill "
                            "the others (export those tables apart with --table)",
                            "1 item(s) left out: their key field is empty"]
    with open(gold, newline="") as f:
        rows = list(csv.DictReader(f))
    got = sorted((r["document_id"], r["table"], r["name"], r.get("dose", ""), r.get("value", "")) for r in rows)
    assert got == [("d1", "vitals", "BP", "", "120/80"), ("d1", "vitals", "SpO2", "", "97"),
                   ("d2", "diagnoses", "Hypertension", "", ""), ("d2", "medications", "Aspirin", "81", ""),
                   ("d2", "medications", "Lisinopril", "10", ""), ("d2", "medications", "Metformin", "500", "")]
    assert "reasoning" not in rows[0] and {r["document_type"] for r in rows if r["document_id"] == "d1"} == {"lab_report"}
    assert {(r["name"], r["conditional"]) for r in rows if r["table"] == "medications"} == {
        ("Metformin", "false"), ("Lisinopril", "false"), ("Aspirin", "")}  # an empty cell: not labelled
    # d6 alone for vitals: the export of one table
    only = export_gold(str(out), STORAGE, str(tmp_path / "vitals.jsonl"), tables=["vitals"])
    assert only.pages == 2 and only.tables == ["vitals"] and not only.notes
    lines = [json.loads(x) for x in (tmp_path / "vitals.jsonl").read_text().splitlines()]
    assert {(r["document_id"], r["name"]) for r in lines} == {("d1", "BP"), ("d1", "SpO2"), ("d6", "RR")}
    parquet = export_gold(str(out), STORAGE, str(tmp_path / "gold.parquet"))
    assert parquet.items == result.items == 6
    # every format loads as gold, and scores the current answers
    for path in (gold, tmp_path / "vitals.jsonl", tmp_path / "gold.parquet"):
        assert load_gold(str(path), STORAGE).pages
    evaluation = evaluate(str(out), str(gold), STORAGE, options={"bootstrap_samples": 0})
    table = {(r["system"], r["table_name"]): r for r in evaluation.rows if r["section"] == "table"}
    meds = table[("current clinical_extraction", "medications")]
    assert (meds["tp"], meds["fp"], meds["fn"]) == (2, 0, 1)  # Metformin, Lisinopril found; Aspirin missed
    vitals = table[("current vitals", "vitals")]
    assert (vitals["tp"], vitals["fp"], vitals["fn"]) == (1, 1, 1)  # BP found; HR deleted; SpO2 missed
    with connect(str(out), STORAGE, current=False) as con:
        exports = sorted(r[0] for r in con.sql("select reviewer from access_log where action = 'export'").fetchall())
    assert exports == ["export", "export", "exporter"]
    with pytest.raises(RunError, match="gold file"):
        export_gold(str(out), STORAGE, str(tmp_path / "g.txt"))
