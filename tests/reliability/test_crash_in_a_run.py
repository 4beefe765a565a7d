"""A native llama.cpp abort in the middle of a real run: the page that caused it becomes an engine_crash
error row, every other page is answered, and the counts reconcile (isolate=True is the default)."""

from __future__ import annotations

import pyarrow.dataset as ds

from conftest import batch, write_manifest
from medvlm_core.engine import close_shared_engines
from medvlm_core.engine.registry import inject_fault
from medvlm_core.testing.faults import NativeAbort, Stall
from support.reliability_report import record


def test_abort_mid_run_costs_one_error_row(tmp_path, tiny_qwen, demo_docs, monkeypatch):
    records = [dict(r, document_id=f"{r['document_id']}-{i}") for i in range(3) for r in demo_docs]
    manifest = write_manifest(tmp_path / "m.csv", records)
    close_shared_engines()  # a fresh child process, which gets the fault below when it starts
    inject_fault(NativeAbort(on=frozenset({4})))  # llama.cpp's real ggml_abort on the 5th page taken in
    monkeypatch.setenv("GGML_NO_BACKTRACE", "1")
    try:
        summary = batch(manifest=str(manifest), output=str(tmp_path / "out"), model=str(tiny_qwen.model_path),
                               mmproj=str(tiny_qwen.mmproj_path), max_tokens=6, n_ctx=2048, n_parallel=3)
    finally:
        inject_fault(None)
        close_shared_engines()
    assert (summary["pages_ok"], summary["pages_error"], summary["reconciled"]) == (8, 1, True)
    assert summary["error_types"] == {"engine_crash": 1}
    rows = ds.dataset(tmp_path / "out" / "completions", partitioning="hive").to_table().to_pylist()
    [crashed] = [r for r in rows if r["status"] == "error"]
    assert crashed["error_type"] == "engine_crash" and "SIGABRT" in crashed["error_message"]
    assert sorted(r["manifest_row"] for r in rows) == list(range(1, 10))
    record("native abort (GGML_ABORT) during a run", inputs=len(records), faults={"SIGABRT": 1},
           rows_lost=len(records) - len(rows))

    # the re-run retries the error row only (errors are not done), now without the fault
    try:
        again = batch(manifest=str(manifest), output=str(tmp_path / "out"), model=str(tiny_qwen.model_path),
                             mmproj=str(tiny_qwen.mmproj_path), max_tokens=6, n_ctx=2048, n_parallel=3)
    finally:
        close_shared_engines()
    assert (again["pages_ok"], again["skipped_pages"], again["pages_error"]) == (1, 8, 0)


def test_a_hung_page_in_a_run_costs_one_timeout_row(tmp_path, tiny_qwen, demo_docs):
    records = [dict(r, document_id=f"{r['document_id']}-{i}") for i in range(2) for r in demo_docs]
    manifest = write_manifest(tmp_path / "m.csv", records)
    close_shared_engines()
    inject_fault(Stall(on=frozenset({2})))  # the child stalls before it takes the 3rd page, as a stuck call would
    try:
        summary = batch(manifest=str(manifest), output=str(tmp_path / "out"), model=str(tiny_qwen.model_path),
                        mmproj=str(tiny_qwen.mmproj_path), max_tokens=6, n_ctx=2048, n_parallel=2, page_timeout=5)
    finally:
        inject_fault(None)
        close_shared_engines()
    assert (summary["pages_ok"], summary["pages_error"], summary["reconciled"]) == (5, 1, True)
    assert summary["error_types"] == {"timeout": 1}
    rows = ds.dataset(tmp_path / "out" / "completions", partitioning="hive").to_table().to_pylist()
    assert sorted(r["manifest_row"] for r in rows) == list(range(1, 7))
    record("hung page during a run", inputs=len(records), faults={"stall": 2}, rows_lost=len(records) - len(rows))
