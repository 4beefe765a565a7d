"""The llama.cpp engine on real tiny models: answers, determinism, errors."""

from __future__ import annotations

import pytest
from PIL import Image

from medvlm_core import errors
from medvlm_core.engine import VisionEngine
from medvlm_core.errors import DocumentError, RunError
from medvlm_core.run.params import EngineConfig, GenerationParams
from medvlm_core.testing.demo_docs import DOCUMENTS, render_document


@pytest.fixture(scope="module")
def page():
    doc = DOCUMENTS["discharge-0001"]
    return render_document(doc["title"], doc["lines"])


@pytest.mark.parametrize("family, chat_format", [("llava", "mtmd"), ("llava", "llava-1-5"), ("qwen", "qwen2.5-vl")])
def test_generate_is_real_and_deterministic(request, page, family, chat_format):
    model = request.getfixturevalue(f"tiny_{family}")
    engine = VisionEngine(EngineConfig(str(model.model_path), str(model.mmproj_path), n_ctx=4096), chat_format).start()
    try:
        params = GenerationParams(max_tokens=12)
        first = engine.generate(page, "List the medications.", params)
        second = engine.generate(page, "List the medications.", params)
        assert first.text.strip() and first.completion_tokens == 12 and first.finish_reason == "length"
        assert first.prompt_tokens > 0 and first.latency_ms > 0
        assert first.text == second.text  # temperature 0: same answer every time
    finally:
        engine.close()
    assert not engine.loaded


def test_context_overflow_is_a_document_error(tiny_qwen, page):
    engine = VisionEngine(EngineConfig(str(tiny_qwen.model_path), str(tiny_qwen.mmproj_path), n_ctx=256), "qwen2.5-vl").start()
    try:
        with pytest.raises(DocumentError) as info:
            engine.generate(page, "x " * 300, GenerationParams(max_tokens=4))
        assert info.value.error_type == errors.CONTEXT_OVERFLOW and "n_ctx=256" in info.value.message
        # the engine stays usable for the next document
        ok = engine.generate(Image.new("RGB", (64, 64), "white"), "Hi", GenerationParams(max_tokens=2))
        assert ok.completion_tokens == 2
    finally:
        engine.close()


def test_missing_model_is_a_run_error(tmp_path, tiny_llava):
    with pytest.raises(RunError, match="not found"):
        VisionEngine(EngineConfig(str(tmp_path / "none.gguf"), str(tiny_llava.mmproj_path)), "mtmd").start()
    with pytest.raises(RunError, match="unknown chat format"):
        VisionEngine(EngineConfig(str(tiny_llava.model_path), str(tiny_llava.mmproj_path)), "nope")


def test_image_token_budget_reaches_the_vision_encoder(tiny_qwen, page):
    answers = {}
    for budget in (None, 16):
        config = EngineConfig(str(tiny_qwen.model_path), str(tiny_qwen.mmproj_path), n_ctx=4096, image_max_tokens=budget)
        engine = VisionEngine(config, "qwen2.5-vl").start()
        try:
            answers[budget] = engine.generate(page, "Read.", GenerationParams(max_tokens=3))
            if budget:  # the same budget applies to the batched engine, which shares the handler's context
                from medvlm_core.engine import BatchedEngine, Request

                batched = BatchedEngine(engine, n_seq=2, ctx_per_seq=1024)
                [(_, result)] = list(batched.generate_many([Request(0, page, "Read.", GenerationParams(max_tokens=3))]))
                batched.close()
                assert result.text == answers[budget].text
        finally:
            engine.close()
    # fewer image tokens: fewer prompt positions (Qwen counts M-RoPE positions)
    assert answers[16].prompt_tokens < answers[None].prompt_tokens


def test_image_token_budget_is_part_of_the_parameters():
    from medvlm_core.run.params import ImageOptions, params_json

    base = EngineConfig("m.gguf", "p.gguf")
    budget = EngineConfig("m.gguf", "p.gguf", image_max_tokens=256)
    plain = params_json(GenerationParams(), ImageOptions(), "qwen2.5-vl", base)
    assert plain == params_json(GenerationParams(), ImageOptions(), "qwen2.5-vl")  # unchanged without a budget
    assert '"image_tokens":[null,256]' in params_json(GenerationParams(), ImageOptions(), "qwen2.5-vl", budget)
