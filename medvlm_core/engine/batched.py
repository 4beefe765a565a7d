"""Batched multi-document decoding: several requests share one llama.cpp context, one token each per step.

``BatchedEngine`` keeps up to ``n_seq`` requests in flight. Each gets its own sequence (slot) in a second
llama.cpp context of the loaded model: its images and prompt are prefilled into that slot through libmtmd,
then every step decodes one token for every live sequence in a single ``llama_decode`` batch. A finished
sequence frees its slot (``llama_memory_seq_rm``) and the next request takes it (continuous refill). A request
holds one page, a document's pages in page order (one media marker per page in the prompt, each image encoded
and prefilled in slices as a single page's is) or no image at all (a text-only prompt); each must fit its
sequence's ``ctx_per_seq`` cells, else it is a ``context_overflow`` with the counts (``encoding.overflow_counts``).

Vision encoding is split from prefill: a page's image is encoded by libmtmd into embeddings (``_encode``),
and those embeddings are later decoded into a free slot (``_prefill``). With ``overlap`` on, encoding runs
on ``encode_workers`` threads a few pages ahead while the main thread decodes the batch, so the encoder (the
slowest stage on a GPU: ~0.4 s per 1656-token page on an H200) is off the decode's critical path. Each encoder
thread has its own libmtmd context (the handler's, plus copies of the projector); the decoding thread uses the
batched llama context. The embeddings are copied out of libmtmd's buffer before the next encode overwrites it.

The prompt is rendered exactly as the single-sequence chat handler renders it, and each sequence samples
with the same chain llama-cpp-python builds (penalties, grammar, greedy or top-k/typical/top-p/min-p/temp/
dist), so at temperature 0 a request's answer matches ``VisionEngine.generate`` (llama-cpp-python's own chat
completion, with the same images: tests check this on the generated models). Decoding several sequences in one
batch can change floating-point results slightly on some backends; where that flips a near-tie, the answers can
differ (see docs/benchmarks.md).
"""

from __future__ import annotations

import inspect
import queue
import threading
import time
from collections import deque
from typing import Any, Iterable, Iterator

from medvlm_core import errors
from medvlm_core.engine.chat_render import PromptRenderer
from medvlm_core.engine.encoding import END, Encoded, Failed, PageEncoder
from medvlm_core.engine.llama import VisionEngine
from medvlm_core.engine.prefill import Filling, Prefill
from medvlm_core.engine.reasoning_markers import close_thinking, find_close, find_open
from medvlm_core.engine.sampling import Sampling
from medvlm_core.engine.slot import Slot
from medvlm_core.engine.types import NOT_YET_WAIT_S, Engine, Generation, Request, Result
from medvlm_core.errors import DocumentError, RunError
from medvlm_core.model.memory_plan import encode_workers_for


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
            n_seq: requests decoded together.
            ctx_per_seq: KV cells per sequence (default: the engine's n_ctx), rounded up to 256: a request's images,
                text and answer together.
            overlap: encode images on a second thread while the batch decodes (off: inline, one thread).
            encode_ahead: encoded requests waiting for a slot (default ``n_seq``); it bounds host memory to
                about ``encode_ahead`` requests of embeddings (~24 MB per page for a 7B model at 1656 image tokens,
                so a document request holds that per page: ``memory_plan.document_host_mb``).
            confidences: score every answer token (log-probabilities); off only to measure what that costs.
            encode_workers: vision-encoder threads (with ``overlap``), each with its own libmtmd context on the
                same device (default: ``medvlm_core.model.memory_plan.encode_workers_for``).
            interleave_prefill: a new request's image embeddings (each image's in turn) go into its slot ``n_batch``
                tokens at a time, with a decode step of the requests in flight between slices (off: each whole image
                at once, as libmtmd's helper does, while the others wait).
        """
        if not engine.loaded:
            raise RunError("load the VisionEngine before batching over it")
        if n_seq < 1:
            raise RunError(f"n_seq must be >= 1, got {n_seq}")
        import llama_cpp

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
        handler = llm.chat_handler
        handler._init_mtmd_context(llm)
        self._mtmd = handler._mtmd_cpp
        vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        n_embd_inp = llama_cpp.llama_model_n_embd_inp(llm._model.model)
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
        self._sampling = Sampling(llama_cpp, self._ctx, vocab, self.ctx_per_seq, engine.grammar_text)
        self._prefill = Prefill(llama_cpp, self._ctx, handler, n_embd_inp, engine.config.n_batch, interleave_prefill,
                                self._sampling)
        # Per page admitted while others were decoding: the longest pause it caused them (ms). A measurement for the
        # benchmark (the whole prefill without interleaving, one slice with it); kept to the last 10,000 pages.
        self.admission_pauses_ms: deque = deque(maxlen=10_000)
        self._renderer = PromptRenderer(llm, handler)
        workers = encode_workers if encode_workers is not None else encode_workers_for(engine.config)
        self._encoder = PageEncoder(llama_cpp, llm, handler, workers, n_embd_inp, self.ctx_per_seq, self.render_prompt)

    @property
    def loaded(self) -> bool:
        """True until ``close()``."""
        return bool(self._ctx)

    @property
    def load_seconds(self) -> float:
        """How long the model took to load (the ``VisionEngine``'s load)."""
        return self.engine.load_seconds

    @property
    def interleave_prefill(self) -> bool:
        """Whether a new page's image is prefilled a slice at a time between decode steps (set at construction)."""
        return self._prefill.interleave

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
        return len(self._encoder.contexts)

    def close(self) -> None:
        """Free the batched context and the extra encoder contexts (the model stays loaded in the VisionEngine)."""
        self._encoder.close()
        self._prefill.close()
        if self._ctx:
            self._llama_cpp.llama_batch_free(self._batch)
            self._llama_cpp.llama_free(self._ctx)
            self._ctx = None

    def render_prompt(self, prompt: str, system: str | None = None, images: int = 1) -> str:
        """The chat-formatted prompt text with libmtmd's media marker where each image goes (cached per prompt),
        exactly as the single-sequence chat handler renders it.

        Args:
            prompt: the user's question.
            system: the system prompt (None: the chat format's default, if it has one).
            images: the request's page images (0: a text-only prompt).

        Returns:
            The text libmtmd tokenizes.
        """
        return self._renderer.render(prompt, system, images)

    def generate_many(self, requests: Iterable[Request]) -> Iterator[tuple[Any, Result]]:
        """Answer every request, yielding ``(key, Generation or DocumentError)`` as each finishes.

        Requests are taken from ``requests`` lazily: at most ``n_seq`` are in flight, plus (with ``overlap``)
        ``encode_ahead`` encoded and one being encoded, so a long iterable never sits in memory. An exception
        raised by the iterable itself propagates (after the pages in flight are finished).
        """
        with self.engine.lock:  # one llama.cpp model in use at a time in this process
            if not self.overlap:
                yield from self._run(self._encoder.inline(iter(requests)), blocking=True)
                return
            encoded: queue.Queue[Any] = queue.Queue(maxsize=self.encode_ahead)
            stop = threading.Event()
            threads = self._encoder.start_threads(iter(requests), encoded, stop)
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
                    if isinstance(item, Encoded):
                        item.free(self._mtmd)

    # -- the scheduler: admit pages into free slots, then one decode step of every live page ----------------
    def _run(self, source: Any, blocking: bool) -> Iterator[tuple[Any, Generation | DocumentError]]:
        """The decode loop over encoded requests: a plain iterator (``blocking``) or the encoder's queue.

        From the queue, free slots take whatever is already encoded and decoding goes on meanwhile; only
        with no live sequence does the loop wait for the encoder. With ``interleave_prefill``, a page admitted
        while others decode is prefilled one slice per decode step (``filling``), one page at a time.
        """
        lc = self._llama_cpp
        live: dict[int, Slot] = {}
        free = list(range(self.n_seq - 1, -1, -1))
        exhausted = False
        pending_error: BaseException | None = None
        filling: Filling | None = None

        def next_item() -> Any:
            if blocking:
                return next(source, END)  # PageEncoder.inline never raises
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
                    if item is END:
                        exhausted = True
                        break
                    if isinstance(item, Failed):
                        if item.request is None:  # the request source raised: finish what is in flight, then raise
                            pending_error, exhausted = item.error, True
                            break
                        yield item.request.key, item.error
                        continue
                    seq = free.pop()
                    if live and self.interleave_prefill:
                        filling = Filling(seq, item, self._prefill.steps(item, seq))
                        break
                    finished = self._admit_whole(item, seq, live, free)
                    if finished is not None:
                        yield finished
                if filling is not None:  # one slice of the page being prefilled, then a decode step of the others
                    done, finished = self._fill_slice(filling, live, free)
                    if done:
                        filling = None
                    if finished is not None:
                        yield finished
                if not live:
                    if exhausted and filling is None:
                        if pending_error is not None:
                            raise pending_error
                        return
                    continue
                yield from self._decode_step(live, free)
        finally:  # the consumer stopped early (or an error): free the slots still in flight
            if filling is not None:
                if inspect.getgeneratorstate(filling.steps) == inspect.GEN_CREATED:
                    filling.encoded.free(self._mtmd)  # never started: its cleanup would not run
                filling.steps.close()  # frees its sequence, sampler and chunks
            for slot in live.values():
                lc.llama_sampler_free(slot.sampler)
                lc.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)

    def _admit_whole(self, item: Encoded, seq: int, live: dict[int, Slot],
                     free: list[int]) -> tuple[Any, Result] | None:
        """Prefill a page into sequence ``seq`` at once and take its first token: it joins ``live``, or its
        ``(key, result)`` is returned (an error, or done already) and ``seq`` goes back to ``free``."""
        started = time.perf_counter()
        try:
            slot = self._prefill.whole(item, seq)
        except DocumentError as exc:
            free.append(seq)
            return item.request.key, exc
        if live:
            self.admission_pauses_ms.append((time.perf_counter() - started) * 1000.0)
        reason = self._take(slot, -1)
        if reason is not None:
            free.append(seq)
            return item.request.key, self._finish(slot, reason)
        live[seq] = slot
        return None

    def _fill_slice(self, filling: Filling, live: dict[int, Slot],
                    free: list[int]) -> tuple[bool, tuple[Any, Result] | None]:
        """Prefill one slice of the page being filled; at its end take its first token (it joins ``live``).

        Returns:
            ``(done, finished)``: whether the page's prefill is over (it failed, finished or went live), and its
            ``(key, result)`` when it failed or finished at once (its sequence back in ``free``).
        """
        slot = None
        started = time.perf_counter()
        try:
            next(filling.steps)
        except StopIteration as done:
            slot = done.value
        except DocumentError as exc:
            free.append(filling.seq)
            return True, (filling.encoded.request.key, exc)
        filling.longest_ms = max(filling.longest_ms, (time.perf_counter() - started) * 1000.0)
        if slot is None:
            return False, None
        if live:
            self.admission_pauses_ms.append(filling.longest_ms)
        reason = self._take(slot, -1)  # the logits of the prefill's last decode, just made
        if reason is not None:
            free.append(filling.seq)
            return True, (filling.encoded.request.key, self._finish(slot, reason))
        live[filling.seq] = slot
        return True, None

    def _decode_step(self, live: dict[int, Slot], free: list[int]) -> Iterator[tuple[Any, Result]]:
        """One ``llama_decode`` of the next token of every live page, then a token sampled for each; yields the
        pages that finished (all of them, with an error, if the decode failed)."""
        order = sorted(live)
        self._batch.n_tokens = len(order)
        for i, seq in enumerate(order):
            slot = live[seq]
            self._batch.token[i] = slot.pending
            self._batch.pos[i] = slot.n_past
            self._batch.n_seq_id[i] = 1
            self._batch.seq_id[i][0] = seq
            self._batch.logits[i] = 1
        if self._llama_cpp.llama_decode(self._ctx, self._batch) != 0:
            for seq in order:
                slot = live.pop(seq)
                self._finish(slot, "error")
                free.append(seq)
                yield slot.request.key, DocumentError(errors.INFERENCE_ERROR, "llama.cpp failed to decode the batch")
            return
        for i, seq in enumerate(order):
            slot = live[seq]
            slot.n_past += 1
            if slot.forced:  # fed, not sampled (the budget's closing marker)
                slot.pending = slot.forced.popleft()
                continue
            slot.pending = self._sampling.sample(slot.sampler, i)
            reason = self._take(slot, i)
            if reason is not None:
                del live[seq]
                free.append(seq)
                yield slot.request.key, self._finish(slot, reason)

    def _take(self, slot: Slot, index: int) -> str | None:
        """Account for the token just sampled (from the logits at ``index``); the finish reason if it is done."""
        token = slot.pending
        params = slot.request.params
        if slot.thinking and params.max_reasoning_tokens is not None and slot.reasoning_tokens >= params.max_reasoning_tokens:
            # the budget is spent: the sampled token is dropped, the block closed
            close_thinking(slot, self.engine.llm.tokenize, self._sampling)
            return slot.finish_reason(self.ctx_per_seq)
        if self._sampling.is_end(token):
            return "stop"
        if not slot.thinking and self.confidences:  # answer tokens (and ones that may open a block) are scored
            logprob, top = self._sampling.score(index, token, params.logprobs)
            slot.scores.append((len(slot.pieces), logprob, top))
        slot.pieces += self._sampling.piece(token)
        slot.generated += 1
        if slot.thinking:
            slot.reasoning_tokens += 1
            find_close(slot, self._sampling)
        elif slot.may_open:
            find_open(slot)
        return slot.finish_reason(self.ctx_per_seq)

    def _finish(self, slot: Slot, reason: str) -> Generation:
        """Free the page's sampler chain and sequence; its ``Generation``."""
        self._sampling.free(slot.sampler)
        self._llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
        return slot.generation(reason)
