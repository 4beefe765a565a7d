"""Reasoning models, Spark NLP's llama.cpp parameters and confidences, on real llama.cpp with the tiny models.

A reasoning model is made from the tiny LLaVA-style model with a Qwen3-style chat template that opens the
thinking block in the generation prompt (given as a chat template file, as a user would for a GGUF that has
none). Its random weights never close the block themselves, so the reasoning budget is what closes it.
"""

from __future__ import annotations

import json
import math

import pyarrow.dataset as ds
import pytest
from PIL import Image

from conftest import batch, write_manifest
from medvlm_core.engine import BatchedEngine, Request, VisionEngine
from medvlm_core.inputs.prompts import get_prompt
from medvlm_core.output.structured import CLINICAL_SCHEMA
from medvlm_core.run.params import EngineConfig, GenerationParams, ImageOptions, params_json
from medvlm_core.testing.demo_docs import DOCUMENTS, render_document

# Qwen3's layout: the generation prompt opens the thinking block.
THINKING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
PROMPT = "Read the page."


@pytest.fixture(scope="module")
def pages():
    docs = [render_document(d["title"], d["lines"]) for d in DOCUMENTS.values()]
    return docs + [Image.new("RGB", (240 + 30 * i, 320), (40 * i, 120, 200)) for i in range(3)]


@pytest.fixture(scope="module")
def thinking(tiny_llava):
    """The tiny model with the thinking template, loaded once (mtmd renders the template)."""
    config = EngineConfig(str(tiny_llava.model_path), str(tiny_llava.mmproj_path), n_ctx=2048,
                          chat_template=THINKING_TEMPLATE)
    engine = VisionEngine(config, "mtmd").start()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def plain(tiny_llava):
    engine = VisionEngine(EngineConfig(str(tiny_llava.model_path), str(tiny_llava.mmproj_path), n_ctx=2048), "mtmd").start()
    yield engine
    engine.close()


def answers(engine, pages, params, n_seq=1, schema=None, system=None, prompt=PROMPT):
    batched = BatchedEngine(engine, n_seq=n_seq, ctx_per_seq=2048)
    try:
        got = dict(batched.generate_many(Request(i, p, prompt, params, schema, system) for i, p in enumerate(pages)))
    finally:
        batched.close()
    return [got[i] for i in range(len(pages))]


def test_the_budget_closes_the_thinking_block_and_the_answer_follows(thinking, pages):
    assert BatchedEngine(thinking, n_seq=1).render_prompt(PROMPT).endswith("<think>\n")
    params = GenerationParams(max_tokens=24, max_reasoning_tokens=6)
    single = answers(thinking, pages, params)
    for g in single:
        assert g.reasoning and g.reasoning_tokens == 6 and g.reasoning_budget_hit
        assert "<think>" not in g.text and "</think>" not in g.text and "</think>" not in g.reasoning
        assert g.text.strip() and g.completion_tokens == 24 and g.finish_reason == "length"
    # several pages at once: the same answers, thinking and confidences
    batched = answers(thinking, pages, params, n_seq=3)
    assert [(g.text, g.reasoning) for g in batched] == [(g.text, g.reasoning) for g in single]
    for a, b in zip(single, batched):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-3)

    # no budget: the random model thinks until max_tokens, and the answer is empty
    unbounded = answers(thinking, pages[:2], GenerationParams(max_tokens=10))
    assert all(g.text == "" and g.reasoning and g.reasoning_tokens == 10 and not g.reasoning_budget_hit for g in unbounded)
    # raw: the text as generated, nothing taken apart
    raw = answers(thinking, pages[:2], GenerationParams(max_tokens=10, reasoning="raw"))
    assert [g.text for g in raw] == [g.reasoning for g in unbounded] and all(g.reasoning is None for g in raw)


def test_a_block_the_model_opens_itself_is_separated(plain, pages):
    params = GenerationParams(max_tokens=16)
    [first] = answers(plain, pages[:1], params)
    # markers taken from the model's own output: it "opens" with its first character, "closes" at a later one
    opener, closer = first.text[0], first.text[6]
    assert opener.strip() and closer.strip() and closer not in first.text[1:6] and opener != closer
    [split] = answers(plain, pages[:1], GenerationParams(max_tokens=16, think_open=opener, think_close=closer))
    assert split.reasoning == first.text[1:6].strip()
    assert split.text == first.text[7:].lstrip() and split.reasoning_tokens > 0 and not split.reasoning_budget_hit


def test_structured_answers_parse_after_thinking_in_a_real_run(tmp_path, tiny_llava, demo_docs):
    template = tmp_path / "thinking.jinja"
    template.write_text(THINKING_TEMPLATE)
    manifest = write_manifest(tmp_path / "m.csv", demo_docs)
    summary = batch(manifest=str(manifest), output=str(tmp_path / "out"), model=str(tiny_llava.model_path),
                    mmproj=str(tiny_llava.mmproj_path), prompt_id="clinical_extraction", chat_template_file=str(template),
                    max_reasoning_tokens=8, max_tokens=500, n_ctx=4096, n_parallel=2)
    assert (summary["pages_ok"], summary["pages_error"], summary["reconciled"]) == (3, 0, True)
    rows = ds.dataset(tmp_path / "out" / "completions", partitioning="hive").to_table().to_pylist()
    for row in rows:
        assert row["status"] == "ok" and row["chat_format"] == "mtmd"
        assert set(json.loads(row["completion"])) == {"diagnoses", "medications", "instructions"}  # the grammar held
        assert row["reasoning"] and row["reasoning_tokens"] == 8 and row["reasoning_budget_hit"]
        assert row["mean_logprob"] < 0 and row["min_logprob"] <= row["mean_logprob"]
        params = json.loads(row["params_json"])
        assert params["generation"]["max_reasoning_tokens"] == 8 and "chat_template_sha256" in params
    items = sum(ds.dataset(tmp_path / "out" / t, partitioning="hive").to_table().num_rows
                for t in ("diagnoses", "medications", "instructions"))
    confidences = [c for t in ("diagnoses", "medications", "instructions")
                   for c in ds.dataset(tmp_path / "out" / t, partitioning="hive").to_table().column("confidence").to_pylist()]
    assert len(confidences) == items and all(c is not None and 0 < c <= 1 for c in confidences)


def test_confidences_are_the_model_probabilities_of_the_answer(plain, pages):
    params = GenerationParams(max_tokens=12, logprobs=3)
    got = answers(plain, pages, params, n_seq=2)
    for g in got:
        assert len(g.token_logprobs) == g.completion_tokens == 12 and len(g.top_logprobs) == 12
        assert all(lp <= 0 for lp in g.token_logprobs) and g.min_logprob <= g.mean_logprob < 0
        for lp, top in zip(g.token_logprobs, g.top_logprobs):
            # greedy: the chosen token is the most likely one, and the alternatives are sorted
            assert len(top) == 3 and top[0][1] == pytest.approx(lp, abs=1e-4)
            assert top[0][1] >= top[1][1] >= top[2][1] and sum(math.exp(t[1]) for t in top) <= 1.0001
        assert g.token_offsets[0] == 0 and list(g.token_offsets) == sorted(g.token_offsets)
    # the numbers do not depend on how many pages share the batch
    alone = answers(plain, pages, params, n_seq=1)
    for a, b in zip(alone, got):
        assert a.text == b.text and a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-3)


SAMPLING_CHANGES = [
    dict(presence_penalty=1.5),
    dict(frequency_penalty=1.5),
    dict(repeat_penalty=1.5, repeat_last_n=8),
    dict(temperature=0.9, seed=3, typical_p=0.5),
    dict(temperature=0.9, seed=3, mirostat=2, mirostat_tau=3.0),
    dict(temperature=0.9, seed=3, mirostat=1),
    dict(temperature=0.9, seed=3, dynatemp_range=0.8),
    dict(temperature=1.5, seed=3, top_p=0.2, min_keep=5),
]


def test_every_sampling_parameter_changes_the_answer_and_the_key(plain, pages):
    base = GenerationParams(max_tokens=16)
    reference = [g.text for g in answers(plain, pages[:3], base)]
    first_tokens = answers(plain, pages[:1], GenerationParams(max_tokens=1, logprobs=2))[0].top_logprobs[0]
    token_ids = plain.llm.tokenize(first_tokens[0][0].encode(), add_bos=False, special=True)
    changes = SAMPLING_CHANGES + [dict(banned_tokens=token_ids[:1]), dict(logit_bias={str(token_ids[0]): -100.0})]
    seen = set()
    for change in changes:
        params = GenerationParams(max_tokens=16, **change)
        got = [g.text for g in answers(plain, pages[:3], params)]
        assert got != reference, change
        key = params_json(params, ImageOptions(), "mtmd")
        assert key != params_json(base, ImageOptions(), "mtmd") and key not in seen, change
        seen.add(key)
    # max_tokens -1: until the end of sequence or of the context
    [long] = answers(plain, pages[:1], GenerationParams(max_tokens=-1))
    assert long.finish_reason == "length" and long.completion_tokens > 500


def test_the_batched_path_equals_llama_cpp_python_own_for_the_parameters_it_takes(plain, pages):
    system = "You are a careful clinical coder."
    for change in (dict(), dict(presence_penalty=1.2), dict(frequency_penalty=0.7, repeat_penalty=1.1),
                   dict(logit_bias={"40": 5.0}, banned_tokens=[41, 42])):
        params = GenerationParams(max_tokens=14, **change)
        reference = [plain.generate(p, PROMPT, params, system=system).text for p in pages[:3]]
        assert [g.text for g in answers(plain, pages[:3], params, n_seq=3, system=system)] == reference, change
    # the system prompt is sent (it changes the answer) and is part of the prompt's identity
    params = GenerationParams(max_tokens=14)
    assert [g.text for g in answers(plain, pages[:3], params)] != [g.text for g in answers(plain, pages[:3], params, system=system)]
    assert get_prompt("transcribe").sha256 != get_prompt("transcribe", system=system).sha256
    assert get_prompt("transcribe").sha256 == get_prompt("transcribe", system="  ").sha256


def test_schema_answers_without_thinking_still_start_constrained(plain, pages):
    [g] = answers(plain, pages[:1], GenerationParams(max_tokens=400), schema=CLINICAL_SCHEMA)
    assert g.reasoning is None and set(json.loads(g.text)) == {"diagnoses", "medications", "instructions"}


def test_resource_parameters_reach_llama_cpp_and_leave_the_answers_alone(tiny_llava, pages, plain):
    from medvlm_core.errors import RunError

    params = GenerationParams(max_tokens=10)
    reference = [g.text for g in answers(plain, pages[:2], params)]
    config = EngineConfig(str(tiny_llava.model_path), str(tiny_llava.mmproj_path), n_ctx=2048, n_batch=256, n_ubatch=128,
                          n_threads=1, n_threads_batch=2, use_mmap=False, split_mode="none", main_gpu=0)
    engine = VisionEngine(config, "mtmd").start()
    try:
        context = engine.llm.context_params
        assert (context.n_batch, context.n_ubatch, context.n_threads, context.n_threads_batch) == (256, 128, 1, 2)
        assert engine.llm.model_params.split_mode == 0
        assert [g.text for g in answers(engine, pages[:2], params)] == reference
    finally:
        engine.close()
    # a quantized KV cache is part of the key; the tiny model's 16-wide heads cannot hold one: a clear error
    q8 = EngineConfig(str(tiny_llava.model_path), str(tiny_llava.mmproj_path), n_ctx=1024, cache_type_k="q8_0")
    assert '"kv_cache":["q8_0","f16"]' in params_json(params, ImageOptions(), "mtmd", q8)
    with pytest.raises(RunError, match="multiple of 32"):
        VisionEngine(q8, "mtmd").start()


def test_the_isolated_child_gets_the_system_prompt_and_reasoning_settings(tiny_llava, pages, thinking):
    from medvlm_core.engine import IsolatedEngine

    system, params = "Answer briefly.", GenerationParams(max_tokens=12, max_reasoning_tokens=4, logprobs=2)
    expected = answers(thinking, pages[:2], params, system=system)
    config = thinking.config.replace(n_parallel=2)
    with IsolatedEngine(config, "mtmd") as engine:
        got = dict(engine.generate_many(Request(i, p, PROMPT, params, None, system) for i, p in enumerate(pages[:2])))
    assert [(got[i].text, got[i].reasoning, got[i].reasoning_budget_hit) for i in range(2)] == \
        [(g.text, g.reasoning, g.reasoning_budget_hit) for g in expected]
    assert [len(got[i].top_logprobs) for i in range(2)] == [len(g.top_logprobs) for g in expected]
