"""A chunk of manifest rows -> staged Parquet (medvlm_core.run.chunks), the unit of work a flow maps over.

Real parts: the generated tiny LLaVA model in real llama.cpp (one engine for the module, as a worker keeps
one), the synthetic clinical documents as real PNGs, a manifest read and validated as a run reads it, the
staged files read back with pyarrow. Every manifest row ends in the staged file as rows the user gets (one
per page: ``ok`` or ``error`` naming the file), or is counted as skipped; a chunk or shard that failed as a
whole still leaves an error row per manifest row; a failed shard's partial files are removed. No Prefect.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import write_manifest
from medvlm_core import errors
from medvlm_core.engine.registry import create_engine
from medvlm_core.inputs.manifest import read_manifest
from medvlm_core.output import results
from medvlm_core.run.chunks import discard_staged_shard, stage_chunk, stage_failed_rows, structured_tables
from medvlm_core.run.context import make_spec, open_run, prepare_model
from medvlm_core.settings import Settings
from medvlm_core.storage import Storage

RUN = "20261206T030000Z-c0ffee01"
ENGINE_OPTIONS = {"n_ctx": 4096, "n_parallel": 2}


@pytest.fixture(scope="module")
def prefect_server():
    """Overrides the session's autouse Prefect test server: nothing here runs a flow."""
    yield


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("chunks-cache")


def make_run_spec(output, model, cache_dir, **options):
    """The run spec a flow gives every chunk (``open_run`` -> ``prepare_model`` -> ``make_spec``)."""
    started = datetime(2026, 12, 6, 3, 0, tzinfo=timezone.utc)
    ctx = open_run(RUN, started, str(output), str(model.model_path), str(model.mmproj_path),
                   {**ENGINE_OPTIONS, **options}, Settings(cache_dir=cache_dir, memory_budget_mb=64_000), Storage())
    engine, identity = prepare_model(ctx)
    return make_spec(ctx, engine, identity)


@pytest.fixture(scope="module")
def engine(tiny_llava, cache_dir, tmp_path_factory):
    """One started engine for the module (a worker's shared engine), as the flows make it."""
    spec = make_run_spec(tmp_path_factory.mktemp("unused"), tiny_llava, cache_dir)
    owned = create_engine(spec.engine, spec.model.chat_format)
    yield owned
    owned.close()


@pytest.fixture
def spec(tmp_path, tiny_llava, cache_dir):
    return make_run_spec(tmp_path / "out", tiny_llava, cache_dir, max_tokens=4, prompt_id="transcribe")


@pytest.fixture
def rows(tmp_path, demo_docs):
    """The three demo documents, a missing file and a file that is not an image, as validated manifest rows."""
    (tmp_path / "documents" / "broken.png").write_bytes(b"this is not a PNG")
    records = demo_docs + [{"document_id": "missing-0004", "image_uri": "documents/not-there.png"},
                           {"document_id": "broken-0005", "image_uri": "documents/broken.png"}]
    plan = read_manifest(str(write_manifest(tmp_path / "manifest.csv", records)), Storage())
    assert plan.valid_rows == 5
    return plan.rows


def staged(url: str) -> list[dict]:
    return sorted(pq.read_table(url).to_pylist(), key=lambda r: (r["manifest_row"], r["page"] or 0))


# ---------------------------------------------------------------------------------------------------------
# stage_chunk


def test_every_row_of_a_chunk_is_staged_as_a_result_or_an_error_naming_its_file(engine, spec, rows, tmp_path):
    summary = stage_chunk(engine, 0, rows, spec, Storage())
    url = spec.layout.staged_chunk(RUN, "completions", 0)
    assert summary.staged_url == url and url == str(tmp_path / "out" / "_staging" / RUN / "completions" / "chunk-000000.parquet")
    out = staged(url)
    assert [(r["manifest_row"], r["document_id"], r["status"]) for r in out] == [
        (1, "discharge-0001", "ok"), (2, "rx-0002", "ok"), (3, "lab-0003", "ok"),
        (4, "missing-0004", "error"), (5, "broken-0005", "error")]
    ok = out[:3]
    assert all(r["completion"] and r["completion_tokens"] == 4 and r["page"] == 1 for r in ok)
    assert [r["patient_id"] for r in ok] == ["P-000101", "P-000102", "P-000103"]
    assert {r["run_id"] for r in out} == {RUN} and {r["prompt_id"] for r in out} == {"transcribe"}
    assert all(len(r["result_key"]) == 64 for r in out) and len({r["result_key"] for r in out}) == 5
    missing, broken = out[3], out[4]
    assert missing["error_type"] == errors.NOT_FOUND and str(tmp_path / "documents" / "not-there.png") in missing["error_message"]
    assert broken["error_type"] in errors.ERROR_TYPES and str(tmp_path / "documents" / "broken.png") in broken["error_message"]
    assert (summary.pages_ok, summary.pages_error, summary.pages_skipped, summary.written_rows) == (3, 2, 0, {1, 2, 3, 4, 5})
    assert summary.error_types == {errors.NOT_FOUND: 1, broken["error_type"]: 1}
    assert summary.completion_tokens == 12 and summary.prompt_tokens > 0
    # the staged file is in the completions table's schema, as publishing merges it
    assert pq.read_schema(url).equals(results.COMPLETIONS_SCHEMA)


def test_pages_already_answered_are_skipped_unless_the_run_is_forced(engine, spec, rows):
    storage = Storage()
    first = staged(stage_chunk(engine, 0, rows, spec, storage).staged_url)
    done = results.DoneKeys(frozenset(r["result_key"] for r in first if r["status"] == "ok"))
    again = stage_chunk(engine, 1, rows, spec, storage, done)
    assert (again.pages_skipped, again.skipped_rows, again.pages_ok, again.pages_error) == (3, {1, 2, 3}, 0, 2)
    # skipped pages are counted, not written; errors are tried again
    assert [(r["manifest_row"], r["status"]) for r in staged(again.staged_url)] == [(4, "error"), (5, "error")]
    forced = stage_chunk(engine, 2, rows, dataclasses.replace(spec, force=True), storage, done)
    rewritten = staged(forced.staged_url)
    assert (forced.pages_skipped, forced.pages_ok) == (0, 3)
    # temperature 0: the same page, model, prompt and parameters give the same key and the same answer
    assert [(r["result_key"], r["completion"]) for r in rewritten[:3]] == [(r["result_key"], r["completion"]) for r in first[:3]]


def test_a_document_of_several_pages_gives_a_row_per_page(engine, spec, tmp_path, demo_docs):
    pages = [Image.open(tmp_path / r["image_uri"]).convert("RGB") for r in demo_docs[:2]]
    pages[0].save(tmp_path / "documents" / "two-pages.tiff", save_all=True, append_images=pages[1:])
    records = [{"document_id": "fax-2p", "image_uri": "documents/two-pages.tiff"},
               {"document_id": "fax-2p-second", "image_uri": "documents/two-pages.tiff", "page": "2"}]
    plan = read_manifest(str(write_manifest(tmp_path / "m.csv", records)), Storage())
    summary = stage_chunk(engine, 0, plan.rows, spec, Storage())
    out = staged(summary.staged_url)
    assert [(r["manifest_row"], r["page"], r["page_count"], r["status"]) for r in out] == [
        (1, 1, 2, "ok"), (1, 2, 2, "ok"), (2, 2, 2, "ok")]
    assert (summary.pages_ok, summary.written_rows) == (3, {1, 2})


def test_a_chunk_of_a_shard_stages_under_the_shards_name(engine, spec, rows):
    summary = stage_chunk(engine, 3, rows[:1], spec, Storage(), shard_index=7)
    assert summary.staged_url.endswith(f"/_staging/{RUN}/completions/shard-00007-chunk-000003.parquet")
    assert [r["document_id"] for r in staged(summary.staged_url)] == ["discharge-0001"]


def test_a_chunk_with_no_rows_stages_an_empty_file(engine, spec):
    summary = stage_chunk(engine, 0, [], spec, Storage())
    assert pq.read_table(summary.staged_url).num_rows == 0 and summary.written_rows == set()


# ---------------------------------------------------------------------------------------------------------
# Structured mode


def test_structured_mode_stages_each_extractions_table_even_when_nothing_was_extracted(engine, tmp_path, tiny_llava,
                                                                                      cache_dir, demo_docs,
                                                                                      vitals_extraction):
    spec = make_run_spec(tmp_path / "out", tiny_llava, cache_dir, max_tokens=300, extraction=str(vitals_extraction))
    assert spec.default_prompt.prompt_id == "vitals"
    records = [dict(demo_docs[0]), dict(demo_docs[1], prompt_id="clinical_extraction")]
    plan = read_manifest(str(write_manifest(tmp_path / "m.csv", records)), Storage())
    summary = stage_chunk(engine, 0, plan.rows, spec, Storage())
    completions = staged(summary.staged_url)
    assert [(r["prompt_id"], r["status"]) for r in completions] == [("vitals", "ok"), ("clinical_extraction", "ok")]
    tables = ["vitals", "diagnoses", "medications", "instructions"]
    assert sorted(structured_tables(spec, completions)) == sorted(tables)
    assert sorted(u.split("/")[-2] for u in Storage().list_files(spec.layout.run_staging(RUN), ".parquet")) == sorted(
        ["completions", *tables])
    staged_tables = {t: pq.read_table(spec.layout.staged_chunk(RUN, t, 0)) for t in tables}
    vitals = staged_tables.pop("vitals").to_pylist()
    # the schema forces one or two items: the vitals page's rows, joined to its completion by result_key
    assert 1 <= len(vitals) <= 2 and {v["result_key"] for v in vitals} == {completions[0]["result_key"]}
    assert {v["section"] for v in vitals} == {"vitals"} and all(v["document_id"] == "discharge-0001" for v in vitals)
    assert all(t.num_rows == 0 for t in staged_tables.values())  # the random model closes the clinical arrays at once


def test_answers_cut_off_are_truncated_and_give_no_structured_rows(engine, tmp_path, tiny_llava, cache_dir, demo_docs,
                                                                   vitals_extraction):
    spec = make_run_spec(tmp_path / "out", tiny_llava, cache_dir, max_tokens=3, extraction=str(vitals_extraction))
    plan = read_manifest(str(write_manifest(tmp_path / "m.csv", demo_docs[:2])), Storage())
    summary = stage_chunk(engine, 0, plan.rows, spec, Storage())
    assert {r["status"] for r in staged(summary.staged_url)} == {"truncated"}
    assert (summary.pages_truncated, summary.pages_ok) == (2, 2)
    assert pq.read_table(spec.layout.staged_chunk(RUN, "vitals", 0)).num_rows == 0  # the table exists, empty


# ---------------------------------------------------------------------------------------------------------
# stage_failed_rows, discard_staged_shard


def test_a_chunk_that_failed_as_a_whole_leaves_an_error_row_per_manifest_row(engine, spec, rows, tmp_path):
    storage = Storage()
    stage_chunk(engine, 0, rows[:2], spec, storage)  # what a first attempt staged: replaced, not added to
    odd = dataclasses.replace(rows[2], prompt_id="no-such-prompt")  # its prompt cannot be resolved: the run's is used
    summary = stage_failed_rows(0, [*rows[:2], odd, *rows[3:]], spec, storage, "worker lost after 3 attempt(s)")
    out = staged(summary.staged_url)
    assert summary.staged_url == spec.layout.staged_chunk(RUN, "completions", 0)
    assert [(r["manifest_row"], r["document_id"], r["status"], r["error_type"]) for r in out] == [
        (n, d, "error", errors.TASK_FAILED)
        for n, d in enumerate(["discharge-0001", "rx-0002", "lab-0003", "missing-0004", "broken-0005"], start=1)]
    assert {r["error_message"] for r in out} == {"worker lost after 3 attempt(s)"}
    assert out[2]["prompt_id"] == "transcribe" and {r["run_id"] for r in out} == {RUN}
    assert (summary.pages_error, summary.pages_ok, summary.written_rows, summary.error_types) == (
        5, 0, {1, 2, 3, 4, 5}, {errors.TASK_FAILED: 5})
    assert pq.read_schema(summary.staged_url).equals(results.COMPLETIONS_SCHEMA)


def test_a_failed_shards_staged_files_are_removed_in_every_table_and_no_others(engine, spec, rows):
    storage = Storage()
    for shard in (1, 2):
        for chunk in (0, 1):
            for table in ("completions", "vitals"):
                results.write_rows(storage, spec.layout.staged_chunk(RUN, table, chunk, shard), "completions", [])
    stage_chunk(engine, 0, rows[:1], spec, storage)  # a chunk outside any shard
    discard_staged_shard(storage, spec, 2)
    left = sorted(u.split(f"/_staging/{RUN}/", 1)[1] for u in storage.list_files(spec.layout.run_staging(RUN), ".parquet"))
    assert left == ["completions/chunk-000000.parquet",
                    "completions/shard-00001-chunk-000000.parquet", "completions/shard-00001-chunk-000001.parquet",
                    "vitals/shard-00001-chunk-000000.parquet", "vitals/shard-00001-chunk-000001.parquet"]
    # then its rows are recorded as errors under its name, so none is lost
    summary = stage_failed_rows(0, rows, spec, storage, "shard 2 failed after 2 attempt(s): engine crash", 2)
    assert summary.staged_url.endswith("shard-00002-chunk-000000.parquet") and len(staged(summary.staged_url)) == 5


def test_discarding_a_shard_that_staged_nothing_is_harmless(spec):
    discard_staged_shard(Storage(), spec, 5)  # its run staged nothing at all yet
