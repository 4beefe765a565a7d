"""The batched engine: same answers as the single path, slot refill, per-sequence errors, bounded memory."""

from __future__ import annotations

import pytest
from PIL import Image

from medvlm_core import errors
from medvlm_core.batched import BatchedEngine, Request
from medvlm_core.config import EngineConfig, GenerationParams
from medvlm_core.demo_docs import DOCUMENTS, render_document
from medvlm_core.engine import VisionEngine
from medvlm_core.errors import DocumentError
from medvlm_core.structured import CLINICAL_SCHEMA


@pytest.fixture(scope="module")
def pages():
    docs = [render_document(d["title"], d["lines"]) for d in DOCUMENTS.values()]
    return docs + [Image.new("RGB", (300 + 40 * i, 400), (30 * i, 90, 200)) for i in range(4)]


@pytest.mark.parametrize("family, chat_format", [("llava", "mtmd"), ("llava", "llava-1-5"), ("qwen", "qwen2.5-vl")])
def test_batched_answers_match_the_single_path(request, pages, family, chat_format):
    model = request.getfixturevalue(f"tiny_{family}")
    engine = VisionEngine(EngineConfig(str(model.model_path), str(model.mmproj_path), n_ctx=4096), chat_format).load()
    try:
        params = GenerationParams(max_tokens=20)
        single = [engine.generate(p, "Read the page.", params) for p in pages]
        for n_seq in (1, 3, 8):
            batched = BatchedEngine(engine, n_seq=n_seq, ctx_per_seq=2048)
            try:
                got = dict(batched.generate_many(Request(i, p, "Read the page.", params) for i, p in enumerate(pages)))
            finally:
                batched.close()
            assert [got[i].text for i in range(len(pages))] == [s.text for s in single], n_seq
            assert [got[i].completion_tokens for i in range(len(pages))] == [20] * len(pages)
            assert all(got[i].finish_reason == "length" for i in got)
    finally:
        engine.close()


def test_refill_errors_grammar_and_bounded_intake(tiny_qwen, pages):
    engine = VisionEngine(EngineConfig(str(tiny_qwen.model_path), str(tiny_qwen.mmproj_path), n_ctx=4096), "qwen2.5-vl").load()
    batched = BatchedEngine(engine, n_seq=2, ctx_per_seq=512)
    try:
        pulled, finished = [], []
        params = GenerationParams(max_tokens=8)

        def requests():
            for i in range(12):
                # at most n_seq requests are ever taken ahead of the results handed back
                assert len(pulled) - len(finished) <= 2
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


def test_flow_with_parallel_sequences_matches_one_at_a_time(tmp_path, tiny_llava, demo_docs):
    import pyarrow.dataset as ds

    from conftest import write_manifest
    from flows.batch import medvlm_batch

    records = demo_docs * 2 + [{"document_id": "gone", "image_uri": "documents/gone.png"}]
    records = [dict(r, document_id=f"{r['document_id']}-{i}") for i, r in enumerate(records)]
    manifest = write_manifest(tmp_path / "m.csv", records)
    answers = []
    for n in (1, 3):
        out = tmp_path / f"out{n}"
        summary = medvlm_batch(manifest=str(manifest), output=str(out), model=str(tiny_llava.model_path),
                               mmproj=str(tiny_llava.mmproj_path), max_tokens=10, n_ctx=2048, n_parallel=n)
        assert (summary["pages_ok"], summary["pages_error"], summary["reconciled"]) == (6, 1, True)
        rows = ds.dataset(out / "completions", partitioning="hive").to_table().to_pylist()
        answers.append(sorted((r["document_id"], r["status"], r["completion"], r["result_key"]) for r in rows))
    assert answers[0] == answers[1]
