"""Every generated model family through the whole flow, with its chat format picked from the files alone.

One tiny model per family llama.cpp's libmtmd runs (``medvlm_core.testing.tiny_model``): its GGUF pair
follows the real converters' layout, so ``inspect_model`` / ``choose_chat_format`` see what they would see
on the real model, and libmtmd runs the family's own vision graph and image-token layout. The flow runs
llama.cpp in its supervised child process (the default), so a generated file that llama.cpp aborts on
fails its test instead of the session.
"""

from __future__ import annotations

import os

import pyarrow.dataset as ds
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from conftest import batch, write_manifest
from medvlm_core.model.files import identify_model, inspect_model, read_gguf_metadata
from medvlm_core.testing.tiny_model import FAMILIES, REASONING_FAMILIES, make_tiny_model

# (family, reasoning variant) -> (text architecture, projector type, chat format picked without an override)
EXPECTED = {
    ("llava", False): ("llama", "mlp", "mtmd"),  # carries a template, so it is rendered as is
    ("llavanext", False): ("llama", "mlp", "llava-1-6"),  # no template, tiles by image_grid_pinpoints
    ("qwen2vl", False): ("qwen2vl", "qwen2vl_merger", "qwen2.5-vl"),
    ("qwen25vl", False): ("qwen2vl", "qwen2.5vl_merger", "qwen2.5-vl"),
    ("qwen3vl", False): ("qwen3vl", "qwen3vl_merger", "mtmd"),
    ("gemma3", False): ("gemma3", "gemma3", "mtmd"),
    ("gemma4", False): ("gemma4", "gemma4v", "mtmd"),
    ("internvl", False): ("qwen2", "internvl", "mtmd"),
    ("minicpmv", False): ("qwen2", "resampler", "minicpm-v-2.6"),
    ("idefics3", False): ("llama", "idefics3", "mtmd"),  # SmolVLM
    ("pixtral", False): ("llama", "pixtral", "mtmd"),  # Mistral Small 3.1
    ("qwen3vl", True): ("qwen3vl", "qwen3vl_merger", "mtmd"),  # Qwen3-VL-Thinking
    ("qwen2vl", True): ("qwen2vl", "qwen2vl_merger", "mtmd"),  # the <think> template beats the fixed handler
}
CASES = [pytest.param(family, reasoning, id=f"{family}-reasoning" if reasoning else family) for family, reasoning in EXPECTED]
# where a rendered generation prompt ends, for the families whose layout is not ChatML
GENERATION_PROMPT_END = {
    "gemma3": "<start_of_turn>model\n",
    "gemma4": "<|turn>model\n<|channel>thought\n<channel|>",  # thinking off: an empty thought channel
    "idefics3": "Assistant:",
    "pixtral": "[/INST]",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Every family (and the reasoning variants) generated once for the module: (family, reasoning) -> TinyModel."""
    out = tmp_path_factory.mktemp("families")
    return {(family, reasoning): make_tiny_model(out / family, family, reasoning=reasoning) for family, reasoning in EXPECTED}


def test_every_family_is_covered():
    assert {family for family, _ in EXPECTED} == set(FAMILIES)
    assert set(REASONING_FAMILIES) == set(FAMILIES) - set(GENERATION_PROMPT_END) - {"llavanext"}


@pytest.mark.parametrize("family, reasoning", CASES)
def test_chat_format_is_picked_from_the_files(models, tmp_path, family, reasoning):
    model = models[family, reasoning]
    arch, projector, chat_format = EXPECTED[family, reasoning]
    info = inspect_model(str(model.model_path), str(model.mmproj_path))
    assert (info.architecture, info.projector_type, info.has_chat_template) == (arch, projector, family != "llavanext")
    assert info.thinking_template is reasoning
    identity = identify_model(str(model.model_path), str(model.mmproj_path), None, tmp_path / "cache")
    assert identity.chat_format == chat_format
    # tiny files, and the same arguments give the same bytes
    assert os.path.getsize(model.model_path) < 1_000_000 and os.path.getsize(model.mmproj_path) < 1_000_000
    again = make_tiny_model(tmp_path / "again", family, reasoning=reasoning)
    assert again.model_path.read_bytes() == model.model_path.read_bytes()
    assert again.mmproj_path.read_bytes() == model.mmproj_path.read_bytes()


@pytest.mark.parametrize("family, reasoning", CASES)
def test_family_runs_through_the_whole_flow(models, tmp_path, demo_docs, family, reasoning):
    model = models[family, reasoning]
    chat_format = EXPECTED[family, reasoning][2]
    manifest = write_manifest(tmp_path / "manifest.csv", demo_docs)
    output = str(tmp_path / "out")
    summary = batch(manifest=str(manifest), output=output, model=str(model.model_path), mmproj=str(model.mmproj_path),
                    max_tokens=4, n_ctx=4096, n_parallel=2)
    assert (summary["pages_ok"], summary["pages_error"], summary["reconciled"]) == (len(demo_docs), 0, True)
    rows = ds.dataset(os.path.join(output, "completions"), format="parquet", partitioning="hive").to_table().to_pylist()
    assert sorted(r["document_id"] for r in rows) == sorted(d["document_id"] for d in demo_docs)
    for r in rows:
        assert r["status"] == "ok" and r["error_type"] is None, r["error_message"]
        assert r["completion_tokens"] > 0 and r["prompt_tokens"] > 0
        # a reasoning model's text is still in its open thinking block after 4 tokens: medvlm files it as
        # the row's reasoning (the answer, completion, is then empty)
        text = (r["completion"] or "") + (r.get("reasoning") or "") if reasoning else r["completion"]
        assert text.strip()
        assert r["chat_format"] == chat_format and r["model_name"] == model.model_path.stem


def _render(template: str, **extra) -> str:
    """A chat template rendered the way llama-cpp-python's MTMDChatHandler renders it (image part -> marker)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    messages = [{"role": "user", "content": [{"type": "text", "text": "<__media__>"}, {"type": "text", "text": "Read."}]}]
    return env.from_string(template).render(messages=messages, bos_token="", eos_token="", **extra)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_reasoning_variant_opens_a_thinking_block(tmp_path, family):
    plain = read_gguf_metadata(make_tiny_model(tmp_path, family).model_path).get("tokenizer.chat_template")
    if family == "llavanext":
        assert plain is None  # like the LLaVA-1.6 conversions: the handler's layout is used
    else:
        assert _render(plain, add_generation_prompt=True).endswith(GENERATION_PROMPT_END.get(family, "<|im_start|>assistant\n"))
    if family not in REASONING_FAMILIES:
        with pytest.raises(ValueError, match="ChatML"):
            make_tiny_model(tmp_path, family, reasoning=True)
        return
    thinking = read_gguf_metadata(make_tiny_model(tmp_path, family, reasoning=True).model_path)["tokenizer.chat_template"]
    assert _render(thinking, add_generation_prompt=True).endswith("<|im_start|>assistant\n<think>\n")
    assert "<think>" not in _render(thinking, add_generation_prompt=False)


def test_chat_template_replaces_the_default(tmp_path):
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}<think>\n"
    for family in ("qwen2vl", "gemma3"):
        model = make_tiny_model(tmp_path / family, family, chat_template=template)
        assert read_gguf_metadata(model.model_path)["tokenizer.chat_template"] == template
    assert inspect_model(str(model.model_path), str(model.mmproj_path)).thinking_template
    # "" writes none: a classic LLaVA-1.5 conversion, laid out by the Vicuna handler
    bare = make_tiny_model(tmp_path / "bare", "llava", chat_template="")
    info = inspect_model(str(bare.model_path), str(bare.mmproj_path))
    assert not info.has_chat_template and not info.grid_pinpoints
    assert identify_model(str(bare.model_path), str(bare.mmproj_path), None, None).chat_format == "llava-1-5"


def test_engine_prompt_of_the_reasoning_variant_ends_open(models):
    """The prompt the engine really feeds libmtmd (BatchedEngine.render_prompt) ends inside the thinking block."""
    from medvlm_core.engine import BatchedEngine, VisionEngine
    from medvlm_core.run.params import EngineConfig

    model = models["qwen2vl", True]
    engine = VisionEngine(EngineConfig(str(model.model_path), str(model.mmproj_path), n_ctx=1024), "mtmd").start()
    try:
        batched = BatchedEngine(engine, n_seq=1, ctx_per_seq=1024, overlap=False)
        try:
            prompt = batched.render_prompt("Read the page.")
        finally:
            batched.close()
    finally:
        engine.close()
    assert prompt.endswith("Read the page.<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert "<__media__>" in prompt
