"""Run accounting (medvlm_core.run.accounting): what chunks, shards and runs count, the reconciliation that
says no manifest row was lost, and the runs row and summary a user reads.

Counts only: every row is counted once by status (``ok``, ``truncated``, ``error``, ``skipped``), counts merge
across chunks and shards and survive the JSON a shard hands its parent, a run reconciles only when each valid
manifest row was written or skipped, and the runs row is a valid row of the runs table (written as real
Parquet and read back). No Prefect, no model.
"""

from __future__ import annotations

import json
from array import array
from datetime import datetime, timedelta, timezone

import pyarrow.parquet as pq
import pytest

import medvlm_core
from medvlm_core.inputs.manifest import ManifestPlan
from medvlm_core.inputs.prompts import get_prompt
from medvlm_core.model.files import ModelIdentity
from medvlm_core.output import results
from medvlm_core.run.accounting import ChunkSummary, RunFacts, merge_summaries, reconciles, run_row, run_summary
from medvlm_core.storage import Storage


@pytest.fixture(scope="module")
def prefect_server():
    """Overrides the session's autouse Prefect test server: nothing here runs a flow."""
    yield


def row(manifest_row: int, status: str = "ok", page: int | None = 1, latency_ms: float | None = 10.0,
        error_type: str | None = None, prompt_tokens: int | None = 100, completion_tokens: int | None = 8) -> dict:
    """A result row as ``pages.process_rows`` yields it (the columns accounting reads, and a few it does not)."""
    return {"status": status, "manifest_row": manifest_row, "document_id": f"doc-{manifest_row}", "page": page,
            "latency_ms": latency_ms, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "error_type": error_type, "completion": "text", "run_id": "r1"}


def summary_of(rows: list[dict], chunk_index: int = 0) -> ChunkSummary:
    summary = ChunkSummary(chunk_index, f"/out/_staging/r1/completions/chunk-{chunk_index:06d}.parquet")
    for r in rows:
        summary.add(r)
    return summary


# ---------------------------------------------------------------------------------------------------------
# ChunkSummary.add


def test_each_status_is_counted_once_where_it_belongs():
    s = summary_of([
        row(1), row(2, "truncated", completion_tokens=16), row(3, "error", error_type="image_decode", prompt_tokens=None),
        row(4, "skipped"), row(5, "error", error_type="image_decode"), row(6, "error", error_type="context_overflow"),
    ])
    assert (s.pages_ok, s.pages_truncated, s.pages_error, s.pages_skipped) == (2, 1, 3, 1)
    assert s.written_rows == {1, 2, 3, 5, 6} and s.skipped_rows == {4}
    assert s.error_types == {"image_decode": 2, "context_overflow": 1}
    assert (s.prompt_tokens, s.completion_tokens) == (200, 24)  # answered pages only (ok and truncated)


def test_a_document_of_several_pages_is_one_manifest_row_with_a_count_per_page():
    s = summary_of([row(7, page=1), row(7, "error", page=2, error_type="image_decode"), row(7, "skipped", page=3)])
    assert s.written_rows == {7} and s.skipped_rows == {7}
    assert (s.pages_ok, s.pages_error, s.pages_skipped) == (1, 1, 1)


def test_missing_token_counts_and_latency_count_as_zero():
    s = summary_of([row(1, prompt_tokens=None, completion_tokens=None, latency_ms=None)])
    assert (s.prompt_tokens, s.completion_tokens, s.slowest) == (0, 0, [(0.0, "doc-1", 1)])


def test_the_five_slowest_answered_pages_are_kept_slowest_first():
    s = summary_of([row(n, latency_ms=float(n * 7 % 11)) for n in range(1, 11)] + [row(99, "error", latency_ms=1e6,
                                                                                     error_type="page_timeout")])
    assert s.slowest == [(10.0, "doc-3", 1), (9.0, "doc-6", 1), (8.0, "doc-9", 1), (7.0, "doc-1", 1), (6.0, "doc-4", 1)]


# ---------------------------------------------------------------------------------------------------------
# merge, merge_summaries, JSON


def test_merging_adds_every_count_and_unions_the_rows():
    a = summary_of([row(1, latency_ms=50.0), row(2, "error", error_type="image_decode"), row(3, "skipped")], 0)
    b = summary_of([row(3, page=2), row(4, "truncated"), row(5, "error", error_type="image_decode"),
                    row(6, "error", error_type="not_found")], 1)
    a.storage_retries, b.storage_retries = 2, 3
    total = merge_summaries([a, b])
    assert (total.chunk_index, total.staged_url) == (-1, "")
    assert (total.pages_ok, total.pages_truncated, total.pages_error, total.pages_skipped) == (3, 1, 3, 1)
    assert total.written_rows == {1, 2, 3, 4, 5, 6} and total.skipped_rows == {3}
    assert total.error_types == {"image_decode": 2, "not_found": 1}
    assert (total.prompt_tokens, total.completion_tokens, total.storage_retries) == (300, 24, 5)
    assert total.slowest[0] == (50.0, "doc-1", 1) and len(total.slowest) == 3
    # the parts are left as they were
    assert (a.pages_ok, b.pages_ok, a.error_types) == (1, 2, {"image_decode": 1})


def test_merging_nothing_is_all_zeros():
    total = merge_summaries([])
    assert (total.pages_ok, total.pages_error, total.pages_skipped, total.written_rows, total.error_types) == (0, 0, 0, set(), {})


def test_merged_slowest_pages_stay_the_five_slowest_of_all():
    parts = [summary_of([row(10 * c + n, latency_ms=float(10 * c + n)) for n in range(5)], c) for c in range(3)]
    assert [d for _, d, _ in merge_summaries(parts).slowest] == ["doc-24", "doc-23", "doc-22", "doc-21", "doc-20"]


def test_a_summary_survives_the_json_a_shard_hands_its_parent():
    s = summary_of([row(3), row(1, "truncated"), row(2, "error", error_type="image_decode"), row(4, "skipped", page=None)], 7)
    s.storage_retries = 4
    text = s.to_json()
    data = json.loads(text)
    assert data["written_rows"] == [1, 2, 3] and data["skipped_rows"] == [4]  # sorted lists, not sets
    back = ChunkSummary.from_json(text)
    assert back == s
    assert isinstance(back.slowest[0], tuple) and back.written_rows == {1, 2, 3}
    # a parent merges what it read exactly like a summary it made
    assert merge_summaries([back, back]).pages_ok == 2 * s.pages_ok


# ---------------------------------------------------------------------------------------------------------
# reconciles


def plan(total_rows: int, quarantined: list[int]) -> ManifestPlan:
    valid = [n for n in range(1, total_rows + 1) if n not in quarantined]
    return ManifestPlan(quarantined=[{"row_number": n, "reason": f"row {n}: bad"} for n in quarantined],
                        total_rows=total_rows, row_numbers=array("q", valid))


def test_a_run_reconciles_when_every_valid_row_was_written_or_skipped():
    total = summary_of([row(1), row(2, "error", error_type="image_decode"), row(4, "skipped"), row(5, "skipped"),
                        row(5, page=2)])
    assert reconciles(plan(5, quarantined=[3]), total) == (True, {4})  # row 5 has a written page: not skipped


@pytest.mark.parametrize("rows, why", [
    ([row(1), row(2)], "row 4 has no row at all"),
    ([row(1), row(2), row(4), row(3)], "quarantined row 3 was also written"),
    ([row(1), row(2), row(4), row(9)], "row 9 is not in the manifest"),
])
def test_a_run_does_not_reconcile_when_a_row_is_lost_or_counted_twice(rows, why):
    ok, _ = reconciles(plan(4, quarantined=[3]), summary_of(rows))
    assert not ok, why


def test_a_run_whose_every_row_was_quarantined_reconciles():
    assert reconciles(plan(2, quarantined=[1, 2]), merge_summaries([])) == (True, set())


# ---------------------------------------------------------------------------------------------------------
# run_row, run_summary


IDENTITY = ModelIdentity("tiny-llava", "ab" * 32, "cd" * 32, "mtmd")
STARTED = datetime(2026, 12, 6, 3, 0, tzinfo=timezone.utc)


def facts(seconds: float = 10.0, memory: dict | None = None, storage_retries: int = 1) -> RunFacts:
    return RunFacts("20261206T030000Z-abcdef01", "flow-run-1", "/in/manifest.csv", "/out", STARTED,
                    STARTED + timedelta(seconds=seconds), IDENTITY, '{"max_tokens": 4}', get_prompt("transcribe"),
                    storage_retries, memory)


def test_the_runs_row_carries_the_runs_counts_identity_and_speed(tmp_path):
    total = summary_of([row(1, completion_tokens=10), row(2, "truncated", completion_tokens=30),
                        row(4, "error", error_type="image_decode"), row(5, "skipped")])
    total.storage_retries = 2
    r = run_row(facts(seconds=4.0, memory={"n_parallel": 4, "needed_mb": 900, "budget_mb": 16000}),
                plan(5, quarantined=[3]), total)
    assert (r["manifest_rows"], r["quarantined_rows"], r["skipped_rows"], r["skipped_pages"], r["processed_rows"]) == (5, 1, 1, 1, 3)
    assert (r["pages_ok"], r["pages_error"], r["pages_truncated"], r["reconciled"]) == (2, 1, 1, True)
    assert (r["wall_seconds"], r["pages_per_second"], r["completion_tokens_per_second"]) == (4.0, 0.5, 10.0)
    assert r["storage_retries"] == 3  # the shards' and the run's own
    assert (r["n_parallel"], r["memory_needed_mb"], r["memory_budget_mb"]) == (4, 900, 16000)
    assert (r["model_name"], r["model_sha256"], r["chat_format"], r["prompt_id"]) == ("tiny-llava", "ab" * 32, "mtmd", "transcribe")
    assert r["prompt_sha256"] == get_prompt("transcribe").sha256 and r["medvlm_version"] == medvlm_core.__version__
    assert (r["status"], r["manifest_uri"], r["output_uri"], r["flow_run_id"]) == ("completed", "/in/manifest.csv", "/out", "flow-run-1")
    # a valid row of the runs table, as publishing writes it
    url = str(tmp_path / "run.parquet")
    results.write_rows(Storage(), url, "runs", [r])
    [read] = pq.read_table(url).to_pylist()
    assert (read["run_id"], read["pages_ok"], read["reconciled"], read["n_parallel"]) == (r["run_id"], 2, True, 4)


def test_a_run_without_a_memory_plan_or_time_still_makes_a_valid_row(tmp_path):
    r = run_row(facts(seconds=0.0, memory=None), plan(1, quarantined=[1]), merge_summaries([]))
    assert (r["n_parallel"], r["memory_needed_mb"], r["memory_budget_mb"]) == (None, None, None)
    assert r["pages_per_second"] == 0.0 and r["wall_seconds"] > 0 and r["reconciled"]
    results.write_rows(Storage(), str(tmp_path / "run.parquet"), "runs", [r])
    assert pq.read_table(str(tmp_path / "run.parquet")).num_rows == 1


def test_a_run_that_lost_a_row_says_so_in_its_row():
    r = run_row(facts(), plan(3, quarantined=[]), summary_of([row(1), row(2)]))
    assert r["reconciled"] is False and r["processed_rows"] == 2 and r["manifest_rows"] == 3


def test_the_run_summary_shows_counts_errors_slowest_pages_and_where_the_tables_are():
    total = summary_of([row(1, latency_ms=30.0), row(2, "error", error_type="not_found"),
                        row(3, "error", error_type="image_decode"), row(4, "error", error_type="image_decode")])
    r = run_row(facts(seconds=2.0), plan(4, quarantined=[]), total)
    published = {"completions": "/out/completions/run_date=2026-12-06/part.parquet"}
    summary = run_summary(r, total, published)
    assert {k: summary[k] for k in ("run_id", "manifest_rows", "pages_ok", "pages_error", "reconciled", "storage_retries")} == {
        "run_id": "20261206T030000Z-abcdef01", "manifest_rows": 4, "pages_ok": 1, "pages_error": 3, "reconciled": True,
        "storage_retries": 1}
    assert list(summary["error_types"].items()) == [("image_decode", 2), ("not_found", 1)]  # sorted by type
    assert summary["slowest"] == [(30.0, "doc-1", 1)]
    assert (summary["published"], summary["output"], summary["pages_per_second"]) == (published, "/out", 0.5)
    assert "model_sha256" not in summary and "params_json" not in summary  # counts and locations, not the audit
