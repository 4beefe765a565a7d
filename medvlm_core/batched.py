"""Batched multi-document decoding: several pages share one llama.cpp context, one token each per step.

``BatchedEngine`` keeps up to ``n_seq`` documents in flight. Each gets its own sequence (slot) in a second
llama.cpp context of the loaded model: its image and prompt are prefilled into that slot through libmtmd,
then every step decodes one token for every live sequence in a single ``llama_decode`` batch. A finished
sequence frees its slot (``llama_memory_seq_rm``) and the next document takes it (continuous refill).

The prompt is rendered exactly as the single-sequence chat handler renders it, and each sequence samples
with the same chain llama-cpp-python builds (penalties, grammar, greedy or top-k/typical/top-p/min-p/temp/
dist), so at temperature 0 a document's answer matches ``VisionEngine.generate`` (tests check this on the
generated models). Decoding several sequences in one batch can change floating-point results slightly on
some backends; where that flips a near-tie, the answers can differ (see BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import io
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from PIL import Image

from medvlm_core import errors
from medvlm_core.config import GenerationParams
from medvlm_core.engine import Generation, VisionEngine
from medvlm_core.errors import DocumentError, RunError

_SENTINEL = "\x00medvlm-image\x00"
_PENALTY_LAST_N = 64  # llama-cpp-python's default last_n_tokens_size


@dataclass
class Request:
    """One page for the batched engine. ``key`` comes back with its result."""

    key: Any
    image: Image.Image
    prompt: str
    params: GenerationParams
    schema: dict | None = None


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


class BatchedEngine:
    """Continuous batching over a loaded ``VisionEngine`` (which keeps the weights and the vision projector)."""

    def __init__(self, engine: VisionEngine, n_seq: int = 8, ctx_per_seq: int | None = None):
        if not engine.loaded:
            raise RunError("load the VisionEngine before batching over it")
        if n_seq < 1:
            raise RunError(f"n_seq must be >= 1, got {n_seq}")
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.engine = engine
        self.n_seq = n_seq
        # llama.cpp sizes contexts in multiples of 256 cells: keep every slot the same, whole size.
        self.ctx_per_seq = -(-(ctx_per_seq or engine.config.n_ctx) // 256) * 256
        llm = engine._llm
        self._handler = llm.chat_handler
        self._handler._init_mtmd_context(llm)
        self._mtmd = self._handler._mtmd_cpp
        self._vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.ctx_per_seq * n_seq
        params.n_batch = engine.config.n_batch
        params.n_ubatch = engine.config.n_batch
        params.n_seq_max = n_seq
        params.n_threads = llm.n_threads
        params.n_threads_batch = llm.n_threads_batch
        self._ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not self._ctx:
            raise RunError(f"llama.cpp could not create a context for {n_seq} sequences of {self.ctx_per_seq} tokens")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(n_seq, 0, 1)
        self._piece = ctypes.create_string_buffer(256)
        self._rendered: dict[str, str] = {}  # prompt -> rendered text: compiling the template costs ~ms per page

    def close(self) -> None:
        """Free the batched context (the model stays loaded in the VisionEngine)."""
        if self._ctx:
            self._llama_cpp.llama_batch_free(self._batch)
            self._llama_cpp.llama_free(self._ctx)
            self._ctx = None

    # -- prompt and sampling, exactly as the single-sequence handler does ------------------------
    def render_prompt(self, prompt: str) -> str:
        """The chat-formatted prompt text with libmtmd's media marker where the image goes (cached per prompt)."""
        text = self._rendered.get(prompt)
        if text is None:
            if len(self._rendered) > 256:  # row-level prompts can be many: keep the cache small
                self._rendered.clear()
            text = self._rendered[prompt] = self._render(prompt)
        return text

    def _render(self, prompt: str) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from llama_cpp import llama_chat_format as lcf

        llm = self.engine._llm
        marker = self._mtmd.mtmd_default_marker().decode("utf-8")
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _SENTINEL}},
                                                 {"type": "text", "text": prompt}]}]
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
        if handler.DEFAULT_SYSTEM_MESSAGE is not None:
            messages = [{"role": "system", "content": handler.DEFAULT_SYSTEM_MESSAGE}] + messages
        text = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(handler.CHAT_FORMAT).render(
            messages=messages, add_generation_prompt=True,
            eos_token=llm.detokenize([llm.token_eos()]), bos_token=llm.detokenize([llm.token_bos()]),
        )
        return text.replace(_SENTINEL, marker)

    def _sampler(self, params: GenerationParams, schema: dict | None) -> Any:
        lc = self._llama_cpp
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        lc.llama_sampler_chain_add(
            chain, lc.llama_sampler_init_penalties(self._n_vocab, _PENALTY_LAST_N, params.repeat_penalty, 0.0, 0.0)
        )
        if schema is not None:
            gbnf = self.engine._grammar(schema)._grammar.encode("utf-8")
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_grammar(self._vocab, gbnf, b"root"))
        if params.temperature == 0.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        else:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(params.top_k))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_typical(1.0, 1))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(params.top_p, 1))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(params.min_p, 1))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(params.temperature))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(params.seed))
        return chain

    def _sample(self, slot: _Slot, index: int) -> int:
        # llama_sampler_sample also accepts the token into the chain (grammar state, penalty history).
        return self._llama_cpp.llama_sampler_sample(slot.sampler, self._ctx, index)

    # -- slots ----------------------------------------------------------------------------------
    def _prefill(self, request: Request, seq: int) -> _Slot:
        """Encode the image and prompt into sequence ``seq``; sample the first token."""
        mtmd = self._mtmd
        started = time.perf_counter()
        buf = io.BytesIO()
        request.image.save(buf, format="PNG", compress_level=1)
        data = bytearray(buf.getvalue())
        bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(
            self._handler.mtmd_ctx, (ctypes.c_uint8 * len(data)).from_buffer(data), len(data), False
        )
        if not bitmap:
            raise DocumentError(errors.INFERENCE_ERROR, "libmtmd could not read the page image")
        chunks = mtmd.mtmd_input_chunks_init()
        sampler = None
        try:
            text = self.render_prompt(request.prompt).encode("utf-8")
            entry = mtmd.mtmd_input_text()
            entry.text, entry.text_len, entry.add_special, entry.parse_special = text, len(text), True, True
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mtmd.mtmd_tokenize(self._handler.mtmd_ctx, chunks, ctypes.byref(entry), bitmaps, 1) != 0:
                raise DocumentError(errors.INFERENCE_ERROR, "libmtmd could not tokenize the request")
            n_tokens = mtmd.mtmd_helper_get_n_tokens(chunks)
            if n_tokens + 1 > self.ctx_per_seq:
                raise DocumentError(
                    errors.CONTEXT_OVERFLOW,
                    f"image and prompt do not fit in {self.ctx_per_seq} tokens per sequence; raise --n-ctx or lower the pixel budget",
                )
            n_past = self._llama_cpp.llama_pos(0)
            if mtmd.mtmd_helper_eval_chunks(
                self._handler.mtmd_ctx, self._ctx, chunks, 0, seq, self.engine.config.n_batch, True, ctypes.byref(n_past)
            ) != 0:
                raise DocumentError(errors.INFERENCE_ERROR, "llama.cpp failed to evaluate the prompt")
            sampler = self._sampler(request.params, request.schema)
            slot = _Slot(request, seq, sampler, n_past.value, n_past.value, 0, bytearray(), 0, started)
            slot.pending = self._sample(slot, -1)
            return slot
        except BaseException:
            if sampler is not None:
                self._llama_cpp.llama_sampler_free(sampler)
            self._llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
            raise
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)

    def _finish(self, slot: _Slot, reason: str) -> Generation:
        self._llama_cpp.llama_sampler_free(slot.sampler)
        self._llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
        text = bytes(slot.pieces).decode("utf-8", errors="ignore")
        for stop in slot.request.params.stop:
            if stop and stop in text:
                text, reason = text[: text.index(stop)], "stop"
        return Generation(text, reason, slot.prompt_tokens, slot.generated, (time.perf_counter() - slot.started) * 1000.0)

    def _take(self, slot: _Slot) -> str | None:
        """Account for the token just sampled; the finish reason if the sequence is done."""
        token = slot.pending
        if self._llama_cpp.llama_vocab_is_eog(self._vocab, token):
            return "stop"
        n = self._llama_cpp.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        slot.pieces += self._piece.raw[: max(n, 0)]
        slot.generated += 1
        params = slot.request.params
        if slot.generated >= params.max_tokens or slot.n_past + 1 >= self.ctx_per_seq:
            return "length"
        if params.stop and any(s in bytes(slot.pieces).decode("utf-8", errors="ignore") for s in params.stop):
            return "stop"
        return None

    def generate_many(self, requests: Iterable[Request]) -> Iterator[tuple[Any, Generation | DocumentError]]:
        """Answer every request, yielding ``(key, Generation or DocumentError)`` as each finishes.

        At most ``n_seq`` requests are in flight; the next one is taken from ``requests`` (lazily) as soon
        as a slot frees, so a long iterable never sits in memory.
        """
        lc = self._llama_cpp
        source = iter(requests)
        live: dict[int, _Slot] = {}
        free = list(range(self.n_seq - 1, -1, -1))
        exhausted = False
        with self.engine._lock:  # one llama.cpp model in use at a time in this process
            while True:
                while free and not exhausted:
                    request = next(source, None)
                    if request is None:
                        exhausted = True
                        break
                    seq = free.pop()
                    try:
                        slot = self._prefill(request, seq)
                    except DocumentError as exc:
                        free.append(seq)
                        yield request.key, exc
                        continue
                    reason = self._take(slot)
                    if reason is not None:
                        free.append(seq)
                        yield request.key, self._finish(slot, reason)
                        continue
                    live[seq] = slot
                if not live:
                    return
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
                    slot.pending = self._sample(slot, i)
                    reason = self._take(slot)
                    if reason is not None:
                        del live[seq]
                        free.append(seq)
                        yield slot.request.key, self._finish(slot, reason)
