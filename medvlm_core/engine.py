"""The llama.cpp vision-language engine: load a text GGUF + mmproj once, then answer image + prompt.

``VisionEngine`` separates setup (``load``: model weights, vision projector, chat handler) from the
per-page work (``generate``), the way Ray Data LLM processors and NeMo Curator stages do. One engine holds
one llama.cpp context, which runs one sequence at a time; ``generate`` is serialised with a lock so that
threads may share an engine safely.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from PIL import Image

from medvlm_core import errors
from medvlm_core.config import EngineConfig, GenerationParams, Settings
from medvlm_core.errors import DocumentError, RunError
from medvlm_core.images import to_data_uri

# chat format -> llama_cpp.llama_chat_format class name
_HANDLER_CLASSES = {
    "llava-1-5": "Llava15ChatHandler",
    "llava-1-6": "Llava16ChatHandler",
    "qwen2.5-vl": "Qwen25VLChatHandler",
    "minicpm-v-2.6": "MiniCPMv26ChatHandler",
    "moondream2": "MoondreamChatHandler",
    "nanollava": "NanoLlavaChatHandler",
    "llama-3-vision-alpha": "Llama3VisionAlphaChatHandler",
    "obsidian": "ObsidianChatHandler",
    "mtmd": "MTMDChatHandler",
}


@dataclass(frozen=True)
class Generation:
    """One completion and what it cost."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    # Vision encoder time for the page where the engine measures it apart (the batched engine); else 0.0.
    encode_ms: float = 0.0


def _quiet_native_logs() -> None:
    """Route libmtmd's logging through llama-cpp-python's logger (errors only unless verbose)."""
    import llama_cpp._logger as llama_logger
    import llama_cpp.mtmd_cpp as mtmd_cpp

    mtmd_cpp.mtmd_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))


class _ImageTokenBudget:
    """libmtmd's module as the chat handlers see it, with the image token budget in its context defaults.

    The handlers build their mtmd context from ``mtmd_context_params_default()`` and expose no way to set
    ``image_min_tokens`` / ``image_max_tokens``; handing them this proxy sets both without copying their code.
    """

    def __init__(self, module: Any, min_tokens: int | None, max_tokens: int | None):
        self._module, self._min, self._max = module, min_tokens, max_tokens

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def mtmd_context_params_default(self) -> Any:
        params = self._module.mtmd_context_params_default()
        if self._min:
            params.image_min_tokens = self._min
        if self._max:
            params.image_max_tokens = self._max
        return params


class VisionEngine:
    """A loaded llama.cpp VLM. Create, ``load()`` once, then ``generate()`` for every page."""

    def __init__(self, config: EngineConfig, chat_format: str, verbose: bool = False):
        if chat_format not in _HANDLER_CLASSES:
            raise RunError(f"unknown chat format {chat_format!r}; known: {', '.join(_HANDLER_CLASSES)}")
        self.config = config
        self.chat_format = chat_format
        self.verbose = verbose
        self._llm: Any = None
        self._lock = threading.Lock()
        self._gbnf: dict[str, str] = {}
        self.load_seconds = 0.0

    @property
    def loaded(self) -> bool:
        """True between ``load()`` and ``close()``."""
        return self._llm is not None

    def load(self) -> "VisionEngine":
        """Load weights and the vision projector. RunError with a clear message if llama.cpp refuses them."""
        if self._llm is not None:
            return self
        for path in (self.config.model_path, self.config.mmproj_path):
            if not os.path.isfile(path):
                raise RunError(f"{path}: model file not found")
        started = time.perf_counter()
        import llama_cpp
        from llama_cpp import llama_chat_format

        _quiet_native_logs()
        handler_cls = getattr(llama_chat_format, _HANDLER_CLASSES[self.chat_format])
        try:
            handler = handler_cls(clip_model_path=self.config.mmproj_path, verbose=self.verbose)
            if self.config.image_min_tokens or self.config.image_max_tokens:
                handler._mtmd_cpp = _ImageTokenBudget(
                    handler._mtmd_cpp, self.config.image_min_tokens, self.config.image_max_tokens
                )
            kwargs: dict[str, Any] = dict(
                model_path=self.config.model_path,
                chat_handler=handler,
                n_ctx=self.config.n_ctx,
                n_batch=self.config.n_batch,
                n_ubatch=self.config.n_batch,
                n_gpu_layers=self.config.n_gpu_layers,
                flash_attn=self.config.flash_attn,
                verbose=self.verbose,
            )
            if self.config.n_threads:
                kwargs["n_threads"] = self.config.n_threads
                kwargs["n_threads_batch"] = self.config.n_threads
            llm = llama_cpp.Llama(**kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            raise RunError(f"llama.cpp could not load {self.config.model_path}: {_short(exc)}") from None
        self._llm = llm
        self.load_seconds = time.perf_counter() - started
        return self

    def generate(
        self, image: Image.Image, prompt: str, params: GenerationParams, schema: dict[str, Any] | None = None
    ) -> Generation:
        """Answer ``prompt`` about ``image``; with ``schema``, the answer is JSON constrained to it.

        DocumentError (inference_error / context_overflow) on failure.
        """
        if self._llm is None:
            raise RunError("engine is not loaded; call load() first")
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": to_data_uri(image)}},
                    {"type": "text", "text": prompt},
                ],
            }
        ]
        grammar = self._grammar(schema) if schema is not None else None
        with self._lock:
            started = time.perf_counter()
            try:
                response = self._llm.create_chat_completion(
                    grammar=grammar,
                    messages=messages,
                    max_tokens=params.max_tokens,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    top_k=params.top_k,
                    min_p=params.min_p,
                    repeat_penalty=params.repeat_penalty,
                    seed=params.seed,
                    stop=list(params.stop) or None,
                )
            except ValueError as exc:
                # llama-cpp-python's wordings: "Prompt exceeds n_ctx" (multimodal), "exceed context window".
                if "n_ctx" in str(exc) or "context window" in str(exc):
                    raise DocumentError(
                        errors.CONTEXT_OVERFLOW,
                        f"image and prompt do not fit in n_ctx={self.config.n_ctx}; raise --n-ctx or lower the pixel budget",
                    ) from None
                raise DocumentError(errors.INFERENCE_ERROR, f"llama.cpp rejected the request{error_detail(exc)}") from None
            except Exception as exc:  # a native error surfaces as many types; the run must go on
                raise DocumentError(errors.INFERENCE_ERROR, f"llama.cpp failed{error_detail(exc)}") from None
            latency_ms = (time.perf_counter() - started) * 1000.0
        choice = response["choices"][0]
        usage = response.get("usage") or {}
        return Generation(
            text=choice["message"].get("content") or "",
            finish_reason=choice.get("finish_reason") or "stop",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            latency_ms=latency_ms,
        )

    def _grammar(self, schema: dict[str, Any]) -> Any:
        """A llama.cpp grammar for ``schema`` (the GBNF text is built once per schema)."""
        import json

        from llama_cpp import LlamaGrammar
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        key = json.dumps(schema, sort_keys=True)
        gbnf = self._gbnf.get(key)
        if gbnf is None:
            # The schema's own property order is the order the model writes the fields in.
            gbnf = self._gbnf[key] = json_schema_to_gbnf(json.dumps(schema))
        return LlamaGrammar.from_string(gbnf, verbose=self.verbose)

    def close(self) -> None:
        """Free the model (explicitly: ``Llama.__del__`` at interpreter exit can raise)."""
        with self._lock:
            if self._llm is not None:
                self._llm.close()
                self._llm = None


def error_detail(exc: BaseException) -> str:
    """`` (Type)`` for an error message; `` (Type: first line)`` only under MEDVLM_LOG_PHI, because llama.cpp's
    text can echo the prompt, the document or the output."""
    if Settings.from_env().log_phi:
        return f" ({type(exc).__name__}: {_short(exc)})"
    return f" ({type(exc).__name__})"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


_SHARED: dict[tuple, VisionEngine] = {}
_SHARED_LOCK = threading.Lock()
_BATCHED: dict[tuple, Any] = {}
_ISOLATED: dict[tuple, Any] = {}
_GAVE_UP: dict[tuple, str] = {}  # configs whose isolated engine kept crashing: not restarted in this process


def _close_all_locked() -> None:
    for runner in (*_BATCHED.values(), *_ISOLATED.values(), *_SHARED.values()):
        runner.close()
    _BATCHED.clear()
    _ISOLATED.clear()
    _SHARED.clear()


def shared_engine(config: EngineConfig, chat_format: str) -> VisionEngine:
    """The process-wide engine for this config, loaded on first use and reused after (one load per process).

    A worker process running many chunks (or many flow runs in one process) loads the model once.
    Loading another config closes the previous engine first, so two models never sit in memory at once.
    """
    key = (config, chat_format)
    with _SHARED_LOCK:
        engine = _SHARED.get(key)
        if engine is not None and engine.loaded:
            return engine
        _close_all_locked()
        engine = VisionEngine(config, chat_format).load()
        _SHARED[key] = engine
        return engine


def shared_batched_engine(config: EngineConfig, chat_format: str) -> Any:
    """The process-wide BatchedEngine (``config.n_parallel`` sequences) over the shared engine."""
    from medvlm_core.batched import BatchedEngine

    engine = shared_engine(config, chat_format)
    key = (config, chat_format)
    with _SHARED_LOCK:
        batched = _BATCHED.get(key)
        if batched is None or batched.engine is not engine:
            for other in _BATCHED.values():
                other.close()
            _BATCHED.clear()
            batched = _BATCHED[key] = BatchedEngine(
                engine, n_seq=config.n_parallel, ctx_per_seq=config.n_ctx, overlap=config.overlap_encode
            )
        return batched


def shared_isolated_engine(config: EngineConfig, chat_format: str) -> Any:
    """The process-wide IsolatedEngine for this config: its child process loads the model once and is
    reused by every chunk; this process never loads the model itself.

    An isolated engine that gave up (the child kept crashing) is not replaced: later calls raise the same
    RunError, so a broken model or machine fails the run instead of crash-looping chunk after chunk.
    """
    from medvlm_core.isolated import IsolatedEngine

    key = (config, chat_format)
    with _SHARED_LOCK:
        if key in _GAVE_UP:
            raise RunError(_GAVE_UP[key])
        isolated = _ISOLATED.get(key)
        if isolated is not None and isolated.loaded:
            return isolated
        if isolated is not None and isolated.gave_up:
            _GAVE_UP[key] = isolated.gave_up
            raise RunError(isolated.gave_up)
        _close_all_locked()
        isolated = _ISOLATED[key] = IsolatedEngine(config, chat_format).start()
        return isolated


def shared_runner(config: EngineConfig, chat_format: str) -> tuple[VisionEngine | None, Any]:
    """What answers pages in this process, as ``(engine, batched)`` for ``pipeline.process_rows``:
    ``(None, IsolatedEngine)`` with ``config.isolate``, else the in-process engine and, with
    ``n_parallel > 1``, its BatchedEngine (else None: one page at a time through the engine)."""
    if config.isolate:
        return None, shared_isolated_engine(config, chat_format)
    engine = shared_engine(config, chat_format)
    return engine, shared_batched_engine(config, chat_format) if config.n_parallel > 1 else None


def close_shared_engines() -> None:
    """Close every shared engine (tests, process shutdown)."""
    with _SHARED_LOCK:
        _close_all_locked()


# Free models before interpreter teardown: Llama.__del__ during shutdown raises (its ctypes are gone).
atexit.register(close_shared_engines)
