"""Typed configuration: the knobs of a run, each defined once, with its default, limits and help text.

Every knob that changes a completion lives in ``GenerationParams``, ``ImageOptions`` or the output-relevant
part of ``EngineOptions``; ``params_json`` (stored on every result row) is built from exactly those, so a
row says which parameters produced it and the result key changes when any of them does.

These are pydantic dataclasses: validated on construction (a bad value is a clear error naming the knob),
hashable (the process-wide engine registry keys on them) and plain enough to pickle to the isolated child.
``medvlm_core.run.options.RunOptions`` composes them with the run's prompt, model, storage, output and policy
options; the CLI flags and the flows' parameters are derived from those definitions, so a new knob is one
field here (plus the code that uses it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, fields
from typing import Any, Literal, Optional, Tuple

from pydantic import ConfigDict, Field, field_validator
from pydantic.dataclasses import dataclass

# Unknown keys are errors, not silently dropped (a misspelt knob must not be ignored).
STRICT = ConfigDict(extra="forbid")


# Knobs added after the first release enter ``params_json`` (and so the result key) only when set to something
# else than their default: pages answered before a knob existed keep their keys and are not redone. Knobs that
# do not change the answer (how many alternatives are stored) never do.
def _later(default: Any, description: str, key: str = "when_set", **limits: Any) -> Any:
    """A knob added after the first release: part of the result key only when set (``key="never"``: not at all)."""
    return Field(default, description=description, json_schema_extra={"key": key}, **limits)


@dataclass(frozen=True, kw_only=True, config=STRICT)
class GenerationParams:
    """Sampling parameters (Spark NLP's names in brackets). Defaults suit a clinical batch job: greedy
    (temperature 0), fixed seed."""

    max_tokens: int = Field(512, ge=-1, description="most tokens generated per page, thinking included; -1 = until "
                            "the end of sequence or the context [nPredict]")
    temperature: float = Field(0.0, ge=0, description="sampling temperature; 0 = greedy, the same answer every time [temperature]")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling: smallest token set with this probability [topP]")
    top_k: int = Field(40, ge=0, description="sample among the k most likely tokens (0 = all) [topK]")
    min_p: float = Field(0.05, ge=0, le=1, description="drop tokens below this fraction of the top token's probability [minP]")
    # 1.0 = no penalty: medication lists legitimately repeat tokens (units, routes, frequencies).
    repeat_penalty: float = Field(1.0, gt=0, description="penalty on recently generated tokens (1.0 = none) [repeatPenalty]")
    seed: int = Field(0, description="sampling seed [seed]")
    stop: Tuple[str, ...] = Field((), description="stop string (repeatable); generation ends before it [stopStrings]")
    repeat_last_n: int = _later(64, "tokens the penalties look back over (0 = none, -1 = the context) [repeatLastN]", ge=-1)
    frequency_penalty: float = _later(0.0, "penalty growing with how often a token was generated [frequencyPenalty]")
    presence_penalty: float = _later(0.0, "penalty on any token already generated [presencePenalty]")
    typical_p: float = _later(1.0, "locally typical sampling (1.0 = off) [typicalP]", gt=0, le=1)
    min_keep: int = _later(1, "tokens the top-p, min-p and typical samplers always keep [minKeep]", ge=1)
    mirostat: int = _later(0, "mirostat sampling: 0 off, 1 or 2 (replaces top-k/top-p/min-p) [mirostat]", ge=0, le=2)
    mirostat_tau: float = _later(5.0, "mirostat target surprise [mirostatTau]", gt=0)
    mirostat_eta: float = _later(0.1, "mirostat learning rate [mirostatEta]", gt=0)
    dynatemp_range: float = _later(0.0, "dynamic temperature: temperature +/- this range by entropy (0 = off) "
                                   "[dynamicTemperatureRange]", ge=0)
    dynatemp_exponent: float = _later(1.0, "dynamic temperature exponent [dynamicTemperatureExponent]", gt=0)
    logit_bias: Tuple[Tuple[int, float], ...] = _later((), "bias added to a token's logit: ID:BIAS (repeatable), or a "
                                                       "JSON object {id: bias} [tokenIdBias]")
    banned_tokens: Tuple[int, ...] = _later((), "token ids never generated (repeatable) [disableTokenIds]")
    # Reasoning models: how a thinking block (think_open ... think_close) is handled (docs/models.md, reasoning models).
    reasoning: Literal["separate", "raw"] = _later(
        "separate", "separate: the thinking block goes to the reasoning column, the answer to completion; raw: "
        "completion keeps the text as generated [removeThinkingTag]")
    think_open: str = _later("<think>", "marker that opens a thinking block", min_length=1)
    think_close: str = _later("</think>", "marker that closes a thinking block", min_length=1)
    max_reasoning_tokens: Optional[int] = _later(None, "reasoning budget: after this many thinking tokens medvlm "
                                                 "closes the block itself and the answer follows", ge=0)
    logprobs: int = _later(0, "keep the N most likely alternatives of every answer token (0 = none) [nProbs]",
                               key="never", ge=0, le=20)

    @field_validator("max_tokens")
    @classmethod
    def _not_zero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("max_tokens must be >= 1 (or -1: until the end of sequence or the context)")
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_pairs(cls, value: Any) -> Any:
        """Accept ``{"123": -5.0}`` (JSON), ``"123:-5"`` strings (the CLI) and pairs; sorted, so equal biases
        hash equal."""
        items = value.items() if isinstance(value, dict) else value
        pairs = [tuple(item.replace("=", ":").split(":", 1)) if isinstance(item, str) else item for item in items]
        return tuple(sorted((int(k), float(v)) for k, v in pairs))

    def as_dict(self) -> dict[str, Any]:
        """The parameters for ``params_json``: the first release's knobs always, later ones only when set.

        Returns:
            Field name -> JSON-ready value.
        """
        d = {}
        for f in fields(self):
            value = getattr(self, f.name)
            info = type(self).__pydantic_fields__[f.name]
            key = (info.json_schema_extra or {}).get("key", "always")
            if key == "never" or (key == "when_set" and value == info.default):
                continue
            d[f.name] = [list(v) if isinstance(v, tuple) else v for v in value] if isinstance(value, tuple) else value
        return d


@dataclass(frozen=True, kw_only=True, config=STRICT)
class ImageOptions:
    """How document files become model-ready page images, and the safety limits applied on the way."""

    # 1.6 MP keeps a letter page at ~130 dpi: small print stays legible, and Qwen-VL-style encoders stay
    # near 2k tokens.
    max_pixels: int = Field(1_600_000, ge=1, description="pixel budget per page image (downscaled to fit, aspect kept)")
    # Limits against hostile or broken input (exceeding one is a ``too_large`` error row).
    max_bytes: int = Field(64 * 1024 * 1024, ge=1, description="limit: bytes per document file")
    max_source_pixels: int = Field(120_000_000, ge=1, description="limit: pixels per source page (decompression-bomb guard)")
    max_pages: int = Field(500, ge=1, description="limit: pages per document")
    pdf_dpi: int = Field(150, ge=1, description="resolution PDF pages are rendered at")


@dataclass(frozen=True, kw_only=True, config=STRICT)
class EngineOptions:
    """How llama.cpp runs the model (everything but where the model files are)."""

    # None = pick from the mmproj's projector type / the model's metadata (see medvlm_core.model.files).
    chat_format: Optional[str] = Field(None, description="override the chat format picked from the model")
    n_ctx: int = Field(8192, ge=256, description="context tokens per page (image + prompt + answer)")
    # -1 = offload every layer when llama.cpp was built with a GPU backend; ignored by CPU builds.
    n_gpu_layers: int = Field(-1, description="layers offloaded to the GPU (-1 = all)")
    n_threads: Optional[int] = Field(None, ge=1, description="CPU threads (default: llama.cpp's choice)")
    n_batch: int = Field(512, ge=1, description="tokens per llama.cpp decode call during prefill [nBatch]")
    # None = n_batch. Gemma 3 attends over an image non-causally: n_ubatch must hold a whole image's tokens.
    n_ubatch: Optional[int] = Field(None, ge=1, description="tokens per physical batch (default: n_batch) [nUbatch]")
    n_threads_batch: Optional[int] = Field(None, ge=1, description="CPU threads for prefill (default: n_threads) [nThreadsBatch]")
    use_mmap: bool = Field(True, description="memory-map the model file [useMmap]")
    use_mlock: bool = Field(False, description="lock the model in RAM (no swapping) [useMlock]")
    main_gpu: int = Field(0, ge=0, description="the GPU that holds the model (split mode none) or the scratch buffers [mainGpu]")
    split_mode: Literal["none", "layer", "row"] = Field("layer", description="how a model is split over several GPUs [gpuSplitMode]")
    tensor_split: Optional[Tuple[float, ...]] = Field(None, description="fraction of the model per GPU (repeatable), e.g. 3 1")
    # Quantized KV cache: half the memory at q8_0, slightly different numerics (part of params_json when set).
    cache_type_k: Literal["f16", "q8_0", "f32"] = Field("f16", description="KV cache type of keys")
    cache_type_v: Literal["f16", "q8_0", "f32"] = Field("f16", description="KV cache type of values (q8_0 needs flash attention)")
    # On this machine's CPU flash attention cut a ~1300-token page's encode from ~350 to ~150 ms
    # (docs/history.md, runs F vs D). Numerics only.
    flash_attn: bool = Field(True, description="flash attention in the text model and the vision encoder")
    # 8 keeps a GPU busy (2.6x the one-at-a-time loop's tokens/s on CPU, docs/history.md, run E) while the KV cache
    # stays modest: 8 x 8192 tokens is ~3.7 GB for a 7B Qwen2.5-VL (28 layers, 4 KV heads, f16). At
    # temperature 0 the answers equal n_parallel=1's.
    n_parallel: int = Field(8, ge=1, description="pages decoded together in one batch (n_ctx is then per page)")
    # Fewer tokens per page: faster encode and prefill, less detail (None = the model's default, e.g. 8 to
    # 4096 for Qwen-VL).
    image_min_tokens: Optional[int] = Field(None, ge=1, description="vision encoder: at least this many tokens per page")
    image_max_tokens: Optional[int] = Field(None, ge=1, description="vision encoder: at most this many tokens per page")
    # Faster at every parallelism on the GPU and on this 2-core CPU too (docs/benchmarks.md). Same answers.
    overlap_encode: bool = Field(True, description="encode the next pages' images on a second thread while the batch decodes")
    # On a GPU one encoder thread caps the engine at ~1.7 pages/s for a 7B Qwen2.5-VL page (measured on an H200): several
    # contexts encode in parallel on the same device, each holding its own copy of the projector weights (~1.3 GB
    # for a 7B Qwen2.5-VL mmproj in f16). None = 1 on a CPU build or with no layer offloaded, else 2.
    encode_workers: Optional[int] = Field(None, ge=1, description="vision-encoder contexts encoding pages in parallel "
                                          "(with overlap_encode; default 1 on CPU, 2 on a GPU)")
    # A page entering the batch would otherwise stop every page in flight for its whole image prefill (~0.23 s for
    # a 7B Qwen2.5-VL page on an H200); sliced, each pause is one n_batch slice. Same answers (tests compare).
    interleave_prefill: bool = Field(True, description="prefill a new page's image n_batch tokens at a time between "
                                     "decode steps of the pages in flight")
    # A native crash (GGML_ABORT, a segfault) becomes an engine_crash error row for the page that caused it
    # instead of killing the worker with every page in flight. Costs a pipe transfer of each page's pixels.
    isolate: bool = Field(True, description="run llama.cpp in a supervised child process (a native crash costs one page)")
    # Enforced by the isolated engine's supervisor (isolate on): a child silent this long with pages in flight is
    # ended; the page that hangs again alone becomes a `timeout` error row.
    page_timeout: Optional[float] = Field(None, gt=0, description="seconds without an answer before a page counts as "
                                          "hung (default: 120 + 2 per max token)")


@dataclass(frozen=True, config=STRICT)
class ModelFiles:
    """The two local GGUF files of a vision-language model."""

    model_path: str
    mmproj_path: str


# Bases in this order put the two paths first: ``EngineConfig(model, mmproj, n_ctx=...)``.
@dataclass(frozen=True, kw_only=True, config=STRICT)
class EngineConfig(EngineOptions, ModelFiles):
    """Where the model is (local files) and how llama.cpp runs it."""

    # A Jinja chat template that replaces the text GGUF's own (for a GGUF that has none); its text.
    chat_template: Optional[str] = None

    @classmethod
    def of(cls, model_path: str, mmproj_path: str, options: EngineOptions, chat_template: str | None = None) -> "EngineConfig":
        """The config for these model files under ``options``.

        Args:
            model_path: local text GGUF.
            mmproj_path: local vision projector GGUF.
            options: the run's engine options.
            chat_template: a Jinja chat template replacing the model's own.

        Returns:
            The engine config.
        """
        return cls(model_path=model_path, mmproj_path=mmproj_path, chat_template=chat_template, **asdict(options))

    def replace(self, **changes: Any) -> "EngineConfig":
        """A copy with ``changes`` applied (validated again).

        Args:
            changes: field name -> new value.

        Returns:
            The new config.
        """
        return EngineConfig(**{**asdict(self), **changes})


def params_json(generation: GenerationParams, images: ImageOptions, chat_format: str, engine: EngineOptions | None = None,
                chat_template: str | None = None) -> str:
    """Canonical JSON of everything (besides model, mmproj and prompt) that shapes a completion.

    Args:
        generation: the sampling parameters.
        images: the page image options (pixel budget and PDF resolution shape the pixels the model sees).
        chat_format: the chat format the prompt is laid out with.
        engine: the engine options (their image token budget and KV cache type shape the answer when set).
        chat_template: a chat template that replaces the model's own (its hash is recorded).

    Returns:
        Compact JSON with sorted keys: the same parameters always give the same text.
    """
    payload = {
        "generation": generation.as_dict(),
        "chat_format": chat_format,
        "max_pixels": images.max_pixels,
        "pdf_dpi": images.pdf_dpi,
    }
    if engine is not None and (engine.image_min_tokens or engine.image_max_tokens):
        payload["image_tokens"] = [engine.image_min_tokens, engine.image_max_tokens]
    if engine is not None and (engine.cache_type_k, engine.cache_type_v) != ("f16", "f16"):
        payload["kv_cache"] = [engine.cache_type_k, engine.cache_type_v]
    if chat_template:
        payload["chat_template_sha256"] = hashlib.sha256(chat_template.encode("utf-8")).hexdigest()
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))
