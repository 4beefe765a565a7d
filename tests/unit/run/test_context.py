"""A run's set-up, free of orchestration (medvlm_core.run.context): run ids, ``open_run`` (locations, policy,
user extraction), the output's guards (writable, the lease, recovery of interrupted publishes), the model
(``prepare_model``: files, identity, saved parameters of a model zip, memory plan) and the spec every chunk
receives.

Real parts: local folders, the generated tiny GGUF pair, real JSON and Parquet; a problem is one ``RunError``
naming what is wrong, before any document is read. No Prefect.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from datetime import datetime, timedelta, timezone

import pyarrow.parquet as pq
import pytest

from conftest import completion_row, run_row
from medvlm_core.errors import RunError
from medvlm_core.output import results
from medvlm_core.output.lease import LeaseRecord, OutputLease
from medvlm_core.output.records import PublishMarker
from medvlm_core.run.context import (
    acquire_output,
    check_output_writable,
    chunk_rows,
    ensure_output_held,
    make_run_id,
    make_spec,
    open_run,
    prepare_model,
    recover_output,
    release_output,
)
from medvlm_core.settings import Settings
from medvlm_core.storage import Storage

STARTED = datetime(2026, 12, 6, 3, 4, 5, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def prefect_server():
    """Overrides the session's autouse Prefect test server: nothing here runs a flow."""
    yield


@pytest.fixture
def settings(tmp_path):
    return Settings(cache_dir=tmp_path / "cache", lease_poll_s=0.05, memory_budget_mb=64_000)


def run(tmp_path, model, settings, options=None, output=None, run_id="20261206T030405Z-00000001", mmproj=True):
    """``open_run`` as a flow calls it, on the tiny model and an output under ``tmp_path``."""
    return open_run(run_id, STARTED, str(output or tmp_path / "out"), str(model.model_path),
                    str(model.mmproj_path) if mmproj else None, options, settings, Storage())


# ---------------------------------------------------------------------------------------------------------
# make_run_id


def test_a_run_id_is_the_start_time_and_the_orchestrators_id():
    assert make_run_id(STARTED, "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0") == "20261206T030405Z-0f1e2d3c"
    random_ids = {make_run_id(STARTED) for _ in range(20)}
    assert len(random_ids) == 20 and all(re.fullmatch(r"20261206T030405Z-[0-9a-f]{8}", r) for r in random_ids)


def test_run_ids_sort_by_start_time():
    later = [make_run_id(STARTED + timedelta(seconds=s), "ffffffff") for s in (1, 60, 3600, 86400 * 40)]
    assert sorted([make_run_id(STARTED, "ffffffff"), *reversed(later)]) == [make_run_id(STARTED, "ffffffff"), *later]


# ---------------------------------------------------------------------------------------------------------
# open_run


def test_open_run_gives_the_locations_options_and_default_prompt(tmp_path, tiny_llava, settings):
    ctx = run(tmp_path, tiny_llava, settings, {"max_tokens": 4, "prompt_id": "transcribe", "n_parallel": 2})
    assert ctx.output.root == str(tmp_path / "out") and ctx.model == str(tiny_llava.model_path)
    assert (ctx.run_id, ctx.started) == ("20261206T030405Z-00000001", STARTED)
    assert (ctx.options.generation.max_tokens, ctx.options.engine.n_parallel) == (4, 2)
    assert ctx.requested == {"max_tokens": 4, "prompt_id": "transcribe", "n_parallel": 2}
    assert ctx.default_prompt.prompt_id == "transcribe"
    assert run(tmp_path, tiny_llava, settings).default_prompt.prompt_id == "clinical_analysis"
    assert not (tmp_path / "out").exists()  # opening a run writes nothing


@pytest.mark.parametrize("what", ["output", "model", "mmproj", "chat template", "extraction definition"])
def test_a_location_outside_the_policy_stops_the_run_naming_it(tmp_path, tiny_llava, settings, what):
    inside, outside = tmp_path / "allowed", tmp_path / "elsewhere"
    (inside / "models").mkdir(parents=True)
    outside.mkdir()
    for name in ("model.gguf", "mmproj.gguf"):
        (inside / "models" / name).write_bytes(b"GGUF")
    places = {"output": str(inside / "out"), "model": str(inside / "models" / "model.gguf"),
              "mmproj": str(inside / "models" / "mmproj.gguf"), "chat template": str(inside / "t.jinja"),
              "extraction definition": str(inside / "x.json")}
    places[what] = str(outside / "thing")
    options = {"allowed_locations": [str(inside)], "chat_template_file": places["chat template"],
               "extraction": places["extraction definition"]}
    with pytest.raises(RunError) as info:
        open_run("r1", STARTED, places["output"], places["model"], places["mmproj"], options, settings, Storage())
    assert str(info.value) == f"{what} {outside / 'thing'} is outside the allowed locations of this deployment"
    assert not (inside / "out").exists()


def test_a_user_extraction_becomes_the_default_prompt_unless_the_run_names_one(tmp_path, tiny_llava, settings,
                                                                               vitals_extraction):
    ctx = run(tmp_path, tiny_llava, settings, {"extraction": str(vitals_extraction)})
    prompt = ctx.default_prompt
    assert prompt.prompt_id == "vitals" and prompt.text == "List every vital sign on the page."
    assert prompt.schema["properties"]["vitals"]["maxItems"] == 2
    assert ctx.requested["prompt_id"] == "vitals"
    named = run(tmp_path, tiny_llava, settings, {"extraction": str(vitals_extraction), "prompt_id": "transcribe"})
    assert named.default_prompt.prompt_id == "transcribe"


def test_an_unusable_extraction_stops_the_run_naming_the_file(tmp_path, tiny_llava, settings):
    missing = tmp_path / "none.json"
    with pytest.raises(RunError, match=rf"^extraction definition cannot be read: {missing}"):
        run(tmp_path, tiny_llava, settings, {"extraction": str(missing)})
    broken = tmp_path / "broken.json"
    broken.write_text('{"prompt_id": "x", ')
    with pytest.raises(RunError, match=rf"^{broken}: not valid JSON$"):
        run(tmp_path, tiny_llava, settings, {"extraction": str(broken)})
    incomplete = tmp_path / "incomplete.json"
    incomplete.write_text(json.dumps({"prompt_id": "x"}))
    with pytest.raises(RunError, match=rf"^{incomplete}: missing "):
        run(tmp_path, tiny_llava, settings, {"extraction": str(incomplete)})


def test_bad_options_stop_the_run(tmp_path, tiny_llava, settings):
    with pytest.raises(RunError, match="max_tokens must be >= 1"):
        run(tmp_path, tiny_llava, settings, {"max_tokens": 0})
    with pytest.raises(RunError, match="unknown run option"):
        run(tmp_path, tiny_llava, settings, {"max_tokenz": 4})


def test_the_next_run_keeps_everything_but_its_id_start_storage_and_lease(tmp_path, tiny_llava, settings):
    ctx = run(tmp_path, tiny_llava, settings, {"max_tokens": 4, "on_busy": "fail"})
    acquire_output(ctx)
    try:
        later = STARTED + timedelta(hours=1)
        nxt = ctx.next_run(later, "abcdef12-3456")
        assert (nxt.run_id, nxt.started, nxt.lease) == ("20261206T040405Z-abcdef12", later, None)
        assert nxt.storage is not ctx.storage and nxt.storage.retries == 0
        assert (nxt.output, nxt.options, nxt.model, nxt.requested) == (ctx.output, ctx.options, ctx.model, ctx.requested)
        assert ctx.lease is not None  # the first run still holds the output
    finally:
        release_output(ctx)


# ---------------------------------------------------------------------------------------------------------
# The output's guards


def test_a_writable_output_passes_and_keeps_nothing_of_the_probe(tmp_path, tiny_llava, settings):
    ctx = run(tmp_path, tiny_llava, settings)
    check_output_writable(ctx)
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


def test_an_output_that_cannot_be_written_stops_the_run_naming_it(tmp_path, tiny_llava, settings):
    (tmp_path / "a-file").write_text("not a folder")
    ctx = run(tmp_path, tiny_llava, settings, output=tmp_path / "a-file" / "out")
    with pytest.raises(RunError, match=rf"^output {tmp_path / 'a-file' / 'out'}: cannot be written \(.+\)$"):
        check_output_writable(ctx)


def test_one_run_at_a_time_holds_the_output(tmp_path, tiny_llava, settings):
    first = run(tmp_path, tiny_llava, settings, {"on_busy": "fail"}, run_id="run-first")
    second = run(tmp_path, tiny_llava, settings, {"on_busy": "fail"}, run_id="run-second")
    lease = acquire_output(first)
    try:
        assert first.lease is lease and acquire_output(first) is lease  # taking it again is a no-op
        assert OutputLease(Storage(), first.output, "observer").current().run_id == "run-first"
        with pytest.raises(RunError, match=r"busy: run run-first \(host "):
            acquire_output(second)
        assert second.lease is None
        ensure_output_held(first)
    finally:
        assert release_output(first) is True
    assert release_output(first) is False and first.lease is None  # safe to call twice
    acquire_output(second)
    try:
        assert OutputLease(Storage(), second.output, "observer").current().run_id == "run-second"
    finally:
        release_output(second)
    ensure_output_held(second)  # a run without a lease has nothing to check


def test_a_run_that_lost_its_lease_may_not_publish(tmp_path, tiny_llava, settings):
    ctx = run(tmp_path, tiny_llava, settings, {"on_busy": "fail"}, run_id="run-stalled")
    lease = acquire_output(ctx)
    try:
        # another run took the output over (as after this one stalled past the lease's life)
        taker = LeaseRecord(epoch=lease.held.epoch + 1, run_id="run-taker", token="t" * 32, host="worker-elsewhere",
                            pid=4242, acquired_at=STARTED.isoformat(), expires_at="2999-01-01T00:00:00+00:00")
        assert ctx.storage.put_if_absent(ctx.output.lease_epoch(taker.epoch), taker.to_bytes())
        with pytest.raises(RunError, match=r"run run-stalled lost its lease to run run-taker \(host worker-elsewhere"):
            ensure_output_held(ctx)
    finally:
        release_output(ctx)


def test_recovery_finishes_a_publish_that_was_interrupted(tmp_path, tiny_llava, settings):
    ctx = run(tmp_path, tiny_llava, settings)
    layout, storage = ctx.output, ctx.storage
    killed = "20261205T000000Z-deadbeef"
    results.write_rows(storage, layout.staged_chunk(killed, "completions", 0), "completions",
                       [completion_row(run_id=killed, document_id="doc-1")])
    results.write_rows(storage, layout.staged(killed, "runs", "run.parquet"), "runs", [run_row(run_id=killed)])
    storage.write_bytes_atomic(layout.publish_marker(killed), PublishMarker(killed, "2026-12-05", {"shards": 1}).to_bytes())
    busy = "20261205T010000Z-00000002"  # still doing inference: no marker, left alone
    results.write_rows(storage, layout.staged_chunk(busy, "completions", 0), "completions", [completion_row(run_id=busy)])
    assert recover_output(ctx) == [killed]
    commit = json.loads((tmp_path / "out" / "_commits" / f"{killed}.json").read_text())
    assert commit["shards"] == 1
    assert pq.read_table(commit["tables"]["completions"])["document_id"].to_pylist() == ["doc-1"]
    assert (tmp_path / "out" / "_staging" / busy).exists() and not (tmp_path / "out" / "_staging" / killed).exists()
    assert recover_output(ctx) == []  # nothing left to finish


# ---------------------------------------------------------------------------------------------------------
# prepare_model, make_spec, chunk_rows


def test_prepare_model_identifies_the_model_and_plans_its_memory(tmp_path, tiny_llava, settings):
    ctx = run(tmp_path, tiny_llava, settings, {"n_ctx": 2048, "n_parallel": 2})
    engine, identity = prepare_model(ctx)
    assert (engine.model_path, engine.mmproj_path, engine.n_ctx) == (str(tiny_llava.model_path), str(tiny_llava.mmproj_path), 2048)
    assert identity.model_name == "tiny-llava" and identity.chat_format == "mtmd"
    assert identity.model_sha256 == hashlib.sha256(tiny_llava.model_path.read_bytes()).hexdigest()
    assert identity.mmproj_sha256 == hashlib.sha256(tiny_llava.mmproj_path.read_bytes()).hexdigest()
    assert (ctx.memory.requested_parallel, ctx.memory.n_parallel, ctx.memory.budget_source) == (2, 2, "setting")
    assert engine.n_parallel == 2


def test_prepare_model_lowers_the_parallelism_to_what_fits(tmp_path, tiny_llava, settings):
    probe = run(tmp_path, tiny_llava, settings, {"n_parallel": 8})
    prepare_model(probe)
    plan = probe.memory
    fits_three = plan.weights_mb + plan.compute_mb + 3.5 * plan.kv_mb_per_page
    tight = Settings(cache_dir=settings.cache_dir, memory_budget_mb=fits_three)
    ctx = run(tmp_path, tiny_llava, tight, {"n_parallel": 8})
    engine, _ = prepare_model(ctx)
    assert (ctx.memory.requested_parallel, ctx.memory.n_parallel, engine.n_parallel) == (8, 3, 3)
    too_small = Settings(cache_dir=settings.cache_dir, memory_budget_mb=plan.weights_mb / 4)
    with pytest.raises(RunError, match=r"^the model does not fit: one page of n_ctx"):
        prepare_model(run(tmp_path, tiny_llava, too_small))


def test_prepare_model_refuses_a_model_that_does_not_match_its_hash(tmp_path, tiny_llava, settings):
    ctx = run(tmp_path, tiny_llava, settings, {"mmproj_sha256": "00" * 32})
    with pytest.raises(RunError, match=rf"^{tiny_llava.mmproj_path}: sha256 mismatch"):
        prepare_model(ctx)
    with pytest.raises(RunError, match="--mmproj is required"):
        prepare_model(run(tmp_path, tiny_llava, settings, mmproj=False))


def test_a_chat_template_file_is_read_and_rendered_by_the_generic_handler(tmp_path, tiny_llava, settings):
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    ctx = run(tmp_path, tiny_llava, settings, {"chat_template_file": str(template), "chat_format": "llava-1-5"})
    engine, identity = prepare_model(ctx)
    assert engine.chat_template == template.read_text() and identity.chat_format == "llava-1-5"  # a forced format wins
    engine, identity = prepare_model(run(tmp_path, tiny_llava, settings, {"chat_template_file": str(template)}))
    assert identity.chat_format == "mtmd"
    latin1 = tmp_path / "latin1.jinja"
    latin1.write_bytes("{{ 'caf\u00e9' }}".encode("latin-1"))
    with pytest.raises(RunError, match=rf"^{latin1}: the chat template is not UTF-8 text$"):
        prepare_model(run(tmp_path, tiny_llava, settings, {"chat_template_file": str(latin1)}))
    with pytest.raises(RunError, match=rf"^chat template cannot be read: {tmp_path / 'none.jinja'}"):
        prepare_model(run(tmp_path, tiny_llava, settings, {"chat_template_file": str(tmp_path / "none.jinja")}))


def spark_zip(path, model, param_map: dict):
    """A Spark NLP model zip: Spark ML metadata with saved llama.cpp parameters, and the two GGUFs."""
    metadata = {"class": "com.johnsnowlabs.nlp.annotators.seq2seq.AutoGGUFVisionModel", "paramMap": param_map,
                "defaultParamMap": {}}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("vendor_model/metadata/part-00000", json.dumps(metadata) + "\n")
        z.write(model.model_path, "vendor_model/model.gguf")
        z.write(model.mmproj_path, "vendor_model/mmproj.gguf")
    return path


def test_a_model_zips_saved_parameters_fill_in_only_what_the_run_did_not_set(tmp_path, tiny_llava, settings):
    bundle = spark_zip(tmp_path / "vendor.zip", tiny_llava, {"nPredict": 7, "repeatPenalty": 1.05, "nCtx": 3072})
    ctx = open_run("r1", STARTED, str(tmp_path / "out"), str(bundle), None, {"max_tokens": 3}, settings, Storage())
    engine, identity = prepare_model(ctx)
    assert (ctx.options.generation.max_tokens, ctx.options.generation.repeat_penalty, engine.n_ctx) == (3, 1.05, 3072)
    assert ctx.saved_defaults == {"repeat_penalty": 1.05, "n_ctx": 3072}
    assert identity.model_name == "tiny-llava" and engine.model_path.endswith("model.gguf")
    spec = make_spec(ctx, engine, identity)
    assert json.loads(spec.params_json)["generation"]["repeat_penalty"] == 1.05
    unusable = spark_zip(tmp_path / "bad.zip", tiny_llava, {"nPredict": 0})
    ctx = open_run("r2", STARTED, str(tmp_path / "out"), str(unusable), None, {}, settings, Storage())
    with pytest.raises(RunError, match=rf"^{unusable}: the parameters saved in the model zip are not usable: max_tokens"):
        prepare_model(ctx)


def test_the_spec_every_chunk_receives(tmp_path, tiny_llava, settings):
    ctx = run(tmp_path, tiny_llava, settings, {"max_tokens": 4, "prompt_id": "transcribe", "force": True})
    engine, identity = prepare_model(ctx)
    spec = make_spec(ctx, engine, identity)
    assert (spec.run_id, spec.layout, spec.model, spec.engine) == (ctx.run_id, ctx.output, identity, engine)
    assert (spec.default_prompt.prompt_id, spec.force, spec.fetch_workers) == ("transcribe", True, settings.fetch_workers)
    assert json.loads(spec.params_json)["generation"]["max_tokens"] == 4
    other = make_spec(run(tmp_path, tiny_llava, settings, {"max_tokens": 5}), engine, identity)
    assert other.params_json != spec.params_json  # the parameters are part of every result key


def test_chunk_rows_is_the_runs_chunk_size_else_the_settings(tmp_path, tiny_llava, settings):
    assert chunk_rows(run(tmp_path, tiny_llava, settings, {"chunk_size": 5})) == 5
    assert chunk_rows(run(tmp_path, tiny_llava, settings, {"n_parallel": 2})) == settings.chunk_size  # 128 > 8 x 2
    big = Settings(cache_dir=settings.cache_dir, chunk_size=10)
    assert chunk_rows(run(tmp_path, tiny_llava, big, {"n_parallel": 4})) == 32  # at least 8 batches' worth
