"""The batched engine's prefill: an encoded request's prompt and image embeddings decoded into a free sequence
of the batched context, on the decoding thread, and its first token sampled.

The chunks go in the order libmtmd tokenized them (text, then each image where its marker was, in page order),
positions running on from one chunk to the next as in libmtmd's helper (an M-RoPE image advances them by its
``n_pos``, not its token count). Text chunks go through libmtmd's helper. Image chunks go either whole
(``interleave_prefill`` off, or an image whose attention is non-causal) through libmtmd's helper, or ``n_batch``
embedding rows at a time, so that the scheduler can run a decode step of the requests in flight between slices
(``Prefill.steps``) instead of stalling them for a whole image, or a whole document's images.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Generator

from medvlm_core import errors
from medvlm_core.engine.encoding import Encoded
from medvlm_core.engine.sampling import Sampling
from medvlm_core.engine.slot import Slot
from medvlm_core.errors import DocumentError

_NO_CALLBACK = None  # a NULL mtmd_helper_post_decode_callback, made on first use (needs llama_cpp loaded)


@dataclass
class Filling:
    """The page being prefilled a slice at a time (``interleave_prefill``) while the others decode."""

    seq: int
    encoded: Encoded
    steps: Generator[None, None, Slot]
    longest_ms: float = 0.0  # the longest slice so far: the longest pause it made the others take


class Prefill:
    """Prefilling encoded pages into the sequences of one batched llama.cpp context.

    Args:
        llama_cpp: the ``llama_cpp`` module (loaded by the caller).
        ctx: the batched llama.cpp context.
        handler: the model's multimodal chat handler (its libmtmd context evaluates the text chunks).
        n_embd_inp: the width of an image embedding row.
        n_batch: tokens per llama.cpp batch (and per image slice).
        interleave: slice images (see the module's description).
        sampling: the sampler chains and the first token's sampling.
    """

    def __init__(self, llama_cpp: Any, ctx: Any, handler: Any, n_embd_inp: int, n_batch: int, interleave: bool,
                 sampling: Sampling):
        global _NO_CALLBACK
        if _NO_CALLBACK is None:
            import llama_cpp.mtmd_cpp as mtmd_cpp

            _NO_CALLBACK = mtmd_cpp.mtmd_helper_post_decode_callback()
        self._lc = llama_cpp
        self._ctx = ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._handler = handler
        self._mtmd = handler._mtmd_cpp
        self._n_embd_inp = n_embd_inp
        self._n_batch = n_batch
        self.interleave = interleave
        self._sampling = sampling
        self._embd_batch = None  # llama_batch_ext for image slices, made on first use

    def close(self) -> None:
        """Free the image-slice batch (the context is the caller's). Idempotent."""
        if self._embd_batch is not None:
            self._lc.llama_batch_ext_free(self._embd_batch)
            self._embd_batch = None

    def whole(self, encoded: Encoded, seq: int) -> Slot:
        """Decode an encoded request's prompt and image embeddings into sequence ``seq`` at once; sample the first
        token.

        Args:
            encoded: the page (its chunks are freed here, whatever happens).
            seq: a free sequence.

        Returns:
            The page's slot, its first token pending.

        Raises:
            DocumentError: llama.cpp failed to evaluate it (the sequence is cleared).
        """
        steps = self.steps(encoded, seq)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def steps(self, encoded: Encoded, seq: int) -> Generator[None, None, Slot]:
        """``whole`` one slice at a time: yields after each image slice that is not the last thing decoded (the
        caller may run a decode step of the other sequences there), returns the slot. The first token is sampled
        right after the last chunk's decode, before anything else touches the logits. Closing the generator
        mid-prefill clears the sequence.

        Args:
            encoded: the page (its chunks are freed when the generator ends, whatever happens).
            seq: a free sequence.

        Returns:
            The page's slot, its first token pending (as the generator's return value).

        Raises:
            DocumentError: llama.cpp failed to evaluate it (the sequence is cleared).
        """
        mtmd, lc = self._mtmd, self._lc
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
                        self._handler.mtmd_ctx, self._ctx, chunk, n_past, seq, self._n_batch,
                        last, ctypes.byref(new_n_past),
                    )
                elif not self.interleave or mtmd.mtmd_decode_use_non_causal(self._handler.mtmd_ctx, chunk):
                    # Non-causal image attention (Gemma 3) needs the whole image in one batch: not sliced.
                    rc = mtmd.mtmd_helper_decode_image_chunk(
                        self._handler.mtmd_ctx, self._ctx, chunk, embd, n_past, seq, self._n_batch,
                        ctypes.byref(new_n_past), _NO_CALLBACK, None,
                    )
                else:
                    n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                    positions = self._image_positions(chunk, n_past, n_tokens)
                    step = self._n_batch
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
            # A thinking block is free text: the schema's grammar starts at its end (see reasoning_markers).
            sampler = self._sampling.chain(request.params, None if encoded.opens_thinking else request.schema)
            slot = Slot(request, seq, sampler, n_past, n_past, 0, bytearray(), 0, encoded.started, encoded.encode_ms,
                        prompt_cells=encoded.n_tokens)
            separate = request.params.reasoning == "separate"
            slot.thinking = encoded.opens_thinking
            # A model may open the block itself; not under a grammar, which allows only the answer.
            slot.may_open = separate and not slot.thinking and request.schema is None
            slot.pending = self._sampling.sample(slot.sampler, -1)
            return slot
        except BaseException:  # a failure, or the generator closed mid-prefill (the consumer stopped)
            if sampler is not None:
                lc.llama_sampler_free(sampler)
            lc.llama_memory_seq_rm(self._memory, seq, -1, -1)
            raise
        finally:
            encoded.free(mtmd)

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
        lc = self._lc
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
