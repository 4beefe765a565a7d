"""The batched engine: same answers as the single path, slot refill, per-sequence errors, bounded memory."""

from __future__ import annotations

import pytest
from PIL import Image

from medvlm_core import errors
from medvlm_core.engine import BatchedEngine, Request, VisionEngine
from medvlm_core.errors import DocumentError
from medvlm_core.output.structured import CLINICAL_SCHEMA
from medvlm_core.run.params import EngineConfig, GenerationParams
from medvlm_core.testing.demo_docs import DOCUMENTS, render_document


@pytest.fixture(scope="module")
def pages():
    docs = [render_document(d["title"], d["lines"]) for d in DOCUMENTS.values()]
    return docs + [Image.new("RGB", (300 + 40 * i, 400), (30 * i, 90, 200)) for i in range(4)]


@pytest.mark.parametrize("family, chat_format", [("llava", "mtmd"), ("llava", "llava-1-5"), ("qwen", "qwen2.5-vl")])
def test_batched_answers_match_the_single_path(request, pages, family, chat_format):
    model = request.getfixturevalue(f"tiny_{family}")
    engine = VisionEngine(EngineConfig(str(model.model_path), str(model.mmproj_path), n_ctx=4096), chat_format).start()
    try:
        params = GenerationParams(max_tokens=20)
        single = [engine.generate(p, "Read the page.", params) for p in pages]
        # overlap: images encoded on other threads (1 or 3 encoder contexts) while the batch decodes
        for n_seq, overlap, workers in ((1, False, 1), (3, False, 1), (8, False, 1), (3, True, 1), (8, True, 1),
                                        (3, True, 3)):
            batched = BatchedEngine(engine, n_seq=n_seq, ctx_per_seq=2048, overlap=overlap, encode_ahead=2,
                                    encode_workers=workers)
            assert batched.encode_workers == workers
            try:
                got = dict(batched.generate_many(Request(i, p, "Read the page.", params) for i, p in enumerate(pages)))
            finally:
                batched.close()
            assert [got[i].text for i in range(len(pages))] == [s.text for s in single], (n_seq, overlap, workers)
            assert all(got[i].encode_ms > 0 for i in got)
            assert [got[i].completion_tokens for i in range(len(pages))] == [20] * len(pages)
            assert all(got[i].finish_reason == "length" for i in got)
    finally:
        engine.close()


@pytest.mark.parametrize("overlap, workers", [(False, 1), (True, 1), (True, 3)])
def test_refill_errors_grammar_and_bounded_intake(tiny_qwen, pages, overlap, workers):
    engine = VisionEngine(EngineConfig(str(tiny_qwen.model_path), str(tiny_qwen.mmproj_path), n_ctx=4096), "qwen2.5-vl").start()
    batched = BatchedEngine(engine, n_seq=2, ctx_per_seq=512, overlap=overlap, encode_ahead=2, encode_workers=workers)
    try:
        pulled, finished = [], []
        params = GenerationParams(max_tokens=8)
        # requests taken ahead of the results handed back: the n_seq slots, plus with overlap the encoded
        # queue and one being encoded per encoder
        bound = 2 + (2 + workers if overlap else 0)

        def requests():
            for i in range(12):
                assert len(pulled) - len(finished) <= bound
                pulled.append(i)
                image = Image.new("RGB", (2000, 2000), "white") if i == 5 else pages[i % len(pages)]
                prompt = "x " * 400 if i == 7 else "Read."
                yield Request(i, image, prompt, params, CLINICAL_SCHEMA if i == 9 else None)

        results = {}
        for key, result in batched.generate_many(requests()):
            finished.append(key)
            results[key] = result
        assert sorted(results) == list(range(12))
        for i in (5, 7):  # too big for a 512-token slot: an error for that page only
            assert isinstance(results[i], DocumentError) and results[i].error_type == errors.CONTEXT_OVERFLOW
        ok = [r for i, r in results.items() if i not in (5, 7)]
        assert all(r.completion_tokens == 8 for r in ok if r.finish_reason == "length")
        assert results[9].text.startswith("{")  # grammar-constrained from its first token
        single = engine.generate(pages[9 % len(pages)], "Read.", params, CLINICAL_SCHEMA)
        assert results[9].text == single.text
    finally:
        batched.close()
        engine.close()


@pytest.mark.parametrize("overlap, workers", [(False, 1), (True, 1), (True, 3)])
def test_source_failure_and_early_stop_leave_the_engine_usable(tiny_llava, pages, overlap, workers):
    engine = VisionEngine(EngineConfig(str(tiny_llava.model_path), str(tiny_llava.mmproj_path), n_ctx=2048), "llava-1-5").start()
    batched = BatchedEngine(engine, n_seq=3, ctx_per_seq=512, overlap=overlap, encode_workers=workers)
    params = GenerationParams(max_tokens=6)
    try:
        def failing():
            for i in range(4):
                yield Request(i, pages[i], "Read.", params)
            raise OSError("manifest source went away")

        got = {}
        with pytest.raises(OSError, match="went away"):
            for key, result in batched.generate_many(failing()):
                got[key] = result
        assert sorted(got) == [0, 1, 2, 3]  # the pages taken before the failure are still answered

        stream = batched.generate_many(Request(i, pages[i % len(pages)], "Read.", params) for i in range(20))
        next(stream)
        stream.close()  # the consumer stops early: slots and the encoder threads are released

        again = dict(batched.generate_many(Request(i, pages[i], "Read.", params) for i in range(4)))
        assert [again[i].text for i in range(4)] == [got[i].text for i in range(4)]
        assert engine.generate(pages[0], "Read.", params).text == got[0].text
    finally:
        batched.close()
        engine.close()


def test_flow_with_parallel_sequences_matches_one_at_a_time(tmp_path, tiny_llava, demo_docs):
    import pyarrow.dataset as ds

    from conftest import batch, write_manifest

    records = demo_docs * 2 + [{"document_id": "gone", "image_uri": "documents/gone.png"}]
    records = [dict(r, document_id=f"{r['document_id']}-{i}") for i, r in enumerate(records)]
    manifest = write_manifest(tmp_path / "m.csv", records)
    answers = []
    for n in (1, 3):
        out = tmp_path / f"out{n}"
        summary = batch(manifest=str(manifest), output=str(out), model=str(tiny_llava.model_path),
                               mmproj=str(tiny_llava.mmproj_path), max_tokens=10, n_ctx=2048, n_parallel=n)
        assert (summary["pages_ok"], summary["pages_error"], summary["reconciled"]) == (6, 1, True)
        rows = ds.dataset(out / "completions", partitioning="hive").to_table().to_pylist()
        answers.append(sorted((r["document_id"], r["status"], r["completion"], r["result_key"]) for r in rows))
    assert answers[0] == answers[1]


@pytest.mark.parametrize("family, chat_format", [("llava", "llava-1-5"), ("qwen", "qwen2.5-vl")])
def test_sliced_prefill_interleaved_with_decoding_keeps_the_answers(request, pages, family, chat_format):
    """A page admitted while others decode goes into its slot n_batch image tokens at a time (here 32, so every
    image takes several slices), a decode step of the others between slices: the answers stay the single path's,
    and each admission's longest pause is one slice instead of the whole image."""
    model = request.getfixturevalue(f"tiny_{family}")
    config = EngineConfig(str(model.model_path), str(model.mmproj_path), n_ctx=4096, n_batch=32)
    engine = VisionEngine(config, chat_format).start()
    try:
        params = GenerationParams(max_tokens=12)
        single = [engine.generate(p, "Read the page.", params).text for p in pages]
        pauses = {}
        for interleave in (True, False):
            batched = BatchedEngine(engine, n_seq=3, ctx_per_seq=2048, interleave_prefill=interleave)
            try:
                got = dict(batched.generate_many(Request(i, p, "Read the page.", params) for i, p in enumerate(pages)))
                pauses[interleave] = list(batched.admission_pauses_ms)
            finally:
                batched.close()
            assert [got[i].text for i in range(len(pages))] == single, interleave
        assert len(pauses[True]) >= len(pages) - 3  # every page admitted while others were in flight was timed
        assert all(p > 0 for p in pauses[True] + pauses[False])
    finally:
        engine.close()
