"""Typed configuration: generation parameters, image limits, engine settings and environment settings.

Every knob that changes a completion lives in ``GenerationParams``, ``ImageOptions`` or the output-relevant
part of ``EngineConfig``; ``params_json`` (stored on every result row) is built from exactly those, so a
row says which parameters produced it and the result key changes when any of them does.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from medvlm_core.errors import RunError


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters. Defaults suit a clinical batch job: greedy (temperature 0), fixed seed."""

    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    # 1.0 = no penalty: medication lists legitimately repeat tokens (units, routes, frequencies).
    repeat_penalty: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise RunError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise RunError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RunError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RunError(f"top_k must be >= 0, got {self.top_k}")
        # Accept lists from JSON/CLI but keep the dataclass hashable.
        object.__setattr__(self, "stop", tuple(self.stop))

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (stop as a list) for JSON."""
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


@dataclass(frozen=True)
class ImageOptions:
    """How document files become model-ready page images, and the safety limits applied on the way."""

    # Pixel budget of the image handed to the model (downscaled to fit, aspect kept). 1.6 MP keeps a
    # letter page at ~130 dpi: small print stays legible, and Qwen-VL-style encoders stay near 2k tokens.
    max_pixels: int = 1_600_000
    # Limits against hostile or broken input (exceeding one is a ``too_large`` error row).
    max_bytes: int = 64 * 1024 * 1024
    max_source_pixels: int = 120_000_000
    max_pages: int = 500
    pdf_dpi: int = 150

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise RunError(f"{f.name} must be >= 1, got {getattr(self, f.name)}")


@dataclass(frozen=True)
class EngineConfig:
    """Where the model is and how llama.cpp runs it."""

    model_path: str
    mmproj_path: str
    # None = pick from the mmproj's projector type / the model's metadata (see medvlm_core.models).
    chat_format: str | None = None
    n_ctx: int = 8192
    # -1 = offload every layer when llama.cpp was built with a GPU backend; ignored by CPU builds.
    n_gpu_layers: int = -1
    n_threads: int | None = None
    n_batch: int = 512
    # Flash attention in the text model and the vision encoder (llama-server's default too): on this
    # machine's CPU it cut a ~1300-token page's encode from ~350 to ~150 ms (BENCHMARKS.md F vs D).
    # Numerics only.
    flash_attn: bool = True
    # Pages decoded together in one batch (medvlm_core.batched), each with its own n_ctx-token KV stream.
    # 8 keeps a GPU busy (2.6x the one-at-a-time loop's tokens/s on CPU, BENCHMARKS.md E) while the KV
    # cache stays modest: 8 x 8192 tokens is ~3.7 GB for a 7B Qwen2.5-VL (28 layers, 4 KV heads, f16).
    # At temperature 0 the answers equal n_parallel=1's.
    n_parallel: int = 8
    # Image token budget of the vision encoder (libmtmd; None = the model's default, e.g. 8 to 4096 for
    # Qwen-VL). Fewer tokens per page: faster encode and prefill, less detail.
    image_min_tokens: int | None = None
    image_max_tokens: int | None = None
    # Encode the next pages' images on a second thread while the batch decodes (n_parallel > 1). On by
    # default: it was faster at every parallelism on the GPU and on this 2-core CPU too (BENCHMARKS.md).
    # Does not change answers.
    overlap_encode: bool = True
    # Run llama.cpp in a supervised child process (medvlm_core.isolated): a native crash (GGML_ABORT, a
    # segfault) becomes an engine_crash error row for the page that caused it instead of killing the worker
    # with every page in flight. Costs a pipe transfer of each page's pixels (~ms). Does not change answers.
    isolate: bool = True

    def __post_init__(self) -> None:
        if self.n_parallel < 1:
            raise RunError(f"n_parallel must be >= 1, got {self.n_parallel}")
        if self.n_ctx < 256:
            raise RunError(f"n_ctx must be >= 256, got {self.n_ctx}")
        if self.n_batch < 1:
            raise RunError(f"n_batch must be >= 1, got {self.n_batch}")


def params_json(generation: GenerationParams, images: ImageOptions, chat_format: str, engine: "EngineConfig | None" = None) -> str:
    """Canonical JSON of everything (besides model, mmproj and prompt) that shapes a completion."""
    payload = {
        "generation": generation.as_dict(),
        "chat_format": chat_format,
        "max_pixels": images.max_pixels,
        "pdf_dpi": images.pdf_dpi,
    }
    if engine is not None and (engine.image_min_tokens or engine.image_max_tokens):
        payload["image_tokens"] = [engine.image_min_tokens, engine.image_max_tokens]
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))


def _env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    """Process-wide settings read from ``MEDVLM_*`` environment variables (one place, like prefect-aws)."""

    # Local cache for downloaded models and file hashes.
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "medvlm")
    # Manifest rows per Prefect inference task: large enough to amortise task overhead, small enough
    # that a failed task loses little work and the UI stays readable for 100k-row manifests.
    chunk_size: int = 32
    # Debug switch: when true, inference error messages include llama.cpp's exception text, which can
    # echo prompt or document content into error rows and logs. Off by default; see README ("PHI and logs").
    log_phi: bool = False

    def chunk_rows(self, n_parallel: int = 1) -> int:
        """Rows per inference task for a run decoding ``n_parallel`` pages together: at least 8 batches'
        worth, because each task's batch drains at its end (its last pages decode with free slots)."""
        return max(self.chunk_size, 8 * n_parallel)

    @classmethod
    def from_env(cls) -> "Settings":
        """Read MEDVLM_CACHE_DIR, MEDVLM_CHUNK_SIZE, MEDVLM_LOG_PHI."""
        cache = os.environ.get("MEDVLM_CACHE_DIR")
        chunk = os.environ.get("MEDVLM_CHUNK_SIZE")
        return cls(
            cache_dir=Path(cache).expanduser() if cache else cls().cache_dir,
            chunk_size=int(chunk) if chunk else cls.chunk_size,
            log_phi=_env_bool("MEDVLM_LOG_PHI"),
        )
