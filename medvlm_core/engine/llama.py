"""The single-sequence llama.cpp engine: load a text GGUF + mmproj once, then answer images + prompt.

``VisionEngine`` separates setup (``start``: model weights, vision projector, chat handler) from the
per-request work (``generate``: one page, a document's pages in one prompt, or a text-only prompt), the way Ray
Data LLM processors and NeMo Curator stages do. One engine holds one llama.cpp context, which runs one sequence
at a time; ``generate`` holds ``lock`` so that threads may share an engine safely. ``BatchedEngine`` decodes
several requests over the same loaded model through the public accessors below (``llm``, ``chat_handler``,
``lock``, ``grammar_text``).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import threading
import time
from typing import Any, Iterable, Iterator, Sequence

from PIL import Image

from medvlm_core import errors
from medvlm_core.engine.encoding import context_overflow
from medvlm_core.engine.types import Engine, Generation, Page, RawPixels, Request, Result
from medvlm_core.errors import DocumentError, RunError, error_detail, short_message
from medvlm_core.inputs.images import to_data_uri
from medvlm_core.model.files import CHAT_HANDLERS
from medvlm_core.run.params import EngineConfig, GenerationParams

# llama.cpp's enum values (llama.h: llama_split_mode; ggml.h: ggml_type) for the options' names.
SPLIT_MODES = {"none": 0, "layer": 1, "row": 2}
KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}

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


def _pages(image: Page | Sequence[Page] | None) -> tuple[Page, ...]:
    """A request's images as a tuple, as ``Request.images`` gives them."""
    if image is None:
        return ()
    return tuple(image) if isinstance(image, (tuple, list)) else (image,)


def _data_uri(page: Page) -> str:
    """A page as the PNG data URI llama-cpp-python's handlers read (raw pixels made an image first)."""
    if isinstance(page, RawPixels):
        page = Image.frombytes("RGB", (page.width, page.height), bytes(page.data))
    return to_data_uri(page)


def _overflow(text: str, n_ctx: int, images: int) -> DocumentError:
    """The ``context_overflow`` of llama-cpp-python's "Prompt exceeds n_ctx: A > B" (A: the prompt up to the chunk
    that did not fit, so at least that many are needed; positions for M-RoPE models) or "Requested tokens (A)
    exceed context window of B"; without a number, n_ctx + 1."""
    match = re.search(r"(\d+) > \d+|\((\d+)\) exceed", text)
    needed = int(match.group(1) or match.group(2)) if match else n_ctx + 1
    return context_overflow(needed, n_ctx, images,
                            f"n_ctx={n_ctx}; counted up to the part that did not fit: at least that many")


class VisionEngine(Engine):
    """A loaded llama.cpp VLM. Create, ``start()`` once, then ``generate()`` (or ``generate_many``) per page."""

    def __init__(self, config: EngineConfig, chat_format: str, verbose: bool = False, log_phi: bool = False):
        """
        Args:
            config: the model files and llama.cpp settings.
            chat_format: one of ``medvlm_core.model.files.CHAT_FORMATS``.
            verbose: let llama.cpp log to stderr.
            log_phi: the ``MEDVLM_LOG_PHI`` debug setting (llama.cpp's text in error messages).
        """
        if chat_format not in CHAT_HANDLERS:
            raise RunError(f"unknown chat format {chat_format!r}; known: {', '.join(CHAT_HANDLERS)}")
        self.config = config
        self.chat_format = chat_format
        self.verbose = verbose
        self.log_phi = log_phi
        # Held by whatever uses the model (this engine's generate, a BatchedEngine's generate_many): one
        # llama.cpp model in use at a time in this process.
        self.lock = threading.Lock()
        self.load_seconds = 0.0
        self._llm: Any = None
        self._gbnf: dict[str, str] = {}

    @property
    def loaded(self) -> bool:
        """True between ``start()`` and ``close()``."""
        return self._llm is not None

    @property
    def llm(self) -> Any:
        """The loaded ``llama_cpp.Llama`` (RunError before ``start()``)."""
        if self._llm is None:
            raise RunError("engine is not loaded; call start() first")
        return self._llm

    @property
    def chat_handler(self) -> Any:
        """The llama-cpp-python multimodal chat handler of the loaded model."""
        return self.llm.chat_handler

    def start(self) -> "VisionEngine":
        """Load weights and the vision projector (idempotent).

        Returns:
            The engine itself.

        Raises:
            RunError: with a clear message when a file is missing or llama.cpp refuses it.
        """
        if self._llm is not None:
            return self
        for path in (self.config.model_path, self.config.mmproj_path):
            if not os.path.isfile(path):
                raise RunError(f"{path}: model file not found")
        started = time.perf_counter()
        import llama_cpp
        from llama_cpp import llama_chat_format

        _quiet_native_logs()
        handler_cls = getattr(llama_chat_format, CHAT_HANDLERS[self.chat_format])
        try:
            handler = handler_cls(clip_model_path=self.config.mmproj_path, verbose=self.verbose)
            if self.config.image_min_tokens or self.config.image_max_tokens:
                handler._mtmd_cpp = _ImageTokenBudget(
                    handler._mtmd_cpp, self.config.image_min_tokens, self.config.image_max_tokens
                )
            config = self.config
            kwargs: dict[str, Any] = dict(
                model_path=config.model_path,
                chat_handler=handler,
                n_ctx=config.n_ctx,
                n_batch=config.n_batch,
                n_ubatch=config.n_ubatch or config.n_batch,
                n_gpu_layers=config.n_gpu_layers,
                main_gpu=config.main_gpu,
                split_mode=SPLIT_MODES[config.split_mode],
                tensor_split=list(config.tensor_split) if config.tensor_split else None,
                use_mmap=config.use_mmap,
                use_mlock=config.use_mlock,
                flash_attn=config.flash_attn,
                type_k=KV_TYPES[config.cache_type_k],
                type_v=KV_TYPES[config.cache_type_v],
                verbose=self.verbose,
            )
            if config.n_threads:
                kwargs["n_threads"] = config.n_threads
            if config.n_threads_batch or config.n_threads:
                kwargs["n_threads_batch"] = config.n_threads_batch or config.n_threads
            llm = llama_cpp.Llama(**kwargs)
            if config.chat_template:
                # The MTMD handler (and the batched engine's prompt rendering) read the template from here.
                llm.metadata["tokenizer.chat_template"] = config.chat_template
        except (ValueError, RuntimeError, OSError) as exc:
            # Loading sees no document, so llama-cpp-python's text (file paths, reasons) carries no PHI.
            hint = ""
            if (self.config.cache_type_k, self.config.cache_type_v) != ("f16", "f16"):
                hint = (" (a quantized KV cache needs the model's attention head size to be a multiple of 32, and a "
                        "quantized value cache needs flash attention)")
            raise RunError(f"llama.cpp could not load {self.config.model_path}: {short_message(exc)}{hint}") from None
        self._llm = llm
        self.load_seconds = time.perf_counter() - started
        return self

    def generate(
        self, image: Page | Sequence[Page] | None, prompt: str, params: GenerationParams,
        schema: dict[str, Any] | None = None, system: str | None = None,
    ) -> Generation:
        """Answer ``prompt`` about ``image`` (one page, a document's pages or none) through llama-cpp-python's own
        chat completion.

        The reference path: runs use ``BatchedEngine`` (one sequence or several), whose answers the tests
        compare with this one. It passes what ``create_chat_completion`` takes; it does not separate reasoning,
        and ``repeat_last_n``, ``min_keep`` and dynamic temperature keep llama-cpp-python's defaults. The user
        message holds one ``image_url`` part per page, in order, then the text.

        Args:
            image: the page, the pages in order (a tuple or list), or None for a text-only prompt.
            prompt: the question.
            params: sampling parameters.
            schema: a JSON schema the answer is constrained to, or None for free text.
            system: the system prompt (None: the chat format's default).

        Returns:
            The completion. Its ``prompt_tokens`` is llama-cpp-python's count: for M-RoPE models (Qwen-VL) the
            prompt's positions, fewer than its tokens.

        Raises:
            DocumentError: ``inference_error`` or ``context_overflow`` for this request.
        """
        llm = self.llm
        pages = _pages(image)
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": _data_uri(p)}} for p in pages]
        messages = [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        bias = dict(params.logit_bias)
        bias.update({token: float("-inf") for token in params.banned_tokens})
        grammar = self.grammar(schema) if schema is not None else None
        with self.lock:
            started = time.perf_counter()
            try:
                response = llm.create_chat_completion(
                    grammar=grammar,
                    messages=messages,
                    max_tokens=None if params.max_tokens == -1 else params.max_tokens,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    top_k=params.top_k,
                    min_p=params.min_p,
                    repeat_penalty=params.repeat_penalty,
                    frequency_penalty=params.frequency_penalty,
                    presence_penalty=params.presence_penalty,
                    typical_p=params.typical_p,
                    mirostat_mode=params.mirostat,
                    mirostat_tau=params.mirostat_tau,
                    mirostat_eta=params.mirostat_eta,
                    logit_bias=bias or None,
                    seed=params.seed,
                    stop=list(params.stop) or None,
                )
            except ValueError as exc:
                # llama-cpp-python's wordings: "Prompt exceeds n_ctx" (multimodal), "exceed context window".
                if "n_ctx" in str(exc) or "context window" in str(exc):
                    raise _overflow(str(exc), llm.n_ctx(), len(pages)) from None
                raise DocumentError(errors.INFERENCE_ERROR, f"llama.cpp rejected the request{error_detail(exc, self.log_phi)}") from None
            except Exception as exc:  # a native error surfaces as many types; the run must go on
                raise DocumentError(errors.INFERENCE_ERROR, f"llama.cpp failed{error_detail(exc, self.log_phi)}") from None
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

    def generate_many(self, requests: Iterable[Request]) -> Iterator[tuple[Any, Result]]:
        """Answer requests one after another, in order, through ``generate`` (the reference path).

        Args:
            requests: the requests (each with its images), taken one at a time.

        Returns:
            An iterator of ``(key, Generation or DocumentError)``.
        """
        for request in requests:
            try:
                yield request.key, self.generate(request.images, request.prompt, request.params, request.schema,
                                                 request.system)
            except DocumentError as exc:
                yield request.key, exc

    def grammar_text(self, schema: dict[str, Any]) -> str:
        """The GBNF grammar that constrains an answer to ``schema`` (built once per schema).

        Args:
            schema: a JSON schema; its property order is the order the model writes the fields in.

        Returns:
            The grammar's text, root rule ``root``.
        """
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        key = json.dumps(schema, sort_keys=True)
        gbnf = self._gbnf.get(key)
        if gbnf is None:
            gbnf = self._gbnf[key] = json_schema_to_gbnf(json.dumps(schema))
        return gbnf

    def grammar(self, schema: dict[str, Any]) -> Any:
        """A llama.cpp grammar object for ``schema``, for ``create_chat_completion``.

        Args:
            schema: a JSON schema.

        Returns:
            A ``llama_cpp.LlamaGrammar``.
        """
        from llama_cpp import LlamaGrammar

        return LlamaGrammar.from_string(self.grammar_text(schema), verbose=self.verbose)

    def close(self) -> None:
        """Free the model (explicitly: ``Llama.__del__`` at interpreter exit can raise)."""
        with self.lock:
            if self._llm is not None:
                self._llm.close()
                self._llm = None
