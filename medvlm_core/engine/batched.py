"""Batched multi-document decoding: several pages share one llama.cpp context, one token each per step.

``BatchedEngine`` keeps up to ``n_seq`` documents in flight. Each gets its own sequence (slot) in a second
llama.cpp context of the loaded model: its image and prompt are prefilled into that slot through libmtmd,
then every step decodes one token for every live sequence in a single ``llama_decode`` batch. A finished
sequence frees its slot (``llama_memory_seq_rm``) and the next document takes it (continuous refill).

Vision encoding is split from prefill: a page's image is encoded by libmtmd into embeddings (``_encode``),
and those embeddings are later decoded into a free slot (``_prefill``). With ``overlap`` on, encoding runs
on ``encode_workers`` threads a few pages ahead while the main thread decodes the batch, so the encoder (the
slowest stage on a GPU: ~0.4 s per 1656-token page on an H200) is off the decode's critical path. Each encoder
thread has its own libmtmd context (the handler's, plus copies of the projector); the decoding thread uses the
batched llama context. The embeddings are copied out of libmtmd's buffer before the next encode overwrites it.

The prompt is rendered exactly as the single-sequence chat handler renders it, and each sequence samples
with the same chain llama-cpp-python builds (penalties, grammar, greedy or top-k/typical/top-p/min-p/temp/
dist), so at temperature 0 a document's answer matches ``VisionEngine.generate`` (tests check this on the
generated models). Decoding several sequences in one batch can change floating-point results slightly on
some backends; where that flips a near-tie, the answers can differ (see BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import inspect
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Generator, Iterable, Iterator

import numpy as np

from medvlm_core import errors
from medvlm_core.run.params import GenerationParams
from medvlm_core.engine.llama import VisionEngine
from medvlm_core.engine.types import NOT_YET, NOT_YET_WAIT_S, Engine, Generation, RawPixels, Request, Result
from medvlm_core.errors import DocumentError, RunError
from medvlm_core.inputs.images import to_rgb
from medvlm_core.model.memory_plan import encode_workers_for
from medvlm_core.threads import put_unless_stopped

_SENTINEL = "\x00medvlm-image\x00"


@dataclass
class _Encoded:
    """A request whose image is encoded: libmtmd's chunks plus a copy of each media chunk's embeddings."""

    request: Request
    chunks: Any  # mtmd_input_chunks, owned: freed by BatchedEngine._release
    embeddings: list[Any]  # per chunk: a ctypes float array for media chunks, None for text chunks
    n_tokens: int
    encode_ms: float
    started: float
    opens_thinking: bool = False  # the rendered prompt ends with the think_open marker (Qwen3-style templates)


@dataclass
class _Failed:
    """A request that failed before prefill (a document error) or an exception from the request source."""

    request: Request | None
    error: BaseException


@dataclass
class _Filling:
    """The page being prefilled a slice at a time (``interleave_prefill``) while the others decode."""

    seq: int
    encoded: _Encoded
    steps: Generator[None, None, "_Slot"]
    longest_ms: float = 0.0  # the longest slice so far: the longest pause it made the others take


_END = object()  # the encoder thread has consumed every request
_NO_CALLBACK = None  # a NULL mtmd_helper_post_decode_callback, made on first use (needs llama_cpp loaded)


@dataclass
class _Slot:
    request: Request
    seq: int
    sampler: Any
    n_past: int
    prompt_tokens: int
    pending: int  # the token to feed at the next step
    pieces: bytearray
    generated: int
    started: float
    encode_ms: float = 0.0
    # Reasoning (see _think): in a thinking block now; it may still open (free text, nothing generated yet);
    # where in ``pieces`` the thinking text and the answer begin.
    thinking: bool = False
    may_open: bool = False
    think_start: int = 0
    think_end: int = 0
    answer_start: int = 0
    reasoning_tokens: int = 0
    budget_hit: bool = False
    forced: deque = field(default_factory=deque)  # tokens fed without sampling (the budget's closing marker)
    # per sampled token: (byte offset in pieces, logprob, top alternatives)
    scores: list = field(default_factory=list)


class BatchedEngine(Engine):
    """Continuous batching over a loaded ``VisionEngine`` (which keeps the weights and the vision projector).

    Ready when constructed (the model is the ``VisionEngine``'s); ``close()`` frees the batched context only.
    """

    def __init__(self, engine: VisionEngine, n_seq: int = 8, ctx_per_seq: int | None = None,
                 overlap: bool = True, encode_ahead: int | None = None, confidences: bool = True,
                 encode_workers: int | None = None, interleave_prefill: bool = True):
        """
        Args:
            engine: the loaded single-page engine whose model and vision projector are used.
            n_seq: pages decoded together.
            ctx_per_seq: KV cells per page (default: the engine's n_ctx), rounded up to 256.
            overlap: encode images on a second thread while the batch decodes (off: inline, one thread).
            encode_ahead: encoded pages waiting for a slot (default ``n_seq``); it bounds host memory to
                about ``encode_ahead`` pages of embeddings (~24 MB each for a 7B model at 1656 image tokens).
            confidences: score every answer token (log-probabilities); off only to measure what that costs.
            encode_workers: vision-encoder threads (with ``overlap``), each with its own libmtmd context on the
                same device (default: ``medvlm_core.model.memory_plan.encode_workers_for``).
            interleave_prefill: a new page's image embeddings go into its slot ``n_batch`` tokens at a time, with
                a decode step of the pages in flight between slices (off: the whole image at once, as libmtmd's
                helper does, while the others wait).
        """
        if not engine.loaded:
            raise RunError("load the VisionEngine before batching over it")
        if n_seq < 1:
            raise RunError(f"n_seq must be >= 1, got {n_seq}")
        import llama_cpp

        global _NO_CALLBACK
        if _NO_CALLBACK is None:
            import llama_cpp.mtmd_cpp as mtmd_cpp

            _NO_CALLBACK = mtmd_cpp.mtmd_helper_post_decode_callback()
        self._llama_cpp = llama_cpp
        self.engine = engine
        self.n_seq = n_seq
        self.overlap = overlap
        self.reads_ahead = overlap  # the encoder threads take the requests, while the batch decodes
        self.confidences = confidences
        self.encode_ahead = max(1, encode_ahead if encode_ahead is not None else n_seq)
        # llama.cpp sizes contexts in multiples of 256 cells: keep every slot the same, whole size.
        self.ctx_per_seq = -(-(ctx_per_seq or engine.config.n_ctx) // 256) * 256
        llm = engine.llm
        self._handler = llm.chat_handler
        self._handler._init_mtmd_context(llm)
        self._mtmd = self._handler._mtmd_cpp
        self._vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        self._n_embd_inp = llama_cpp.llama_model_n_embd_inp(llm._model.model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.ctx_per_seq * n_seq
        params.n_batch = engine.config.n_batch
        params.n_ubatch = engine.config.n_ubatch or engine.config.n_batch
        params.type_k = llm.context_params.type_k  # the KV cache type chosen for the model (EngineOptions)
        params.type_v = llm.context_params.type_v
        params.n_seq_max = n_seq
        params.flash_attn_type = llm.context_params.flash_attn_type  # same numerics as the single path
        # One KV stream per sequence: a step attends over each sequence's own cells, not over all
        # n_seq * ctx_per_seq of them (documents never share a prefix worth caching across sequences).
        params.kv_unified = False
        params.n_threads = llm.n_threads
        params.n_threads_batch = llm.n_threads_batch
        self._ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not self._ctx:
            raise RunError(f"llama.cpp could not create a context for {n_seq} sequences of {self.ctx_per_seq} tokens")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(n_seq, 0, 1)
        self.interleave_prefill = interleave_prefill
        self._embd_batch = None  # llama_batch_ext for image slices, made on first use
        # Per page admitted while others were decoding: the longest pause it caused them (ms). A measurement for the
        # benchmark (the whole prefill without interleaving, one slice with it); kept to the last 10,000 pages.
        self.admission_pauses_ms: deque = deque(maxlen=10_000)
        self._piece = ctypes.create_string_buffer(256)
        self._rendered: dict[str, str] = {}  # prompt -> rendered text: compiling the template costs ~ms per page
        workers = encode_workers if encode_workers is not None else encode_workers_for(engine.config)
        # The handler's context is the first encoder (and serves prefill); the others are extra copies.
        self._encoders = [self._handler.mtmd_ctx] + [self._new_mtmd_context() for _ in range(max(1, workers) - 1)]

    @property
    def loaded(self) -> bool:
        """True until ``close()``."""
        return bool(self._ctx)

    @property
    def load_seconds(self) -> float:
        """How long the model took to load (the ``VisionEngine``'s load)."""
        return self.engine.load_seconds

    def start(self) -> "BatchedEngine":
        """Nothing to do: the batched context is made on construction.

        Returns:
            The engine itself.

        Raises:
            RunError: after ``close()``.
        """
        if not self._ctx:
            raise RunError("the BatchedEngine was closed")
        return self

    @property
    def encode_workers(self) -> int:
        """How many vision-encoder contexts encode pages in parallel (with ``overlap``)."""
        return len(self._encoders)

    def _new_mtmd_context(self) -> Any:
        """Another libmtmd context of the same projector on the same device, set up as the handler's own."""
        lc, llm = self._llama_cpp, self.engine.llm
        params = self._mtmd.mtmd_context_params_default()  # with the image token budget, as the handler's
        params.use_gpu = getattr(self._handler, "use_gpu", True)
        params.print_timings = False
        params.n_threads = llm.n_threads
        enabled = llm.context_params.flash_attn_type == lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if enabled else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = self._mtmd.mtmd_init_from_file(self._handler.clip_model_path.encode(), llm._model.model, params)
        if not ctx:
            raise RunError(f"libmtmd could not open another encoder context for {self._handler.clip_model_path}")
        return ctx

    def close(self) -> None:
        """Free the batched context and the extra encoder contexts (the model stays loaded in the VisionEngine)."""
        for ctx in self._encoders[1:]:
            self._mtmd.mtmd_free(ctx)
        self._encoders = self._encoders[:1]
        if self._embd_batch is not None:
            self._llama_cpp.llama_batch_ext_free(self._embd_batch)
            self._embd_batch = None
        if self._ctx:
            self._llama_cpp.llama_batch_free(self._batch)
            self._llama_cpp.llama_free(self._ctx)
            self._ctx = None

    # -- prompt and sampling, exactly as the single-sequence handler does ------------------------
    def render_prompt(self, prompt: str, system: str | None = None) -> str:
        """The chat-formatted prompt text with libmtmd's media marker where the image goes (cached per prompt).

        Args:
            prompt: the user's question.
            system: the system prompt (None: the chat format's default, if it has one).

        Returns:
            The text libmtmd tokenizes.
        """
        key = (prompt, system)
        text = self._rendered.get(key)
        if text is None:
            if len(self._rendered) > 256:  # row-level prompts can be many: keep the cache small
                self._rendered.clear()
            text = self._rendered[key] = self._render(prompt, system)
        return text

    def _render(self, prompt: str, system: str | None) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from llama_cpp import llama_chat_format as lcf

        llm = self.engine.llm
        marker = self._mtmd.mtmd_default_marker().decode("utf-8")
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _SENTINEL}},
                                                 {"type": "text", "text": prompt}]}]
        if system:
            messages = [{"role": "system", "content": system}] + messages
        handler = self._handler
        if isinstance(handler, lcf.MTMDChatHandler):
            import jinja2.ext

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True,
                extensions=[lcf.Jinja2ChatFormatter.IgnoreGenerationTags, jinja2.ext.loopcontrols],
            )
            env.filters["tojson"] = lcf.Jinja2ChatFormatter.tojson

            def raise_exception(message: str):
                raise ValueError(message)

            return env.from_string(handler._get_chat_template(llm)).render(
                messages=handler._get_template_messages(messages, marker), add_generation_prompt=True,
                eos_token=handler._decode_token_piece(llm.detokenize([llm.token_eos()])),
                bos_token=handler._decode_token_piece(llm.detokenize([llm.token_bos()])),
                raise_exception=raise_exception, functions=None, function_call=None, tools=None, tool_choice=None,
                strftime_now=lcf.Jinja2ChatFormatter.strftime_now,
            )
        if handler.DEFAULT_SYSTEM_MESSAGE is not None and not system:
            messages = [{"role": "system", "content": handler.DEFAULT_SYSTEM_MESSAGE}] + messages
        text = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(handler.CHAT_FORMAT).render(
            messages=messages, add_generation_prompt=True,
            eos_token=llm.detokenize([llm.token_eos()]), bos_token=llm.detokenize([llm.token_bos()]),
        )
        return text.replace(_SENTINEL, marker)

    def _sampler(self, params: GenerationParams, schema: dict | None) -> Any:
        """The sampler chain for ``params``, as llama-cpp-python builds it for a completion: logit bias, penalties,
        grammar (``schema``), then greedy at temperature 0, else mirostat or top-k/typical/top-p/min-p, then
        (dynamic) temperature and a seeded draw."""
        lc = self._llama_cpp
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        add = lambda sampler: lc.llama_sampler_chain_add(chain, sampler)  # noqa: E731
        bias = dict(params.logit_bias)
        bias.update({token: float("-inf") for token in params.banned_tokens})
        if bias:
            entries = (lc.llama_logit_bias * len(bias))(*[lc.llama_logit_bias(t, b) for t, b in sorted(bias.items())])
            add(lc.llama_sampler_init_logit_bias(self._n_vocab, len(bias), entries))
        last_n = self.ctx_per_seq if params.repeat_last_n == -1 else params.repeat_last_n
        add(lc.llama_sampler_init_penalties(self._n_vocab, last_n, params.repeat_penalty, params.frequency_penalty,
                                            params.presence_penalty))
        if schema is not None:
            gbnf = self.engine.grammar_text(schema).encode("utf-8")
            add(lc.llama_sampler_init_grammar(self._vocab, gbnf, b"root"))
        if params.temperature == 0.0:
            add(lc.llama_sampler_init_greedy())
            return chain
        if params.mirostat:
            add(lc.llama_sampler_init_temp(params.temperature))
            if params.mirostat == 1:
                add(lc.llama_sampler_init_mirostat(self._n_vocab, params.seed, params.mirostat_tau, params.mirostat_eta, 100))
            else:
                add(lc.llama_sampler_init_mirostat_v2(params.seed, params.mirostat_tau, params.mirostat_eta))
            return chain
        add(lc.llama_sampler_init_top_k(params.top_k))
        add(lc.llama_sampler_init_typical(params.typical_p, params.min_keep))
        add(lc.llama_sampler_init_top_p(params.top_p, params.min_keep))
        add(lc.llama_sampler_init_min_p(params.min_p, params.min_keep))
        if params.dynatemp_range > 0:
            add(lc.llama_sampler_init_temp_ext(params.temperature, params.dynatemp_range, params.dynatemp_exponent))
        else:
            add(lc.llama_sampler_init_temp(params.temperature))
        add(lc.llama_sampler_init_dist(params.seed))
        return chain

    def _sample(self, slot: _Slot, index: int) -> int:
        # llama_sampler_sample also accepts the token into the chain (grammar state, penalty history).
        return self._llama_cpp.llama_sampler_sample(slot.sampler, self._ctx, index)

    # -- encode (any thread) and prefill (the decoding thread) --------------------------------------
    def _encode(self, request: Request, encoder: Any = None) -> _Encoded:
        """Tokenize the prompt and image and run the vision encoder (``encoder``: a libmtmd context, default the
        handler's); the embeddings are copied out."""
        mtmd = self._mtmd
        encoder = encoder or self._handler.mtmd_ctx
        started = time.perf_counter()
        # Raw RGB pixels straight into libmtmd: the same pixels the single path's PNG round trip yields
        # (PNG is lossless), without ~30 ms of PNG encoding and decoding per 1.3 MP page.
        if isinstance(request.image, RawPixels):  # from the isolated engine's parent: already raw RGB
            width, height, data = request.image.width, request.image.height, request.image.data
        else:
            image = to_rgb(request.image)
            width, height, data = image.width, image.height, bytearray(image.tobytes())
        bitmap = mtmd.mtmd_bitmap_init(width, height, (ctypes.c_uint8 * len(data)).from_buffer(data))
        if not bitmap:
            raise DocumentError(errors.INFERENCE_ERROR, "libmtmd could not read the page image")
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            rendered = self.render_prompt(request.prompt, request.system)
            opens = request.params.reasoning == "separate" and rendered.rstrip().endswith(request.params.think_open)
            text = rendered.encode("utf-8")
            entry = mtmd.mtmd_input_text()
            entry.text, entry.text_len, entry.add_special, entry.parse_special = text, len(text), True, True
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mtmd.mtmd_tokenize(encoder, chunks, ctypes.byref(entry), bitmaps, 1) != 0:
                raise DocumentError(errors.INFERENCE_ERROR, "libmtmd could not tokenize the request")
            n_tokens = mtmd.mtmd_helper_get_n_tokens(chunks)
            if n_tokens + 1 > self.ctx_per_seq:
                raise DocumentError(
                    errors.CONTEXT_OVERFLOW,
                    f"image and prompt do not fit in {self.ctx_per_seq} tokens per sequence; raise --n-ctx or lower the pixel budget",
                )
            encode_started = time.perf_counter()
            embeddings = []
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    embeddings.append(None)
                    continue
                if mtmd.mtmd_encode_chunk(encoder, chunk) != 0:
                    raise DocumentError(errors.INFERENCE_ERROR, "libmtmd failed to encode the page image")
                size = mtmd.mtmd_input_chunk_get_n_tokens(chunk) * self._n_embd_inp
                copy = (ctypes.c_float * size)()
                ctypes.memmove(copy, mtmd.mtmd_get_output_embd(encoder), size * ctypes.sizeof(ctypes.c_float))
                embeddings.append(copy)
            encode_ms = (time.perf_counter() - encode_started) * 1000.0
            return _Encoded(request, chunks, embeddings, n_tokens, encode_ms, started, opens)
        except BaseException:
            mtmd.mtmd_input_chunks_free(chunks)
            raise
        finally:
            mtmd.mtmd_bitmap_free(bitmap)

    def _release(self, encoded: _Encoded) -> None:
        self._mtmd.mtmd_input_chunks_free(encoded.chunks)
        encoded.chunks = None
        encoded.embeddings = []

    def _prefill(self, encoded: _Encoded, seq: int) -> _Slot:
        """Decode an encoded request's prompt and image embeddings into sequence ``seq`` at once; sample the first
        token."""
        steps = self._prefill_steps(encoded, seq)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def _prefill_steps(self, encoded: _Encoded, seq: int) -> Generator[None, None, _Slot]:
        """``_prefill`` one slice at a time: yields after each image slice that is not the last thing decoded (the
        caller may run a decode step of the other sequences there), returns the slot. The first token is sampled
        right after the last chunk's decode, before anything else touches the logits."""
        mtmd, lc = self._mtmd, self._llama_cpp
        sampler = None
        try:
            n_past = 0
            n_chunks = mtmd.mtmd_input_chunks_size(encoded.chunks)
            for i in range(n_chunks):
                chunk = mtmd.mtmd_input_chunks_get(encoded.chunks, i)
                new_n_past = lc.llama_pos(n_past)  # the text path adds to it, the image path sets it
                embd = encoded.embeddings[i]
                last = i == n_chunks - 1
                if embd is None:
                    rc = mtmd.mtmd_helper_eval_chunk_single(
                        self._handler.mtmd_ctx, self._ctx, chunk, n_past, seq, self.engine.config.n_batch,
                        last, ctypes.byref(new_n_past),
                    )
                elif not self.interleave_prefill or mtmd.mtmd_decode_use_non_causal(self._handler.mtmd_ctx, chunk):
                    # Non-causal image attention (Gemma 3) needs the whole image in one batch: not sliced.
                    rc = mtmd.mtmd_helper_decode_image_chunk(
                        self._handler.mtmd_ctx, self._ctx, chunk, embd, n_past, seq, self.engine.config.n_batch,
                        ctypes.byref(new_n_past), _NO_CALLBACK, None,
                    )
                else:
                    n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                    positions = self._image_positions(chunk, n_past, n_tokens)
                    step = self.engine.config.n_batch
                    for offset in range(0, n_tokens, step):
                        self._decode_embeddings(embd, positions, offset, min(step, n_tokens - offset), seq)
                        if not (last and offset + step >= n_tokens):
                            yield
                    new_n_past.value = n_past + mtmd.mtmd_input_chunk_get_n_pos(chunk)
                    rc = 0
                if rc != 0:
                    raise DocumentError(errors.INFERENCE_ERROR, "llama.cpp failed to evaluate the prompt")
                n_past = new_n_past.value
            request = encoded.request
            # A thinking block is free text: the schema's grammar starts at its end (see _end_thinking).
            sampler = self._sampler(request.params, None if encoded.opens_thinking else request.schema)
            slot = _Slot(request, seq, sampler, n_past, n_past, 0, bytearray(), 0, encoded.started, encoded.encode_ms)
            separate = request.params.reasoning == "separate"
            slot.thinking = encoded.opens_thinking
            # A model may open the block itself; not under a grammar, which allows only the answer.
            slot.may_open = separate and not slot.thinking and request.schema is None
            slot.pending = self._sample(slot, -1)
            return slot
        except BaseException:  # a failure, or the generator closed mid-prefill (the consumer stopped)
            if sampler is not None:
                lc.llama_sampler_free(sampler)
            lc.llama_memory_seq_rm(self._memory, seq, -1, -1)
            raise
        finally:
            self._release(encoded)

    def _image_positions(self, chunk: Any, n_past: int, n_tokens: int) -> list[tuple[int, ...]]:
        """Each image token's position, as libmtmd's helper lays them out: M-RoPE models (Qwen-VL) get
        (t, y, x, z) from libmtmd's decoder positions, the others ``n_past + i``."""
        mtmd = self._mtmd
        if not mtmd.mtmd_decode_use_mrope(self._handler.mtmd_ctx):
            return [(n_past + k,) for k in range(n_tokens)]
        tokens = mtmd.mtmd_input_chunk_get_tokens_image(chunk)
        out = []
        for k in range(n_tokens):
            p = mtmd.mtmd_image_tokens_get_decoder_pos(tokens, n_past, k)
            out.append((p.t, p.y, p.x, p.z))
        return out

    def _decode_embeddings(self, embd: Any, positions: list[tuple[int, ...]], offset: int, n: int, seq: int) -> None:
        """Decode image embedding rows ``offset`` to ``offset + n`` into sequence ``seq`` (one llama.cpp call)."""
        lc = self._llama_cpp
        if self._embd_batch is None:
            self._embd_batch = lc.llama_batch_ext_init(self._ctx)
        batch = self._embd_batch
        lc.llama_batch_ext_clear(batch)
        row = self._n_embd_inp * ctypes.sizeof(ctypes.c_float)
        base = ctypes.addressof(embd)
        pos = (lc.llama_pos * 4)()
        for k in range(offset, offset + n):
            data = ctypes.cast(base + k * row, ctypes.POINTER(ctypes.c_float))
            idx = lc.llama_batch_ext_add_embd(batch, seq, lc.llama_embd(data, 1, self._n_embd_inp))
            if idx < 0:
                raise DocumentError(errors.INFERENCE_ERROR, f"llama.cpp refused an image embedding ({idx})")
            for j, value in enumerate(positions[k]):
                pos[j] = value
            lc.llama_batch_ext_set_pos(batch, idx, pos)
        if lc.llama_process(self._ctx, lc.LLAMA_PROCESS_TYPE_DECODE, batch) != 0:
            raise DocumentError(errors.INFERENCE_ERROR, "llama.cpp failed to evaluate the page image")

    def _encoder_threads(self, source: Iterator[Request], out: "queue.Queue[Any]", stop: threading.Event) -> list[threading.Thread]:
        """Start one thread per encoder context, each taking requests from ``source`` (in turn, under a lock) and
        putting them encoded into ``out``; the last one to end puts ``_END``, or the source's exception (after
        every page taken before it, which are still answered)."""
        taking = threading.Lock()
        running = [len(self._encoders)]
        failure: list[BaseException] = []

        def put(item: Any) -> bool:
            return put_unless_stopped(out, item, stop)

        def work(encoder: Any) -> None:
            try:
                while not stop.is_set():
                    try:
                        with taking:
                            request = next(source, _END)
                    except BaseException as exc:  # the request source itself failed: the decoding thread raises it
                        failure.append(exc)
                        return
                    if request is _END:
                        return
                    if request is NOT_YET:  # more may come: the decoding thread goes on meanwhile
                        stop.wait(NOT_YET_WAIT_S)
                        continue
                    try:
                        item: Any = self._encode(request, encoder)
                    except DocumentError as exc:
                        item = _Failed(request, exc)
                    if not put(item):
                        if isinstance(item, _Encoded):
                            self._release(item)
                        return
            finally:
                with taking:
                    running[0] -= 1
                    last = running[0] == 0
                if last:
                    put(_Failed(None, failure[0]) if failure else _END)

        threads = [threading.Thread(target=work, args=(encoder,), name=f"medvlm-encoder-{i}", daemon=True)
                   for i, encoder in enumerate(self._encoders)]
        for thread in threads:
            thread.start()
        return threads

    def _finish(self, slot: _Slot, reason: str) -> Generation:
        self._llama_cpp.llama_sampler_free(slot.sampler)
        self._llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
        raw = bytes(slot.pieces)
        reasoning = None
        answer_at = slot.answer_start
        if slot.thinking:  # still thinking when it ended: no answer
            reasoning, answer_at = raw[slot.think_start:], len(raw)
        elif slot.think_end or slot.answer_start:
            reasoning = raw[slot.think_start:slot.think_end]
        answer = raw[answer_at:]
        stripped = answer.lstrip()
        base = answer_at + len(answer) - len(stripped)  # where the answer text starts in ``pieces``
        text = stripped.decode("utf-8", errors="ignore")
        for stop in slot.request.params.stop:
            if stop and stop in text:
                text, reason = text[: text.index(stop)], "stop"
        kept = [(max(0, offset - base), lp, top) for offset, lp, top in slot.scores if offset >= answer_at]
        latency_ms = (time.perf_counter() - slot.started) * 1000.0
        return Generation(
            text, reason, slot.prompt_tokens, slot.generated, latency_ms, slot.encode_ms,
            reasoning=None if reasoning is None else reasoning.decode("utf-8", errors="ignore").strip(),
            reasoning_tokens=slot.reasoning_tokens, reasoning_budget_hit=slot.budget_hit,
            token_logprobs=tuple(lp for _, lp, _ in kept), token_offsets=tuple(o for o, _, _ in kept),
            top_logprobs=tuple(top for _, _, top in kept) if slot.request.params.logprobs else (),
        )

    def _score(self, index: int, token: int, top_n: int) -> tuple[float, tuple]:
        """The sampled token's log-probability under the model's own distribution (the logits before any sampler:
        penalties, grammar and temperature shape the choice, not the model's confidence), and the top-N."""
        logits = np.ctypeslib.as_array(self._llama_cpp.llama_get_logits_ith(self._ctx, index), shape=(self._n_vocab,))
        peak = float(logits.max())
        log_z = peak + float(np.log(np.exp(logits - peak).sum()))
        top: tuple = ()
        if top_n:
            best = np.argpartition(-logits, top_n - 1)[:top_n]
            best = best[np.argsort(-logits[best], kind="stable")]
            top = tuple((self._piece_of(int(t)).decode("utf-8", errors="replace"), float(logits[t]) - log_z) for t in best)
        return float(logits[token]) - log_z, top

    def _piece_of(self, token: int) -> bytes:
        n = self._llama_cpp.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[: max(n, 0)]

    def _take(self, slot: _Slot, index: int) -> str | None:
        """Account for the token just sampled (from the logits at ``index``); the finish reason if it is done."""
        token = slot.pending
        params = slot.request.params
        if slot.thinking and params.max_reasoning_tokens is not None and slot.reasoning_tokens >= params.max_reasoning_tokens:
            self._close_thinking(slot)  # the budget is spent: the sampled token is dropped, the block closed
            return self._done(slot)
        if self._llama_cpp.llama_vocab_is_eog(self._vocab, token):
            return "stop"
        if not slot.thinking and self.confidences:  # answer tokens (and ones that may open a block) are scored
            logprob, top = self._score(index, token, params.logprobs)
            slot.scores.append((len(slot.pieces), logprob, top))
        slot.pieces += self._piece_of(token)
        slot.generated += 1
        if slot.thinking:
            slot.reasoning_tokens += 1
            self._find_close(slot)
        elif slot.may_open:
            self._find_open(slot)
        return self._done(slot)

    def _done(self, slot: _Slot) -> str | None:
        """The finish reason if a limit is reached or a stop string was generated (in the answer), else None."""
        params = slot.request.params
        if (params.max_tokens != -1 and slot.generated >= params.max_tokens) or \
                slot.n_past + 1 + len(slot.forced) >= self.ctx_per_seq:
            return "length"
        if params.stop and not slot.thinking:
            answer = bytes(slot.pieces[slot.answer_start:]).decode("utf-8", errors="ignore")
            if any(s in answer for s in params.stop):
                return "stop"
        return None

    # -- reasoning: a thinking block (think_open ... think_close) apart from the answer ---------------------
    def _find_open(self, slot: _Slot) -> None:
        """While nothing but whitespace and a prefix of think_open was generated, watch for the block to open."""
        marker = slot.request.params.think_open.encode("utf-8")
        text = bytes(slot.pieces).lstrip()
        if text.startswith(marker):
            slot.thinking, slot.may_open = True, False
            slot.think_start = len(slot.pieces) - len(text) + len(marker)
            slot.scores.clear()  # the marker is not part of the answer
        elif not marker.startswith(text):
            slot.may_open = False  # the answer began

    def _find_close(self, slot: _Slot) -> None:
        marker = slot.request.params.think_close.encode("utf-8")
        at = slot.pieces.find(marker, slot.think_start)
        if at >= 0:
            self._end_thinking(slot, at, at + len(marker))

    def _close_thinking(self, slot: _Slot) -> None:
        """The reasoning budget is spent: append the closing marker as if the model had written it."""
        closing = f"\n{slot.request.params.think_close}\n\n"
        tokens = self.engine.llm.tokenize(closing.encode("utf-8"), add_bos=False, special=True)
        at = len(slot.pieces)
        slot.pieces += closing.encode("utf-8")
        slot.generated += len(tokens)
        slot.pending, slot.forced = tokens[0], deque(tokens[1:])
        slot.budget_hit = True
        self._end_thinking(slot, at, len(slot.pieces))

    def _end_thinking(self, slot: _Slot, think_end: int, answer_start: int) -> None:
        slot.thinking = False
        slot.think_end, slot.answer_start = think_end, answer_start
        if slot.request.schema is not None:  # the answer is constrained from here: a fresh chain with the grammar
            self._llama_cpp.llama_sampler_free(slot.sampler)
            slot.sampler = self._sampler(slot.request.params, slot.request.schema)

    def generate_many(self, requests: Iterable[Request]) -> Iterator[tuple[Any, Result]]:
        """Answer every request, yielding ``(key, Generation or DocumentError)`` as each finishes.

        Requests are taken from ``requests`` lazily: at most ``n_seq`` are in flight, plus (with ``overlap``)
        ``encode_ahead`` encoded and one being encoded, so a long iterable never sits in memory. An exception
        raised by the iterable itself propagates (after the pages in flight are finished).
        """
        with self.engine.lock:  # one llama.cpp model in use at a time in this process
            if not self.overlap:
                yield from self._run(self._encode_inline(iter(requests)), blocking=True)
                return
            encoded: queue.Queue[Any] = queue.Queue(maxsize=self.encode_ahead)
            stop = threading.Event()
            threads = self._encoder_threads(iter(requests), encoded, stop)
            try:
                yield from self._run(encoded, blocking=False)
            finally:
                stop.set()
                for thread in threads:
                    thread.join()  # the mtmd contexts must be idle before the lock is released
                while True:
                    try:
                        item = encoded.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(item, _Encoded):
                        self._release(item)

    def _encode_inline(self, source: Iterator[Request]) -> Iterator[Any]:
        while True:
            try:
                request = next(source, _END)
            except Exception as exc:  # the request source failed: as with the encoder thread
                yield _Failed(None, exc)
                return
            if request is _END:
                return
            if request is NOT_YET:
                yield None  # nothing to admit now: the decode loop goes on
                continue
            try:
                yield self._encode(request)
            except DocumentError as exc:
                yield _Failed(request, exc)

    def _run(self, source: Any, blocking: bool) -> Iterator[tuple[Any, Generation | DocumentError]]:
        """The decode loop over encoded requests: a plain iterator (``blocking``) or the encoder's queue.

        From the queue, free slots take whatever is already encoded and decoding goes on meanwhile; only
        with no live sequence does the loop wait for the encoder. With ``interleave_prefill``, a page admitted
        while others decode is prefilled one slice per decode step (``filling``), one page at a time.
        """
        lc = self._llama_cpp
        live: dict[int, _Slot] = {}
        free = list(range(self.n_seq - 1, -1, -1))
        exhausted = False
        pending_error: BaseException | None = None
        filling: _Filling | None = None

        def next_item() -> Any:
            if blocking:
                return next(source, _END)  # _encode_inline never raises
            try:
                return source.get(block=not live and filling is None)
            except queue.Empty:
                return None

        try:
            while True:
                while free and not exhausted and filling is None:
                    item = next_item()
                    if item is None:  # nothing encoded yet: keep decoding
                        if blocking and not live and filling is None:
                            time.sleep(NOT_YET_WAIT_S)  # nothing in flight here either: ask the source again soon
                        break
                    if item is _END:
                        exhausted = True
                        break
                    if isinstance(item, _Failed):
                        if item.request is None:  # the request source raised: finish what is in flight, then raise
                            pending_error, exhausted = item.error, True
                            break
                        yield item.request.key, item.error
                        continue
                    seq = free.pop()
                    if live and self.interleave_prefill:
                        filling = _Filling(seq, item, self._prefill_steps(item, seq))
                        break
                    started = time.perf_counter()
                    try:
                        slot = self._prefill(item, seq)
                    except DocumentError as exc:
                        free.append(seq)
                        yield item.request.key, exc
                        continue
                    if live:
                        self.admission_pauses_ms.append((time.perf_counter() - started) * 1000.0)
                    reason = self._take(slot, -1)
                    if reason is not None:
                        free.append(seq)
                        yield item.request.key, self._finish(slot, reason)
                        continue
                    live[seq] = slot
                if filling is not None:  # one slice of the page being prefilled, then a decode step of the others
                    current, slot = filling, None
                    started = time.perf_counter()
                    try:
                        next(current.steps)
                    except StopIteration as done:
                        slot = done.value
                    except DocumentError as exc:
                        filling = None
                        free.append(current.seq)
                        yield current.encoded.request.key, exc
                    current.longest_ms = max(current.longest_ms, (time.perf_counter() - started) * 1000.0)
                    if slot is not None:
                        filling = None
                        if live:
                            self.admission_pauses_ms.append(current.longest_ms)
                        reason = self._take(slot, -1)  # the logits of the prefill's last decode, just made
                        if reason is not None:
                            free.append(current.seq)
                            yield current.encoded.request.key, self._finish(slot, reason)
                        else:
                            live[current.seq] = slot
                if not live:
                    if exhausted and filling is None:
                        if pending_error is not None:
                            raise pending_error
                        return
                    continue
                order = sorted(live)
                self._batch.n_tokens = len(order)
                for i, seq in enumerate(order):
                    slot = live[seq]
                    self._batch.token[i] = slot.pending
                    self._batch.pos[i] = slot.n_past
                    self._batch.n_seq_id[i] = 1
                    self._batch.seq_id[i][0] = seq
                    self._batch.logits[i] = 1
                if lc.llama_decode(self._ctx, self._batch) != 0:
                    for seq in order:
                        slot = live.pop(seq)
                        self._finish(slot, "error")
                        free.append(seq)
                        yield slot.request.key, DocumentError(errors.INFERENCE_ERROR, "llama.cpp failed to decode the batch")
                    continue
                for i, seq in enumerate(order):
                    slot = live[seq]
                    slot.n_past += 1
                    if slot.forced:  # fed, not sampled (the budget's closing marker)
                        slot.pending = slot.forced.popleft()
                        continue
                    slot.pending = self._sample(slot, i)
                    reason = self._take(slot, i)
                    if reason is not None:
                        del live[seq]
                        free.append(seq)
                        yield slot.request.key, self._finish(slot, reason)
        finally:  # the consumer stopped early (or an error): free the slots still in flight
            if filling is not None:
                if inspect.getgeneratorstate(filling.steps) == inspect.GEN_CREATED:
                    self._release(filling.encoded)  # never started: its cleanup would not run
                filling.steps.close()  # frees its sequence, sampler and chunks
            for slot in live.values():
                lc.llama_sampler_free(slot.sampler)
                lc.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
