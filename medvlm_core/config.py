"""Typed configuration: the knobs of a run, each defined once, with its default, limits and help text.

Every knob that changes a completion lives in ``GenerationParams``, ``ImageOptions`` or the output-relevant
part of ``EngineOptions``; ``params_json`` (stored on every result row) is built from exactly those, so a
row says which parameters produced it and the result key changes when any of them does.

These are pydantic dataclasses: validated on construction (a bad value is a clear error naming the knob),
hashable (the process-wide engine registry keys on them) and plain enough to pickle to the isolated child.
``medvlm_core.options.RunOptions`` composes them with the run's prompt, model, storage, output and policy
options; the CLI flags and the flows' parameters are derived from those definitions, so a new knob is one
field here (plus the code that uses it).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, Optional, Tuple

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

# Unknown keys are errors, not silently dropped (a misspelt knob must not be ignored).
STRICT = ConfigDict(extra="forbid")


@dataclass(frozen=True, kw_only=True, config=STRICT)
class GenerationParams:
    """Sampling parameters. Defaults suit a clinical batch job: greedy (temperature 0), fixed seed."""

    max_tokens: int = Field(512, ge=1, description="most tokens generated per page")
    temperature: float = Field(0.0, ge=0, description="sampling temperature; 0 = greedy, the same answer every time")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling: smallest token set with this probability")
    top_k: int = Field(40, ge=0, description="sample among the k most likely tokens (0 = all)")
    min_p: float = Field(0.05, ge=0, le=1, description="drop tokens below this fraction of the top token's probability")
    # 1.0 = no penalty: medication lists legitimately repeat tokens (units, routes, frequencies).
    repeat_penalty: float = Field(1.0, gt=0, description="penalty on recently generated tokens (1.0 = none)")
    seed: int = Field(0, description="sampling seed")
    stop: Tuple[str, ...] = Field((), description="stop string (repeatable); generation ends before it")

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (stop as a list) for JSON.

        Returns:
            Field name -> value.
        """
        d = asdict(self)
        d["stop"] = list(self.stop)
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

    # None = pick from the mmproj's projector type / the model's metadata (see medvlm_core.models).
    chat_format: Optional[str] = Field(None, description="override the chat format picked from the model")
    n_ctx: int = Field(8192, ge=256, description="context tokens per page (image + prompt + answer)")
    # -1 = offload every layer when llama.cpp was built with a GPU backend; ignored by CPU builds.
    n_gpu_layers: int = Field(-1, description="layers offloaded to the GPU (-1 = all)")
    n_threads: Optional[int] = Field(None, ge=1, description="CPU threads (default: llama.cpp's choice)")
    n_batch: int = Field(512, ge=1, description="tokens per llama.cpp decode call during prefill")
    # On this machine's CPU flash attention cut a ~1300-token page's encode from ~350 to ~150 ms
    # (BENCHMARKS.md F vs D). Numerics only.
    flash_attn: bool = Field(True, description="flash attention in the text model and the vision encoder")
    # 8 keeps a GPU busy (2.6x the one-at-a-time loop's tokens/s on CPU, BENCHMARKS.md E) while the KV cache
    # stays modest: 8 x 8192 tokens is ~3.7 GB for a 7B Qwen2.5-VL (28 layers, 4 KV heads, f16). At
    # temperature 0 the answers equal n_parallel=1's.
    n_parallel: int = Field(8, ge=1, description="pages decoded together in one batch (n_ctx is then per page)")
    # Fewer tokens per page: faster encode and prefill, less detail (None = the model's default, e.g. 8 to
    # 4096 for Qwen-VL).
    image_min_tokens: Optional[int] = Field(None, ge=1, description="vision encoder: at least this many tokens per page")
    image_max_tokens: Optional[int] = Field(None, ge=1, description="vision encoder: at most this many tokens per page")
    # Faster at every parallelism on the GPU and on this 2-core CPU too (BENCHMARKS.md). Same answers.
    overlap_encode: bool = Field(True, description="encode the next pages' images on a second thread while the batch decodes")
    # A native crash (GGML_ABORT, a segfault) becomes an engine_crash error row for the page that caused it
    # instead of killing the worker with every page in flight. Costs a pipe transfer of each page's pixels.
    isolate: bool = Field(True, description="run llama.cpp in a supervised child process (a native crash costs one page)")


@dataclass(frozen=True, config=STRICT)
class ModelFiles:
    """The two local GGUF files of a vision-language model."""

    model_path: str
    mmproj_path: str


# Bases in this order put the two paths first: ``EngineConfig(model, mmproj, n_ctx=...)``.
@dataclass(frozen=True, kw_only=True, config=STRICT)
class EngineConfig(EngineOptions, ModelFiles):
    """Where the model is (local files) and how llama.cpp runs it."""

    @classmethod
    def of(cls, model_path: str, mmproj_path: str, options: EngineOptions) -> "EngineConfig":
        """The config for these model files under ``options``.

        Args:
            model_path: local text GGUF.
            mmproj_path: local vision projector GGUF.
            options: the run's engine options.

        Returns:
            The engine config.
        """
        return cls(model_path=model_path, mmproj_path=mmproj_path, **asdict(options))

    def replace(self, **changes: Any) -> "EngineConfig":
        """A copy with ``changes`` applied (validated again).

        Args:
            changes: field name -> new value.

        Returns:
            The new config.
        """
        return EngineConfig(**{**asdict(self), **changes})


def params_json(generation: GenerationParams, images: ImageOptions, chat_format: str, engine: EngineOptions | None = None) -> str:
    """Canonical JSON of everything (besides model, mmproj and prompt) that shapes a completion.

    Args:
        generation: the sampling parameters.
        images: the page image options (pixel budget and PDF resolution shape the pixels the model sees).
        chat_format: the chat format the prompt is laid out with.
        engine: the engine options (their image token budget shapes the answer when set).

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
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))
