"""``medvlm eval``: gold files, field-aware matching, exact scores on hand-built tables, comparisons with bootstrap
intervals, calibration and the review table, the report, and real runs over the demo documents scored end to end.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import batch, write_manifest
from medvlm_core.analytics import query
from medvlm_core.errors import RunError
from medvlm_core.evals import evaluate, matching, write_evaluation
from medvlm_core.evals.gold import load_gold
from medvlm_core.evals.report import render_report
from medvlm_core.output.structured import CLINICAL_SCHEMA, tables_for
from medvlm_core.storage import Storage
from medvlm_core.testing.demo_docs import GOLD, write_demo_gold

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=timezone.utc)
GOLD_COLUMNS = ["document_id", "page", "document_type", "table", "name", "dose", "unit", "route", "frequency",
                "conditional", "text"]


# -- helpers: a hand-built output -------------------------------------------------------------------------


def _key(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def write_output(out: Path, run_id: str, pages: list[dict], items: dict[str, list[dict]] | None = None,
                 started: datetime = T0, prompt_id: str = "clinical_extraction", model: str = "model-a",
                 params: dict | None = None, manifest_uri: str | None = None) -> dict[tuple[str, int], str]:
    """Publish one hand-built run: its completion rows (``pages``: document_id, page, status, completion,
    confidence-free) and structured items (table -> rows with document_id, page and the item's values).

    Returns:
        (document_id, page) -> the page's result key.
    """
    day = f"{started:%Y-%m-%d}"
    keys, rows = {}, []
    for n, p in enumerate(pages, start=1):
        key = _key(run_id, p["document_id"], p.get("page", 1), prompt_id, model)
        keys[(p["document_id"], p.get("page", 1))] = key
        status = p.get("status", "ok")
        rows.append({
            "run_id": run_id, "result_key": key, "document_id": p["document_id"], "page": p.get("page", 1),
            "manifest_row": n, "prompt_id": prompt_id, "model_name": model,
            "params_json": json.dumps(params or {"max_tokens": 512}), "status": status,
            "error_type": None if status != "error" else p.get("error_type", "inference_error"),
            "error_message": None if status != "error" else "failed",
            "completion": p.get("completion", "{}") if status != "error" else None,
            "patient_id": p.get("patient_id", "P-1"), "encounter_id": "E-1",
            "created_at": started + timedelta(seconds=n),
        })
    _write(out / "completions" / f"run_date={day}" / f"part-{run_id}.parquet", pa.Table.from_pylist(rows))
    _write(out / "runs" / f"run_date={day}" / f"run-{run_id}.parquet", pa.Table.from_pylist(
        [{"run_id": run_id, "manifest_uri": manifest_uri or "/nowhere/m.csv", "started_at": started}]))
    schemas = tables_for("clinical_extraction", CLINICAL_SCHEMA) if prompt_id == "clinical_extraction" else {}
    for table, table_rows in (items or {}).items():
        if table in schemas:
            schema = schemas[table][1]
        else:  # a user extraction: its table named after the prompt id
            fields = [(k, pa.bool_() if isinstance(v, bool) else pa.string()) for k, v in table_rows[0].items()
                      if k not in ("document_id", "page", "confidence")]
            schema = pa.schema([("run_id", pa.string()), ("result_key", pa.string()), ("document_id", pa.string()),
                                ("page", pa.int32()), ("patient_id", pa.string()), ("encounter_id", pa.string()),
                                ("item_index", pa.int32()), ("confidence", pa.float64()), ("section", pa.string())]
                               + fields)
        full, counters = [], {}
        for item in table_rows:
            where = (item["document_id"], item.get("page", 1))
            index = counters.get(where, 0)
            counters[where] = index + 1
            row = {name: None for name in schema.names}
            row.update(run_id=run_id, result_key=keys[where], patient_id="P-1", encounter_id="E-1", item_index=index,
                       **{k: v for k, v in item.items()})
            row["page"] = where[1]
            full.append(row)
        _write(out / table / f"run_date={day}" / f"part-{run_id}.parquet", pa.Table.from_pylist(full, schema=schema))
    return keys


def _write(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def write_gold(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or GOLD_COLUMNS + sorted({k for r in rows for k in r} - set(GOLD_COLUMNS))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows([{c: r.get(c, "") for c in columns} for r in rows])
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows]), path)
    return path


def med(document_id, name, dose="", unit="", route="", frequency="", conditional="", page=1, **extra):
    return dict(document_id=document_id, page=page, table="medications", name=name, dose=dose, unit=unit,
                route=route, frequency=frequency, conditional=conditional, **extra)


def pmed(document_id, name, dose="", unit="", route="", frequency="", conditional=False, page=1, confidence=None):
    return dict(document_id=document_id, page=page, name=name, dose=dose, unit=unit, route=route,
                frequency=frequency, reasoning="", conditional=conditional, condition="", confidence=confidence)


def row_of(evaluation, section, system=None, **where):
    found = [r for r in evaluation.rows if r["section"] == section and (system is None or r["system"] == system)
             and all(r.get(k) == v for k, v in where.items())]
    assert len(found) == 1, (section, where, found)
    return found[0]


# -- matching rules ---------------------------------------------------------------------------------------


def test_every_matching_rule():
    m = matching
    t = m.Thresholds()
    # normalisation: case, whitespace, punctuation
    assert m.normalize("  Type 2 Diabetes-Mellitus (left heel). ") == "type 2 diabetes mellitus left heel"
    assert m.normalize("0.5 mL") == "0.5 ml"
    # units, routes and frequencies through aliases
    for a, b in [("mg", "Milligrams"), ("mcg", "µg"), ("mL", "cc"), ("units", "IU"), ("tab", "Tablets")]:
        assert m.values_match("unit", a, b, t), (a, b)
    assert not m.values_match("unit", "mg", "mcg", t)
    for a, b in [("PO", "by mouth"), ("p.o.", "oral"), ("SC", "subcutaneous"), ("IV", "intravenously")]:
        assert m.values_match("route", a, b, t), (a, b)
    assert not m.values_match("route", "PO", "IV", t)
    for a, b in [("BID", "twice daily"), ("b.i.d.", "Twice a day"), ("q12h", "every 12 hours"),
                 ("PRN", "as needed"), ("QHS", "at bedtime"), ("daily", "once a day"),
                 ("four times daily", "QID for 7 days"), ("twice daily", "2x daily with meals"),
                 ("every 8 hours as needed", "q8h PRN for pain")]:
        assert m.values_match("frequency", a, b, t), (a, b)
    assert not m.values_match("frequency", "BID", "TID", t)
    assert not m.values_match("frequency", "every 8 hours as needed", "every 8 hours", t)
    # doses numerically
    for a, b in [("500", "500 mg"), ("500", "500.0"), ("1000", "1,000"), ("1-2", "1 - 2 tablets")]:
        assert m.values_match("dose", a, b, t), (a, b)
    assert not m.values_match("dose", "500", "50", t)
    # booleans
    assert m.values_match("bool", "true", True, t) and m.values_match("bool", "No", False, t)
    assert not m.values_match("bool", "yes", False, t)
    # names: fuzzy at the stated threshold (token_sort_ratio >= 85): typos and word order, not other drugs
    assert m.values_match("name", "Lisinopril", "lisinoprl", t)
    assert m.values_match("name", "Silver sulfadiazine", "sulfadiazine silver", t)
    assert not m.values_match("name", "Metformin", "Metoprolol", t)
    assert m.similarity("name", "Metformin", "metformin hcl") < 85 <= m.similarity("name", "Metformin|Metformin HCl",
                                                                                     "metformin hcl")
    # texts: token_set_ratio >= 80, so extra words around the gold text still match
    assert m.values_match("text", "Wound clinic follow-up in 2 weeks", "Please attend wound clinic follow up in 2 weeks", t)
    assert not m.values_match("text", "Wound clinic follow-up in 2 weeks", "Check blood glucose", t)
    # free-text mentions: partial_ratio >= 90 inside a longer answer
    answer = m.normalize("Patient discharged on metformin 500mg BID and lisinopril; follow up.")
    assert m.mentioned("Metformin", answer, 90) and m.mentioned("Lisinopril", answer, 90)
    assert not m.mentioned("Cephalexin", answer, 90)


def test_assignment_is_one_to_one_and_optimal():
    # the greedy trap: A is most like X, but pairing A-X loses B; the optimal pairing matches both
    assert matching.assign([[95, 90], [88, 0]], 85) == [(0, 1, 90.0), (1, 0, 88.0)]
    # one extracted item never serves two gold items
    assert matching.assign([[100], [100]], 85) == [(0, 0, 100.0)]
    assert matching.assign([[50, 60]], 85) == []
    # against brute force on random small matrices: most pairs first, then the highest total
    rng = random.Random(7)
    for _ in range(200):
        n, k = rng.randint(1, 5), rng.randint(1, 5)
        scores = [[rng.choice([0, 70, 86, 90, 95, 100, rng.uniform(80, 100)]) for _ in range(k)] for _ in range(n)]
        best = (0, 0.0)
        for perm in itertools.permutations(range(max(n, k)), n):
            pairs = [(i, j) for i, j in enumerate(perm) if j < k and scores[i][j] >= 85]
            best = max(best, (len(pairs), round(sum(scores[i][j] for i, j in pairs), 6)))
        got = matching.assign(scores, 85)
        assert len({j for _, j, _ in got}) == len(got)
        assert (len(got), round(sum(s for _, _, s in got), 6)) == best, scores


# -- exact scores on hand-built tables --------------------------------------------------------------------


@pytest.fixture
def scored(tmp_path):
    """One hand-built structured run over five labelled pages whose every count is known."""
    out = tmp_path / "out"
    pages = [{"document_id": "d1"}, {"document_id": "d2"}, {"document_id": "d3", "status": "error"},
             {"document_id": "d4", "status": "truncated"}, {"document_id": "d6"}]  # d5: no row at all
    items = {
        "medications": [
            # d1: metformin right via aliases; lisinopril typo, wrong dose, no unit; a duplicate metformin; an extra drug
            pmed("d1", "Metformin", "500 mg", "milligrams", "by mouth", "twice a day", confidence=0.97),
            pmed("d1", "lisinoprl", "20", "", "PO", "daily", confidence=0.6),
            pmed("d1", "metformin", "500", "mg", "PO", "BID", confidence=0.9),
            pmed("d1", "Aspirin", "81", "mg", "PO", "daily", confidence=0.3),
            # d2: ibuprofen right (conditional true), amoxicillin missed
            pmed("d2", "Ibuprofen", "400", "mg", "oral", "q8h prn", conditional=True, confidence=0.95),
            # d6: labelled with no items: anything extracted is a false positive
            pmed("d6", "Paracetamol", "1 g", "g", "PO", "QID", confidence=0.8),
        ],
        "diagnoses": [
            {"document_id": "d1", "name": "Hypertension", "evidence": "", "confidence": 0.99},
            {"document_id": "d2", "name": "Sprained ankle", "evidence": "", "confidence": 0.5},
        ],
    }
    write_output(out, "run-a", pages, items)
    gold = write_gold(tmp_path / "gold.csv", [
        med("d1", "Metformin", "500", "mg", "PO", "BID", "false", document_type="discharge"),
        med("d1", "Lisinopril", "10", "mg", "PO", "once daily", "false", document_type="discharge"),
        dict(document_id="d1", table="diagnoses", name="Essential hypertension|Hypertension"),
        med("d2", "Ibuprofen", "400", "mg", "PO", "every 8 hours as needed", "true", document_type="prescription"),
        med("d2", "Amoxicillin", "875", "mg", "PO", "q12h", "false"),
        med("d3", "Cephalexin", "500", "mg", "PO", "QID"),
        med("d4", "Warfarin", "5", "mg", "PO", "daily"),
        med("d5", "Insulin glargine", "10", "units", "SC", "at bedtime"),
        dict(document_id="d6", table=""),  # labelled, nothing on it
    ])
    evaluation = evaluate(str(out), str(gold), Storage(), run_ids=["run-a"], options={"bootstrap_samples": 200})
    return out, gold, evaluation


def test_scores_known_exactly(scored):
    _, _, ev = scored
    meds = row_of(ev, "table", table_name="medications")
    # TP: metformin, lisinopril (typo), ibuprofen; FP: duplicate metformin, aspirin, paracetamol (on d6);
    # FN: amoxicillin, and the items of the error (d3), truncated (d4) and missing (d5) pages
    assert (meds["tp"], meds["fp"], meds["fn"]) == (3, 3, 4)
    assert meds["precision"] == pytest.approx(0.5) and meds["recall"] == pytest.approx(3 / 7)
    assert meds["f1"] == pytest.approx(2 * 3 / (2 * 3 + 3 + 4))
    diag = row_of(ev, "table", table_name="diagnoses")
    assert (diag["tp"], diag["fp"], diag["fn"]) == (1, 1, 0)  # an alternative matched; d2's diagnosis is extra
    total = row_of(ev, "table", table_name="all")
    assert (total["tp"], total["fp"], total["fn"]) == (4, 4, 4)
    assert total["ci_low"] <= total["f1"] <= total["ci_high"]

    def field(name):
        r = row_of(ev, "field", table_name="medications", field=name)
        return r["tp"], r["fp"], r["fn"]

    # dose: metformin, ibuprofen right; lisinopril wrong (FP+FN); 3 extra items' doses FP; 4 unmatched gold FN
    assert field("dose") == (2, 1 + 3, 1 + 4)
    # unit: lisinopril's missing unit is only a miss (no FP); the extras' units are FPs
    assert field("unit") == (2, 3, 1 + 4)
    assert field("frequency") == (3, 3, 4)  # twice a day = BID, daily = once daily, q8h prn = every 8 hours as needed
    assert field("route") == (3, 3, 4)  # by mouth = oral = PO
    # conditional is labelled on d1's and d2's items only (4): every paired one right; extras' booleans are FPs
    assert field("conditional") == (3, 3, 1)
    # all fields: lisinopril is paired but wrong, so only 2 items are right
    assert field("all_fields") == (2, 6 - 2, 7 - 2)
    # pages without an answer, reported separately
    pages = {r["field"]: (r["n"], r["fn"]) for r in ev.rows if r["section"] == "pages"}
    assert pages == {"ok": (3, 5), "error": (1, 1), "truncated": (1, 1), "missing": (1, 1)}
    # per document type (from the gold file)
    assert row_of(ev, "document_type", document_type="prescription", table_name="medications")["tp"] == 1
    assert row_of(ev, "document_type", document_type="discharge", table_name="all")["fp"] == 2


def test_review_and_calibration(scored):
    out, _, ev = scored
    [scores] = ev.systems
    # right items (all fields): metformin 0.97, ibuprofen 0.95, hypertension 0.99; wrong: the others
    review = scores.review
    assert review["mode"] == "confidence"
    assert review["suggested_threshold"] == pytest.approx(0.95)  # at >= 0.95 all 3 accepted are right
    assert review["items_total"] == 8 and review["items_accepted"] == 3 and review["precision_accepted"] == 1.0
    bins = {(b["bin_low"], b["n"], b["correct"]) for b in scores.calibration if b["n"]}
    assert bins == {(0.3, 1, 0), (0.5, 1, 0), (0.6, 1, 0), (0.8, 1, 0), (0.9, 4, 3)}
    rows = ev.review_rows
    no_answer = sorted((r["document_id"], r["reason"]) for r in rows if r["table_name"] is None)
    assert no_answer == [("d3", "no_answer:error"), ("d4", "no_answer:truncated")]
    low = sorted((r["document_id"], r["table_name"], r["confidence"], r["gold_status"]) for r in rows if r["table_name"])
    assert low == [("d1", "medications", 0.3, "wrong"), ("d1", "medications", 0.6, "wrong"),
                   ("d1", "medications", 0.9, "wrong"), ("d2", "diagnoses", 0.5, "wrong"),
                   ("d6", "medications", 0.8, "wrong")]
    assert all(r["reason"] == "low_confidence" for r in rows if r["table_name"])
    assert json.loads(next(r for r in rows if r["confidence"] == 0.3)["item_json"])["name"] == "Aspirin"

    # a chosen threshold instead of the suggested one
    ev2 = evaluate(str(out), str(scored[1]), Storage(), run_ids=["run-a"],
                   options={"review_threshold": 0.55, "bootstrap_samples": 0})
    assert sorted(r["confidence"] for r in ev2.review_rows if r["table_name"]) == [0.3, 0.5]
    assert ev2.systems[0].review["precision_accepted"] == pytest.approx(3 / 6)
    assert row_of(ev2, "table", table_name="all")["ci_low"] is None  # no bootstrap asked


def test_review_without_confidences_uses_status_and_validity(tmp_path):
    out = tmp_path / "out"
    write_output(out, "r", [{"document_id": "a"}, {"document_id": "b", "status": "error"}], {"medications": [
        pmed("a", "Metformin", "500", "mg", "PO", "BID"),
        pmed("a", "Lisinopril", "some", "mgg", "PO", "whenever"),  # no number, unknown unit and frequency
        pmed("a", "", "5", "mg", "PO", "daily"),  # no name
    ]})
    gold = write_gold(tmp_path / "g.csv", [med("a", "Metformin", "500", "mg", "PO", "twice daily"),
                                           med("b", "Aspirin", "81", "mg")])
    ev = evaluate(str(out), str(gold), Storage(), run_ids=["r"], options={"bootstrap_samples": 0})
    review = ev.systems[0].review
    assert review["mode"] == "validity" and review["suggested_threshold"] is None
    assert review["items_accepted"] == 1 and review["precision_accepted"] == 1.0
    reasons = sorted((r["document_id"], r["reason"]) for r in ev.review_rows)
    assert reasons == [("a", "invalid:dose,unit,frequency"), ("a", "invalid:name"), ("b", "no_answer:error")]


def test_free_text_runs_score_mentioned_names(tmp_path):
    out = tmp_path / "out"
    write_output(out, "text-run", [
        {"document_id": "d1", "completion": "Discharged on Metformin 500 mg twice daily. Hypertension noted."},
        {"document_id": "d2", "status": "truncated", "completion": "Amoxi"},
    ], prompt_id="clinical_analysis")
    gold = write_gold(tmp_path / "g.jsonl", [
        med("d1", "Metformin"), med("d1", "Lisinopril"), dict(document_id="d1", table="diagnoses", name="Hypertension"),
        med("d2", "Amoxicillin"),
    ], columns=["document_id", "table", "name"])
    ev = evaluate(str(out), str(gold), Storage(), run_ids=["text-run"], options={"bootstrap_samples": 0})
    [scores] = ev.systems
    assert scores.system.kind == "free_text"
    meds = row_of(ev, "mentions", table_name="medications")
    assert (meds["tp"], meds["fn"], meds["recall"], meds["precision"]) == (1, 2, pytest.approx(1 / 3), None)
    assert row_of(ev, "mentions", table_name="diagnoses")["recall"] == 1.0
    assert row_of(ev, "pages", field="truncated")["fn"] == 1
    assert not ev.review_rows  # nothing extracted: nothing to route


# -- comparison ---------------------------------------------------------------------------------------------


def test_comparison_of_two_runs_with_paired_bootstrap(tmp_path):
    out = tmp_path / "out"
    docs = [f"d{i}" for i in range(8)]
    gold = write_gold(tmp_path / "g.parquet", [med(d, "Metformin") for d in docs] + [med(d, "Lisinopril") for d in docs])
    # run a finds metformin everywhere; run b (another model, a smaller image budget) also lisinopril on half
    write_output(out, "run-a", [{"document_id": d} for d in docs],
                 {"medications": [pmed(d, "Metformin") for d in docs]},
                 params={"image_max_tokens": 1024, "generation": {"max_tokens": 300, "top_k": 40}})
    write_output(out, "run-b", [{"document_id": d} for d in docs],
                 {"medications": [pmed(d, "Metformin") for d in docs] + [pmed(d, "Lisinopril") for d in docs[:4]]},
                 started=T0 + timedelta(hours=1), model="model-b",
                 params={"image_max_tokens": 256, "generation": {"max_tokens": 6, "top_k": 40}})
    options = {"bootstrap_samples": 500, "seed": 3}
    ev = evaluate(str(out), str(gold), Storage(), run_ids=["run-a", "run-b"], options=options)
    assert [s.system.label for s in ev.systems] == ["run-a", "run-b"]
    assert row_of(ev, "table", "run-a", table_name="all")["recall"] == 0.5
    assert row_of(ev, "table", "run-b", table_name="all")["recall"] == 0.75
    diff = row_of(ev, "comparison", "run-b", table_name="all", metric="recall_difference")
    assert diff["baseline"] == "run-a" and diff["value"] == pytest.approx(0.25)
    assert 0 < diff["ci_low"] <= 0.25 <= diff["ci_high"] <= 0.5  # the interval excludes 0
    precision = row_of(ev, "comparison", "run-b", table_name="all", metric="precision_difference")
    assert (precision["value"], precision["ci_low"], precision["ci_high"]) == (0.0, 0.0, 0.0)
    # seeded: the same intervals again
    again = evaluate(str(out), str(gold), Storage(), run_ids=["run-a", "run-b"], options=options)
    assert [(r["ci_low"], r["ci_high"]) for r in again.rows] == [(r["ci_low"], r["ci_high"]) for r in ev.rows]
    # the report names what differs between the runs
    html = render_report(ev)
    assert "image_max_tokens=1024" in html and "image_max_tokens=256" in html and "model-b" in html
    assert "generation.max_tokens=300" in html and "generation.max_tokens=6" in html and "top_k" not in html
    # no run given: the current answers (run-b's, the later)
    current = evaluate(str(out), str(gold), Storage(), options={"bootstrap_samples": 0})
    assert [s.system.label for s in current.systems] == ["current"]
    assert row_of(current, "table", table_name="all")["recall"] == 0.75
    with pytest.raises(RunError, match="run nope has no completion rows"):
        evaluate(str(out), str(gold), Storage(), run_ids=["nope"])


# -- gold files -----------------------------------------------------------------------------------------------


def test_bad_gold_files_name_the_rows(tmp_path):
    out = tmp_path / "out"
    write_output(out, "r", [{"document_id": "d1"}], {"medications": [pmed("d1", "Metformin")]})
    storage = Storage()
    bad = write_gold(tmp_path / "bad.csv", [
        med("d1", "Metformin"),                                            # row 1: fine
        dict(document_id="", table="medications", name="X"),              # row 2: no document id
        med("d1", "Aspirin", page="zero"),                                 # row 3: page
        dict(document_id="d1", table="medication", name="X"),             # row 4: unknown table
        dict(document_id="d1", table="diagnoses", name="X", dose="5"),    # row 5: no such field
        med("d1", "Aspirin", conditional="maybe"),                        # row 6: not a boolean
        dict(document_id="d1", table="medications"),                      # row 7: an item with nothing labelled
        dict(document_id="d1", table="", name="X"),                       # row 8: values without a table
        med("d1", "Aspirin", document_type="a"), med("d1", "B", document_type="b"),  # row 10: conflicting type
    ])
    with pytest.raises(RunError) as info:
        evaluate(str(out), str(bad), storage, run_ids=["r"])
    message = str(info.value)
    for expected in ["8 bad row(s)", "row 2: document_id is missing", "row 3: page must be an integer >= 1",
                     "row 4: unknown table 'medication'", "row 5: table diagnoses has no field 'dose'",
                     "row 6: conditional must be true or false", "row 7: an item of medications needs at least one",
                     "row 8: has values but no table", "row 10: document_type differs from row 9"]:
        assert expected in message, (expected, message)
    assert "row 1:" not in message and "row 9:" not in message
    # an item without its key field (medications are matched on name)
    keyless = write_gold(tmp_path / "keyless.csv", [med("d1", "Metformin"), med("d1", "", dose="5")])
    with pytest.raises(RunError, match=r"items of medications are matched on name, which is empty in row\(s\) 2"):
        load_gold(str(keyless), storage)
    # table-level problems name the file
    (tmp_path / "nocol.csv").write_text("document_id,name\nd1,X\n")
    (tmp_path / "empty.csv").write_text("document_id,table\n")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    for name, expected in [("nocol.csv", "missing required column(s) table"), ("empty.csv", "has no rows"),
                           ("broken.parquet", "not a readable parquet file"), ("gold.xlsx", "unknown format"),
                           ("absent.csv", "gold file cannot be read")]:
        with pytest.raises(RunError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            load_gold(str(tmp_path / name), storage)
    # a user extraction table and its fields come from the output; booleans in JSONL stay booleans
    ok = write_gold(tmp_path / "ok.jsonl", [{"document_id": "d1", "page": 2, "table": "vitals", "name": "BP",
                                             "abnormal": True}])
    gold = load_gold(str(ok), storage, tables={"vitals": ["name", "value", "abnormal"]})
    assert [(i.page, i.table, i.values) for i in gold.items] == [(2, "vitals", {"name": "BP", "abnormal": "true"})]
    assert gold.keys == {"vitals": "name"} and gold.sha256 == hashlib.sha256(ok.read_bytes()).hexdigest()


def test_document_types_from_the_manifest(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", [
        {"document_id": "d1", "image_uri": "a.png", "document_type": "discharge_summary"},
        {"document_id": "d2", "image_uri": "b.png", "document_type": "prescription"}])
    out = tmp_path / "out"
    write_output(out, "r", [{"document_id": "d1"}, {"document_id": "d2"}],
                 {"medications": [pmed("d1", "Metformin")]}, manifest_uri=str(manifest))
    gold = write_gold(tmp_path / "g.csv", [med("d1", "Metformin"), med("d2", "Aspirin")],
                      columns=["document_id", "table", "name"])
    ev = evaluate(str(out), str(gold), Storage(), run_ids=["r"], options={"bootstrap_samples": 0})
    assert row_of(ev, "document_type", document_type="discharge_summary", table_name="all")["recall"] == 1.0
    assert row_of(ev, "document_type", document_type="prescription", table_name="all")["recall"] == 0.0


# -- writing and the report ---------------------------------------------------------------------------------


def test_written_tables_and_report(scored, tmp_path):
    out, _, ev = scored
    storage = Storage()
    html = render_report(ev)
    written = write_evaluation(ev, storage, html)
    assert set(written) == {"evals", "review", "report"}
    evals = query(str(out), "select section, table_name, field, tp, fp, fn, gold_sha256, scored_runs from evals "
                            "where section = 'table' order by table_name", storage).to_pylist()
    assert [(r["table_name"], r["tp"], r["fp"], r["fn"]) for r in evals] == [
        ("all", 4, 4, 4), ("diagnoses", 1, 1, 0), ("medications", 3, 3, 4)]
    assert {r["gold_sha256"] for r in evals} == {ev.gold.sha256} and {r["scored_runs"] for r in evals} == {"run-a"}
    # the evals table holds scores, never item text
    everything = json.dumps(query(str(out), "select * from evals", storage).to_pylist(), default=str)
    assert "Metformin" not in everything and "Aspirin" not in everything
    review = query(str(out), "select count(*) as n from review", storage).to_pylist()
    assert review == [{"n": len(ev.review_rows)}]
    # the report: self-contained, with the plots and the worst pages' items
    page = Path(written["report"]).read_text()
    assert page.count("data:image/png;base64,") == 2  # per-field bars and the calibration curve
    import re

    assert set(re.findall(r'src="([a-z]+):', page)) == {"data"}  # nothing fetched from elsewhere
    without_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "<script" not in without_images and "http://" not in without_images and "https://" not in without_images
    assert "Cephalexin" in page and "Aspirin" in page and "not in gold" in page


def test_report_escapes_item_text(tmp_path):
    out = tmp_path / "out"
    write_output(out, "r", [{"document_id": "d1"}], {"medications": [pmed("d1", "<script>alert(1)</script>")]})
    gold = write_gold(tmp_path / "g.csv", [med("d1", "<b>Metformin</b>")])
    html = render_report(evaluate(str(out), str(gold), Storage(), run_ids=["r"], options={"bootstrap_samples": 0}))
    assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;b&gt;Metformin&lt;/b&gt;" in html


def test_eval_reads_and_writes_s3(scored, s3, s3_server):
    from medvlm_core.storage import s3_options

    out, gold, expected = scored
    s3_server.create_bucket("evals")
    s3.put(str(out), "evals/out", recursive=True)
    s3.put(str(gold), "evals/labels/gold.csv")
    storage = Storage({"s3": s3_options(endpoint_url=s3_server.endpoint_url)})
    ev = evaluate("s3://evals/out", "s3://evals/labels/gold.csv", storage, run_ids=["run-a"],
                  options={"bootstrap_samples": 200})
    assert ev.gold.sha256 == expected.gold.sha256
    assert [(r["section"], r["tp"], r["fp"], r["fn"]) for r in ev.rows] == [
        (r["section"], r["tp"], r["fp"], r["fn"]) for r in expected.rows]
    written = write_evaluation(ev, storage, render_report(ev))
    assert written["report"].startswith("s3://evals/out/reports/eval/")
    assert s3.cat(written["report"].replace("s3://", "")).startswith(b"<!doctype html>")
    [row] = query("s3://evals/out", "select count(*) as n from evals where section = 'table'", storage).to_pylist()
    assert row["n"] == 3


# -- end to end: real runs of the tiny model over the demo documents ----------------------------------------


def test_demo_runs_scored_end_to_end(tmp_path, tiny_llava, demo_docs, vitals_extraction, caplog):
    from prefect.client.orchestration import get_client

    from medvlm.flows.cli import main
    from medvlm.flows.eval import medvlm_eval

    records = demo_docs + [{"document_id": "vitals-1", "image_uri": demo_docs[0]["image_uri"], "prompt_id": "vitals"}]
    manifest = write_manifest(tmp_path / "m.csv", records)
    output = tmp_path / "out"
    common = dict(manifest=str(manifest), output=str(output), model=str(tiny_llava.model_path),
                  mmproj=str(tiny_llava.mmproj_path), prompt_id="clinical_extraction", extraction=str(vitals_extraction),
                  n_ctx=4096)
    first = batch(max_tokens=300, **common)
    second = batch(max_tokens=6, **common)  # another budget: every answer cut off
    gold = write_demo_gold(tmp_path / "gold.csv")
    with open(gold, "a", newline="") as f:  # and a label for the vitals page
        f.write("vitals-1,1,,vitals,BP,,,,,,\n")

    state = medvlm_eval(output=str(output), gold=str(gold), run_ids=[first["run_id"], second["run_id"]],
                        eval_options={"bootstrap_samples": 200}, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    head = {(r["system"], r["table"]): r for r in result["headline"]}
    a, b = first["run_id"], second["run_id"]
    demo_items = sum(len(d["items"]) for d in GOLD.values())
    # the random model closes the clinical arrays at once: nothing found, nothing wrong
    clinical = head[(f"{a} clinical_extraction", "all")]
    assert (clinical["recall"], clinical["gold_items"], clinical["pages_without_answer"]) == (0.0, demo_items, 0)
    # the second run's answers were all truncated: every labelled item a miss, every page without an answer
    truncated = head[(f"{b} clinical_extraction", "all")]
    assert (truncated["recall"], truncated["pages_without_answer"]) == (0.0, 3)
    # the vitals extraction produced items with real confidences: calibrated and routed
    vitals = head[(f"{a} vitals", "all")]
    assert vitals["gold_items"] == 1 and vitals["precision"] in (0.0, 0.5, 1.0)
    comparison = [c for c in result["comparisons"] if c["table"] == "all" and c["metric"] == "recall"]
    assert {(c["baseline"], c["system"]) for c in comparison} >= {(f"{a} clinical_extraction", f"{b} clinical_extraction")}
    storage = Storage()
    review = query(str(output), "select system, table_name, reason, confidence, gold_status from review", storage).to_pylist()
    assert sum(1 for r in review if r["reason"] == "no_answer:truncated" and r["system"].startswith(b)) == 4
    vitals_review = [r for r in review if r["table_name"] == "vitals"]
    assert vitals_review and all(0 < r["confidence"] <= 1 and r["gold_status"] == "wrong" for r in vitals_review)
    calibration = query(str(output), "select sum(n) as n from evals where section = 'calibration' and system = $s",
                        storage, {"s": f"{a} vitals"}).to_pylist()
    assert calibration[0]["n"] >= 1
    assert Path(result["written"]["report"]).exists()

    # the artifact: the headline scores, no item text
    async def artifact():
        async with get_client() as client:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

            found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["medvlm-eval"])))
            return [a.data for a in found]
    import asyncio

    markdowns = asyncio.run(artifact())
    [markdown] = [m for m in markdowns if result["eval_id"] in m]
    assert "| precision | recall | F1 |" in markdown and f"{a} clinical_extraction" in markdown
    for text in markdowns:
        for secret in ["Metformin", "Amoxicillin", "P-000101", "Wound clinic", "BP,"]:
            assert secret not in text

    # the command: scores printed, a bad gold file refused naming the row
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["eval", "--output", str(output), "--gold", str(gold), "--run", a, "--bootstrap-samples", "0"]) == 0
    text = printed.getvalue()
    assert "clinical_extraction" in text and "report:" in text and "Metformin" not in text
    bad = tmp_path / "bad.csv"
    bad.write_text("document_id,table,name\nrx-0002,medications,Amoxicillin\nrx-0002,prescriptions,X\n")
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        assert main(["eval", "--output", str(output), "--gold", str(bad)]) == 2
    assert "row 2: unknown table 'prescriptions'" in errors.getvalue()


def test_demo_scores_itself(tmp_path):
    import contextlib
    import io

    from medvlm.flows.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["demo", "--workdir", str(tmp_path / "demo"), "--mode", "structured"])
    text = printed.getvalue()
    assert code == 0, text
    assert "scores are near zero" in text and "Open the report in a browser:" in text
    # the structured answers parse (room enough to close the JSON): scored as answered pages, recall 0
    line = next(x for x in text.splitlines() if " all " in x and "0.000" in x)
    assert line.split()[-2:] == ["12", "0"]  # 12 gold items, no page without an answer
    report = text.split("Open the report in a browser: ", 1)[1].split()[0]
    assert Path(report).exists() and "medvlm evaluation" in Path(report).read_text()
    assert (tmp_path / "demo" / "gold.csv").exists()
