"""Analytics that tell the current truth: current views next to the history, the rule that picks the current
row, the document status, built-in queries; on synthetic histories (every case of the rule, against a
replay of the rule's own definition) and on real pipeline runs (local and S3)."""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
import uuid
from contextlib import redirect_stdout
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_manifest
from medvlm_core import analytics
from medvlm_core.output.results import COMPLETIONS_SCHEMA, QUARANTINE_SCHEMA, RUNS_SCHEMA
from medvlm_core.storage import Storage

T0 = datetime(2026, 3, 1, 2, 0, tzinfo=timezone.utc)
STORAGE = Storage()


# -- synthetic histories ------------------------------------------------------------------------------

def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def row(doc, page, key, status, minutes, run_id=None, prompt_id="p", error_type=None, manifest_row=1):
    """One completions row (the columns the rule reads, the rest null)."""
    return {"document_id": doc, "page": page, "result_key": key, "status": status, "created_at": at(minutes),
            "run_id": run_id or f"run-{minutes:09.3f}", "prompt_id": prompt_id, "manifest_row": manifest_row,
            "error_type": error_type if error_type or status != "error" else "inference_error"}


def write_table(output: Path, table: str, rows: list[dict], schema: pa.Schema) -> None:
    """Publish rows as the real layout does: one file per run, under run_date=..."""
    by_run: dict[str, list[dict]] = {}
    for r in rows:
        by_run.setdefault(r["run_id"], []).append(r)
    for run_id, items in by_run.items():
        date = items[0]["created_at"].strftime("%Y-%m-%d")
        folder = output / table / f"run_date={date}"
        folder.mkdir(parents=True, exist_ok=True)
        prefix = "run" if table == "runs" else "part"
        data = pa.Table.from_pylist([{n: r.get(n) for n in schema.names} for r in items], schema=schema)
        pq.write_table(data, folder / f"{prefix}-{run_id}.parquet")


def history(tmp_path: Path, rows: list[dict], quarantine: list[dict] = (), runs: list[dict] = ()) -> str:
    output = tmp_path / f"out-{uuid.uuid4().hex[:6]}"
    write_table(output, "completions", rows, COMPLETIONS_SCHEMA)
    if quarantine:
        write_table(output, "quarantine", list(quarantine), QUARANTINE_SCHEMA)
    if runs:
        write_table(output, "runs", list(runs), RUNS_SCHEMA)
    return str(output)


def current(output: str, where: str = "true") -> dict:
    """(document_id, prompt_id, page) -> (result_key, status) of the current rows."""
    rows = analytics.query(output, f"select * from completions_current where {where}", STORAGE).to_pylist()
    got = {(r["document_id"], r["prompt_id"], r["page"]): (r["result_key"], r["status"]) for r in rows}
    assert len(got) == len(rows), "one current row per document page and prompt id"
    return got


def replay(rows: list[dict]) -> dict:
    """The rule's definition, replayed in time order: a later row replaces the current one, except that a
    failure (error, truncated) under another result key does not replace an ok answer; a document-level
    row (page None) gives way to any later row of its document and prompt id with a page."""
    state: dict[tuple, dict] = {}
    order = sorted(rows, key=lambda r: (r["created_at"], r["run_id"], r["manifest_row"]))
    for r in order:
        slot = (r["document_id"], r["prompt_id"], r["page"])
        cur = state.get(slot)
        if cur is None or r["result_key"] == cur["result_key"] or r["status"] == "ok" or cur["status"] != "ok":
            state[slot] = r
    for (doc, prompt, page), r in list(state.items()):
        if page is None and any(o["document_id"] == doc and o["prompt_id"] == prompt and o["page"] is not None
                                and o["created_at"] > r["created_at"] for o in rows):
            del state[(doc, prompt, page)]
    return {slot: (r["result_key"], r["status"]) for slot, r in state.items()}


CASES = {
    # name: (rows, expected current (key, status) of slot ("d", "p", 1))
    "retried error fixed": ([row("d", 1, "K", "error", 1), row("d", 1, "K", "ok", 2)], ("K", "ok")),
    "retried error fails again": ([row("d", 1, "K", "error", 1), row("d", 1, "K", "error", 2)], ("K", "error")),
    "forced re-run ok": ([row("d", 1, "K", "ok", 1), row("d", 1, "K", "ok", 2, run_id="forced")], ("K", "ok")),
    "forced re-run fails": ([row("d", 1, "K", "ok", 1), row("d", 1, "K", "error", 2)], ("K", "error")),
    "forced re-run truncated": ([row("d", 1, "K", "ok", 1), row("d", 1, "K", "truncated", 2)], ("K", "truncated")),
    "new model fails: the answer stays": ([row("d", 1, "K1", "ok", 1), row("d", 1, "K2", "error", 2)], ("K1", "ok")),
    "new params truncated: the answer stays": ([row("d", 1, "K1", "ok", 1), row("d", 1, "K2", "truncated", 2)],
                                               ("K1", "ok")),
    "new prompt text answers": ([row("d", 1, "K1", "ok", 1), row("d", 1, "K2", "ok", 2)], ("K2", "ok")),
    "error then truncated: latest": ([row("d", 1, "K1", "error", 1), row("d", 1, "K2", "truncated", 2)],
                                     ("K2", "truncated")),
    "no revival of an older answer": ([row("d", 1, "K1", "ok", 1), row("d", 1, "K2", "ok", 2),
                                       row("d", 1, "K2", "error", 3)], ("K2", "error")),
    "forced failure then fixed under a new key": ([row("d", 1, "K1", "ok", 1), row("d", 1, "K1", "error", 2),
                                                   row("d", 1, "K2", "ok", 3)], ("K2", "ok")),
    "older answer kept after a failed newer key, then forced": (
        [row("d", 1, "K1", "ok", 1), row("d", 1, "K2", "error", 2), row("d", 1, "K1", "error", 3)], ("K1", "error")),
    "same microsecond: the greater run_id wins": (
        [row("d", 1, "K1", "ok", 1, run_id="run-a"), row("d", 1, "K2", "ok", 1, run_id="run-b")], ("K2", "ok")),
    "same microsecond and run: the greater manifest_row wins": (
        [row("d", 1, "K1", "error", 1, run_id="r", manifest_row=7),
         row("d", 1, "K2", "error", 1, run_id="r", manifest_row=3)], ("K1", "error")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rule_cases(tmp_path, name):
    rows, expected = CASES[name]
    output = history(tmp_path, rows)
    assert current(output) == {("d", "p", 1): expected} == replay(rows)
    assert analytics.query(output, "select count(*) as n from completions", STORAGE).column("n")[0].as_py() == len(rows)


def test_document_level_rows_and_prompt_ids(tmp_path):
    rows = [
        # a file that was missing (page unknown), then arrived with two pages
        row("late", None, "K0", "error", 1, error_type="not_found"),
        row("late", 1, "K1", "ok", 2), row("late", 2, "K2", "error", 2, manifest_row=2),
        # answered, then the file went missing: the answers stay, and so does the current fetch error
        row("gone", 1, "G1", "ok", 1), row("gone", None, "G0", "error", 3, error_type="not_found"),
        # still missing after a retry: one current error
        row("never", None, "N0", "error", 1, error_type="not_found"), row("never", None, "N0", "error", 4,
                                                                          error_type="not_found"),
        # one page, two questions: each has its own current row
        row("two", 1, "A", "ok", 1, prompt_id="clinical_analysis"), row("two", 1, "B", "error", 2, prompt_id="custom"),
    ]
    output = history(tmp_path, rows)
    expected = {
        ("late", "p", 1): ("K1", "ok"), ("late", "p", 2): ("K2", "error"),
        ("gone", "p", 1): ("G1", "ok"), ("gone", "p", None): ("G0", "error"),
        ("never", "p", None): ("N0", "error"),
        ("two", "clinical_analysis", 1): ("A", "ok"), ("two", "custom", 1): ("B", "error"),
    }
    assert current(output) == expected == replay(rows)
    errors = analytics.query(output, analytics.EXAMPLE_QUERIES["errors_by_type"], STORAGE).to_pylist()
    assert errors == [{"error_type": "inference_error", "documents": 2, "pages": 2},
                      {"error_type": "not_found", "documents": 2, "pages": 2}]


def test_rule_equals_its_replay_on_random_histories(tmp_path):
    """Hundreds of slots, each a random sequence of attempts (retries, forced re-runs, new keys, document-level
    failures): the SQL picks exactly what replaying the rule's definition picks."""
    rng = random.Random(19)
    rows, minute = [], 0.0
    for d in range(150):
        doc = f"doc-{d:03d}"
        for prompt in ("p", "q")[: rng.choice((1, 1, 2))]:
            for page in (None, 1, 2)[rng.choice((0, 1, 1)):rng.choice((2, 3))]:
                keys = [f"{doc}-{prompt}-{page}-k{i}" for i in range(rng.choice((1, 2, 3)))]
                for _ in range(rng.randint(1, 6)):
                    minute += rng.random()
                    status = rng.choice(("ok", "ok", "error", "error", "truncated"))
                    rows.append(row(doc, page, rng.choice(keys), status, minute, prompt_id=prompt,
                                    run_id=f"run-{int(minute // 20):03d}"))
    output = history(tmp_path, rows)
    expected = replay(rows)
    assert len(expected) > 250
    assert current(output) == expected
    # the document filter pushed into the scans gives the same rows as the whole view
    some = sorted({s[0] for s in expected})[::17]
    for doc in some:
        assert current(output, f"document_id = '{doc}'") == {s: v for s, v in expected.items() if s[0] == doc}


def test_structured_and_quarantine_currency_and_document_status(tmp_path):
    rows = [row("a", 1, "KA", "ok", 1, run_id="r1"), row("a", 1, "KA", "ok", 5, run_id="r3"),  # forced in r3
            row("b", 1, "KB", "error", 1, run_id="r1"), row("b", 1, "KB", "ok", 3, run_id="r2"),
            row("c", 1, "KC", "truncated", 1, run_id="r1")]
    output = Path(history(tmp_path, rows))
    vitals = pa.schema([("run_id", pa.string()), ("result_key", pa.string()), ("document_id", pa.string()),
                        ("page", pa.int32()), ("item_index", pa.int32()), ("name", pa.string()),
                        ("created_at", pa.timestamp("us", tz="UTC"))])
    write_table(output, "vitals", [
        {"run_id": "r1", "result_key": "KA", "document_id": "a", "page": 1, "item_index": 0, "name": "old", "created_at": at(1)},
        {"run_id": "r3", "result_key": "KA", "document_id": "a", "page": 1, "item_index": 0, "name": "new", "created_at": at(5)},
        {"run_id": "r3", "result_key": "KA", "document_id": "a", "page": 1, "item_index": 1, "name": "new2", "created_at": at(5)},
        {"run_id": "r2", "result_key": "KB", "document_id": "b", "page": 1, "item_index": 0, "name": "b", "created_at": at(3)},
    ], vitals)
    manifest = "s3://in/m.csv"
    write_table(output, "quarantine", [
        # d: refused in r1, processed by r2 (a later run): no longer quarantined
        {"run_id": "r1", "manifest_uri": manifest, "row_number": 4, "row_json": json.dumps({"document_id": "b"}),
         "created_at": at(0.5)},
        # e: refused in r2 and r3, never processed: the latest run's refusal is current
        {"run_id": "r2", "manifest_uri": manifest, "row_number": 5, "row_json": json.dumps({"document_id": "e"}),
         "created_at": at(2.5)},
        {"run_id": "r3", "manifest_uri": manifest, "row_number": 5, "row_json": json.dumps({"document_id": "e"}),
         "created_at": at(4.5)},
        # a: answered in r1 and refused in r3 (a broken manifest row): answer and refusal are both current
        {"run_id": "r3", "manifest_uri": manifest, "row_number": 6, "row_json": json.dumps({"document_id": "a"}),
         "created_at": at(4.6)},
        # no document id: current while its run is the manifest's latest run
        {"run_id": "r2", "manifest_uri": manifest, "row_number": 7, "row_json": json.dumps({"image_uri": "x"}),
         "created_at": at(2.5)},
        {"run_id": "r3", "manifest_uri": manifest, "row_number": 8, "row_json": json.dumps({"image_uri": "y"}),
         "created_at": at(4.5)},
    ], QUARANTINE_SCHEMA)
    write_table(output, "runs", [{"run_id": r, "manifest_uri": manifest, "started_at": at(m), "created_at": at(m)}
                                 for r, m in (("r1", 0), ("r2", 2), ("r3", 4))], RUNS_SCHEMA)
    output = str(output)

    names = analytics.query(output, "select view_name from duckdb_views() where not internal", STORAGE)
    assert {"vitals", "vitals_current", "completions_current", "quarantine_current", "document_status"} <= set(
        names.column("view_name").to_pylist())
    got = analytics.query(output, "select run_id, name from vitals_current order by name", STORAGE).to_pylist()
    assert got == [{"run_id": "r2", "name": "b"}, {"run_id": "r3", "name": "new"}, {"run_id": "r3", "name": "new2"}]
    assert analytics.query(output, "select count(*) as n from vitals", STORAGE).column("n")[0].as_py() == 4

    quarantined = analytics.query(output, "select run_id, row_number, document_id from quarantine_current "
                                          "order by row_number", STORAGE).to_pylist()
    assert quarantined == [{"run_id": "r3", "row_number": 5, "document_id": "e"},
                           {"run_id": "r3", "row_number": 6, "document_id": "a"},
                           {"run_id": "r3", "row_number": 8, "document_id": None}]

    status = {r["document_id"]: r for r in analytics.document_status(output, STORAGE).to_pylist()}
    assert sorted(status) == ["a", "b", "c", "e"]
    pick = ("pages", "ok", "error", "truncated", "quarantined", "error_types", "latest_run_id")
    assert {d: tuple(r[k] for k in pick) for d, r in status.items()} == {
        "a": (1, 1, 0, 0, 1, [], "r3"),
        "b": (1, 1, 0, 0, 0, [], "r2"),
        "c": (1, 0, 0, 1, 0, [], "r1"),
        "e": (0, 0, 0, 0, 1, [], "r3"),
    }
    assert status["a"]["latest_at"] == at(5) and status["e"]["latest_at"] == at(4.5)
    for doc, expected in status.items():  # one document, its filter pushed into the scans: the same row
        assert analytics.document_status(output, STORAGE, doc).to_pylist() == [expected]
    failing = analytics.query(output, analytics.EXAMPLE_QUERIES["still_failing"], STORAGE).to_pylist()
    assert [r["document_id"] for r in failing] == ["a", "e"]


# -- real pipeline runs ---------------------------------------------------------------------------------

def medvlm(*argv: str) -> tuple[int, str]:
    """The ``medvlm`` command in this process: (exit status, standard output)."""
    from medvlm.flows.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, tiny_llava):
    """Issue 19's scenario on the real flow, the output copied after each step:

    1. two documents, one file missing: 1 ok, 1 not_found
    2. run again, still missing: the error is retried and fails again
    3. the file arrives: the missing page is now ok
    4. --force: both pages re-run under the same keys
    5. --prompt X: a second question (prompt id custom) for both pages
    6. --prompt Y: the custom question's text changed (new keys, same prompt id)
    """
    root = tmp_path_factory.mktemp("scenario")
    from medvlm_core.testing.demo_docs import write_demo_documents

    records = write_demo_documents(root / "documents")[:2]
    arriving = root / records[1]["image_uri"]
    held = root / "held.png"
    shutil.move(arriving, held)
    manifest = write_manifest(root / "manifest.csv", records)
    output = root / "out"
    base = ["run", "--manifest", str(manifest), "--output", str(output), "--model", str(tiny_llava.model_path),
            "--mmproj", str(tiny_llava.mmproj_path), "--max-tokens", "4", "--n-ctx", "4096"]
    steps = {1: [], 2: [], 3: [], 4: ["--force"], 5: ["--prompt", "Is this page signed?"],
             6: ["--prompt", "Is this page signed and dated?"]}
    snapshots = {}
    for step, extra in steps.items():
        if step == 3:
            shutil.move(held, arriving)
        code, _ = medvlm(*base, *extra)
        assert code == 0, f"step {step}"
        snapshots[step] = root / f"after-{step}"
        shutil.copytree(output, snapshots[step])
    return {"docs": [r["document_id"] for r in records], "after": snapshots}


def rows_of(output, sql):
    return analytics.query(str(output), sql, STORAGE).to_pylist()


def test_fixed_error_leaves_the_current_views_and_stays_in_history(scenario):
    ok_doc, late_doc = scenario["docs"]
    after = scenario["after"]
    errors = analytics.EXAMPLE_QUERIES["errors_by_type"]
    assert rows_of(after[1], errors) == [{"error_type": "not_found", "documents": 1, "pages": 1}]
    # retried and failed again: still one page in the current view, two attempts in the history
    assert rows_of(after[2], errors) == [{"error_type": "not_found", "documents": 1, "pages": 1}]
    assert rows_of(after[2], "select count(*) as n from completions where status = 'error'") == [{"n": 2}]
    # the file arrived: nothing fails any more; the history keeps both failed attempts
    assert rows_of(after[3], errors) == []
    code, out = medvlm("query", "errors_by_type", "--output", str(after[3]), "--format", "csv")
    assert code == 0 and list(csv.DictReader(io.StringIO(out))) == []
    code, out = medvlm("query", "select error_type, count(*) as pages from completions where status = 'error' "
                       "group by all", "--output", str(after[3]), "--format", "csv")
    assert code == 0 and list(csv.DictReader(io.StringIO(out))) == [{"error_type": "not_found", "pages": "2"}]
    current_rows = rows_of(after[3], "select document_id, page, status, run_id from completions_current order by 1")
    assert [(r["document_id"], r["page"], r["status"]) for r in current_rows] == [(ok_doc, 1, "ok"), (late_doc, 1, "ok")]
    runs = [r["run_id"] for r in rows_of(after[3], "select run_id from runs order by started_at")]
    assert [r["run_id"] for r in current_rows] == [runs[0], runs[2]]
    status = {r["document_id"]: r for r in analytics.document_status(str(after[3]), STORAGE).to_pylist()}
    assert {d: (r["pages"], r["ok"], r["error"], r["quarantined"], r["latest_run_id"]) for d, r in status.items()} == {
        ok_doc: (1, 1, 0, 0, runs[0]),  # runs 2 and 3 skipped it: they wrote no row for it
        late_doc: (1, 1, 0, 0, runs[2]),
    }
    assert rows_of(after[2], analytics.EXAMPLE_QUERIES["still_failing"])[0]["document_id"] == late_doc
    assert rows_of(after[3], analytics.EXAMPLE_QUERIES["still_failing"]) == []


def test_force_and_prompt_changes_replace_the_current_rows(scenario):
    after = scenario["after"]
    runs = [r["run_id"] for r in rows_of(after[6], "select run_id from runs order by started_at")]
    # --force: same keys, the new rows are current
    forced = rows_of(after[4], "select result_key, run_id from completions_current order by document_id")
    before = rows_of(after[3], "select result_key from completions_current order by document_id")
    assert [r["result_key"] for r in forced] == [r["result_key"] for r in before]
    assert {r["run_id"] for r in forced} == {runs[3]}
    assert rows_of(after[4], "select count(*) as n from completions") == [{"n": 6}]
    # a second question: two current rows per page, one per prompt id
    five = rows_of(after[5], "select prompt_id, run_id from completions_current order by prompt_id, document_id")
    assert [(r["prompt_id"], r["run_id"]) for r in five] == [("clinical_analysis", runs[3])] * 2 + [("custom", runs[4])] * 2
    # the question's text changed under the same prompt id: its new answers replace the old ones
    six = rows_of(after[6], "select prompt_id, prompt_sha256, run_id from completions_current "
                            "order by prompt_id, document_id")
    assert [(r["prompt_id"], r["run_id"]) for r in six] == [("clinical_analysis", runs[3])] * 2 + [("custom", runs[5])] * 2
    old_sha = {r["prompt_sha256"] for r in rows_of(after[5], "select prompt_sha256 from completions_current "
                                                             "where prompt_id = 'custom'")}
    assert old_sha.isdisjoint(r["prompt_sha256"] for r in six if r["prompt_id"] == "custom")
    assert rows_of(after[6], "select count(*) as n from completions") == [{"n": 10}]
    status = analytics.document_status(str(after[6]), STORAGE).to_pylist()
    assert [(r["pages"], r["prompts"], r["ok"], r["latest_run_id"]) for r in status] == [(1, 2, 2, runs[5])] * 2


def test_same_views_on_s3(scenario, s3, s3_server):
    bucket = "medvlm-analytics"
    s3_server.create_bucket(bucket)
    prefix = f"s3://{bucket}/{uuid.uuid4().hex[:8]}"
    local = scenario["after"][6]
    for path in sorted(local.rglob("*")):
        if path.is_file():
            s3.put(str(path), f"{prefix}/{path.relative_to(local).as_posix()}")
    storage = Storage()
    for sql in ("select * exclude (run_date) from completions_current order by result_key",
                "select * from document_status order by document_id",
                analytics.EXAMPLE_QUERIES["errors_by_type"],
                "select count(*) as n from completions"):
        remote = analytics.query(prefix, sql, storage)
        assert remote.to_pylist() == analytics.query(str(local), sql, STORAGE).to_pylist(), sql
    doc = scenario["docs"][0]
    assert analytics.document_status(prefix, storage, doc).to_pylist() == \
        analytics.document_status(str(local), STORAGE, doc).to_pylist()


def test_structured_tables_follow_their_completion_rows(tmp_path, tiny_llava, demo_docs, vitals_extraction):
    records = [dict(demo_docs[0], prompt_id="vitals")]
    manifest = write_manifest(tmp_path / "m.csv", records)
    output = tmp_path / "out"
    base = ["run", "--manifest", str(manifest), "--output", str(output), "--model", str(tiny_llava.model_path),
            "--mmproj", str(tiny_llava.mmproj_path), "--n-ctx", "4096", "--mode", "structured",
            "--extraction", str(vitals_extraction)]
    assert medvlm(*base, "--max-tokens", "400")[0] == 0
    assert medvlm(*base, "--max-tokens", "400", "--force")[0] == 0
    first, forced = [r["run_id"] for r in rows_of(output, "select run_id from runs order by started_at")]
    history_rows = rows_of(output, "select run_id, item_index from vitals order by run_id, item_index")
    assert {r["run_id"] for r in history_rows} == {first, forced}
    current_rows = rows_of(output, "select run_id, result_key from vitals_current")
    assert current_rows and {r["run_id"] for r in current_rows} == {forced}
    assert len(current_rows) == sum(1 for r in history_rows if r["run_id"] == forced)
    # a smaller token budget (new parameters, so a new key) cuts the answer off: a failed attempt under
    # another key, so the ok answer and its rows stay current; the truncated row stays in the history
    assert medvlm(*base, "--max-tokens", "3")[0] == 0
    assert rows_of(output, "select status, count(*) as n from completions group by all order by 1") == [
        {"status": "ok", "n": 2}, {"status": "truncated", "n": 1}]
    assert rows_of(output, "select run_id, status from completions_current") == [{"run_id": forced, "status": "ok"}]
    assert rows_of(output, "select run_id, result_key from vitals_current") == current_rows
    [status] = analytics.document_status(str(output), STORAGE).to_pylist()
    assert (status["ok"], status["truncated"], status["latest_run_id"]) == (1, 0, rows_of(
        output, "select run_id from runs order by started_at desc limit 1")[0]["run_id"])
