"""The batched engine's vision encoding: a request's prompt and images tokenized by libmtmd and its images run
through the vision encoder, on any thread, ahead of the request's prefill.

A request holds one page, a document's pages (one media marker and bitmap each, in page order) or none (a
text-only prompt: tokenized with no bitmap, nothing to encode). ``PageEncoder`` holds the libmtmd contexts that
encode (the chat handler's own, plus one copy of the projector per extra encoder thread). With ``overlap``,
``PageEncoder.start_threads`` encodes a few requests ahead on those threads while the decoding thread decodes the
batch; without it, ``PageEncoder.inline`` encodes each request on the decoding thread when a slot is free. Each
image's embeddings are copied out of libmtmd's buffer before the next encode overwrites it. A request too long
for a sequence is a ``context_overflow`` whose message gives the counts (``context_overflow``, ``overflow_counts``).
"""

from __future__ import annotations

import ctypes
import queue
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from medvlm_core import errors
from medvlm_core.engine.types import NOT_YET, NOT_YET_WAIT_S, RawPixels, Request
from medvlm_core.errors import DocumentError, RunError
from medvlm_core.inputs.images import to_rgb
from medvlm_core.threads import put_unless_stopped

# The request source is used up: put by the last encoder thread (or the end of ``PageEncoder.inline``).
END = object()


@dataclass
class Encoded:
    """A request whose images are encoded: libmtmd's chunks plus a copy of each media chunk's embeddings."""

    request: Request
    chunks: Any  # mtmd_input_chunks, owned: freed by free()
    embeddings: list[Any]  # per chunk: a ctypes float array for media chunks, None for text chunks
    n_tokens: int
    encode_ms: float
    started: float
    opens_thinking: bool = False  # the rendered prompt ends with the think_open marker (Qwen3-style templates)

    def free(self, mtmd: Any) -> None:
        """Free libmtmd's chunks and drop the embeddings (once prefilled, or never to be).

        Args:
            mtmd: the ``llama_cpp.mtmd_cpp`` module.
        """
        mtmd.mtmd_input_chunks_free(self.chunks)
        self.chunks = None
        self.embeddings = []


@dataclass
class Failed:
    """A request that failed before prefill (a document error), or (``request`` None) an exception from the
    request source."""

    request: Request | None
    error: BaseException


class PageEncoder:
    """The vision-encoder contexts of a batched engine and the encoding of pages with them.

    Args:
        llama_cpp: the ``llama_cpp`` module (loaded by the caller).
        llm: the loaded ``llama_cpp.Llama``.
        handler: its multimodal chat handler, with its libmtmd context initialised (the first encoder).
        workers: encoder contexts in all (at least 1).
        n_embd_inp: the width of an image embedding row (``llama_model_n_embd_inp``).
        ctx_per_seq: KV cells per sequence: a request whose tokens do not fit is a ``context_overflow``.
        render: ``(prompt, system, images)`` -> the chat-formatted prompt text (``PromptRenderer.render``).
    """

    def __init__(self, llama_cpp: Any, llm: Any, handler: Any, workers: int, n_embd_inp: int, ctx_per_seq: int,
                 render: Callable[[str, str | None, int], str]):
        self._lc = llama_cpp
        self._llm = llm
        self._handler = handler
        self._mtmd = handler._mtmd_cpp
        self._n_embd_inp = n_embd_inp
        self._ctx_per_seq = ctx_per_seq
        self._render = render
        # The handler's context is the first encoder (and serves prefill); the others are extra copies.
        self.contexts = [handler.mtmd_ctx] + [self._new_context() for _ in range(max(1, workers) - 1)]

    def _new_context(self) -> Any:
        """Another libmtmd context of the same projector on the same device, set up as the handler's own."""
        lc, llm = self._lc, self._llm
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
        """Free the extra encoder contexts (the handler's own stays with the model). Idempotent."""
        for ctx in self.contexts[1:]:
            self._mtmd.mtmd_free(ctx)
        self.contexts = self.contexts[:1]

    def encode(self, request: Request, encoder: Any = None) -> Encoded:
        """Tokenize the prompt with the request's images (one media marker and bitmap per image, none for a text-only
        prompt) and run the vision encoder over every media chunk; the embeddings are copied out.

        A request's images are encoded one after another on ``encoder`` (its thread): the other encoder threads
        take the next requests meanwhile. Host memory held by an encoded request grows with its images (one copy
        of each image's embeddings until its prefill).

        Args:
            request: the request (one page, a document's pages, or none).
            encoder: the libmtmd context to use (default: the handler's); one thread at a time per context.

        Returns:
            The encoded request, whose chunks the caller frees (``Encoded.free``).

        Raises:
            DocumentError: an image cannot be read, the request cannot be tokenized or encoded, or it does not fit
                in a sequence (``context_overflow``, its message made by ``context_overflow``: how many tokens it
                needs and how many fit).
        """
        mtmd = self._mtmd
        encoder = encoder or self._handler.mtmd_ctx
        started = time.perf_counter()
        images = request.images
        bitmaps: list[Any] = []
        chunks = None
        try:
            for image in images:
                bitmap = _bitmap(mtmd, image)
                if not bitmap:
                    raise DocumentError(errors.INFERENCE_ERROR, "libmtmd could not read the page image")
                bitmaps.append(bitmap)
            chunks = mtmd.mtmd_input_chunks_init()
            rendered = self._render(request.prompt, request.system, len(images))
            opens = request.params.reasoning == "separate" and rendered.rstrip().endswith(request.params.think_open)
            text = rendered.encode("utf-8")
            entry = mtmd.mtmd_input_text()
            entry.text, entry.text_len, entry.add_special, entry.parse_special = text, len(text), True, True
            array = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            if mtmd.mtmd_tokenize(encoder, chunks, ctypes.byref(entry), array, len(bitmaps)) != 0:
                raise DocumentError(errors.INFERENCE_ERROR, "libmtmd could not tokenize the request")
            n_tokens = mtmd.mtmd_helper_get_n_tokens(chunks)
            # KV cells, not positions (M-RoPE images take fewer positions than cells): checked before any image is
            # encoded, so a request too long for a sequence costs no encoder time.
            if n_tokens + 1 > self._ctx_per_seq:
                raise context_overflow(n_tokens, self._ctx_per_seq - 1, len(images))  # one cell kept for the answer
            encode_started = time.perf_counter()
            embeddings = []
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    embeddings.append(None)
                    continue
                if mtmd.mtmd_encode_chunk(encoder, chunk) != 0:
                    raise DocumentError(errors.INFERENCE_ERROR, "libmtmd failed to encode the page image")
                # copied before the next chunk's encode overwrites libmtmd's output buffer
                size = mtmd.mtmd_input_chunk_get_n_tokens(chunk) * self._n_embd_inp
                copy = (ctypes.c_float * size)()
                ctypes.memmove(copy, mtmd.mtmd_get_output_embd(encoder), size * ctypes.sizeof(ctypes.c_float))
                embeddings.append(copy)
            encode_ms = (time.perf_counter() - encode_started) * 1000.0
            return Encoded(request, chunks, embeddings, n_tokens, encode_ms, started, opens)
        except BaseException:
            if chunks is not None:
                mtmd.mtmd_input_chunks_free(chunks)
            raise
        finally:
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)

    def inline(self, source: Iterator[Request]) -> Iterator[Any]:
        """Encode each request when asked, on the caller's thread (no ``overlap``).

        Args:
            source: the requests.

        Yields:
            ``Encoded``, ``Failed`` (a page's error, or the source's own exception, after which it ends) or None
            (the source has nothing yet: ``NOT_YET``). Never raises.
        """
        while True:
            try:
                request = next(source, END)
            except Exception as exc:  # the request source failed: as with the encoder thread
                yield Failed(None, exc)
                return
            if request is END:
                return
            if request is NOT_YET:
                yield None  # nothing to admit now: the decode loop goes on
                continue
            try:
                yield self.encode(request)
            except DocumentError as exc:
                yield Failed(request, exc)

    def start_threads(self, source: Iterator[Request], out: "queue.Queue[Any]",
                      stop: threading.Event) -> list[threading.Thread]:
        """Start one thread per encoder context, each taking requests from ``source`` (in turn, under a lock) and
        putting them encoded into ``out``; the last one to end puts ``END``, or the source's exception as a
        ``Failed`` (after every page taken before it, which are still answered).

        Args:
            source: the requests.
            out: the bounded queue of ``Encoded`` / ``Failed`` items the decoding thread takes from.
            stop: set by the caller to end the threads (they join promptly).

        Returns:
            The started threads.
        """
        taking = threading.Lock()
        running = [len(self.contexts)]
        failure: list[BaseException] = []

        def put(item: Any) -> bool:
            return put_unless_stopped(out, item, stop)

        def work(encoder: Any) -> None:
            try:
                while not stop.is_set():
                    try:
                        with taking:
                            request = next(source, END)
                    except BaseException as exc:  # the request source itself failed: the decoding thread raises it
                        failure.append(exc)
                        return
                    if request is END:
                        return
                    if request is NOT_YET:  # more may come: the decoding thread goes on meanwhile
                        stop.wait(NOT_YET_WAIT_S)
                        continue
                    try:
                        item: Any = self.encode(request, encoder)
                    except DocumentError as exc:
                        item = Failed(request, exc)
                    if not put(item):
                        if isinstance(item, Encoded):
                            item.free(self._mtmd)
                        return
            finally:
                with taking:
                    running[0] -= 1
                    last = running[0] == 0
                if last:
                    put(Failed(None, failure[0]) if failure else END)

        threads = [threading.Thread(target=work, args=(encoder,), name=f"medvlm-encoder-{i}", daemon=True)
                   for i, encoder in enumerate(self.contexts)]
        for thread in threads:
            thread.start()
        return threads


def _bitmap(mtmd: Any, image: Any) -> Any:
    """A libmtmd bitmap of one page (NULL if libmtmd refuses it), from raw RGB pixels without another conversion.

    Raw RGB straight into libmtmd: the same pixels the single path's PNG round trip yields (PNG is lossless),
    without ~30 ms of PNG encoding and decoding per 1.3 MP page.
    """
    if isinstance(image, RawPixels):  # from the isolated engine's parent: already raw RGB
        width, height, data = image.width, image.height, image.data
    else:
        rgb = to_rgb(image)
        width, height, data = rgb.width, rgb.height, bytearray(rgb.tobytes())
    return mtmd.mtmd_bitmap_init(width, height, (ctypes.c_uint8 * len(data)).from_buffer(data))


# The wording of a request that does not fit a sequence; ``overflow_counts`` reads the two numbers back (the run
# level falls back to answering a document page by page on it, and the message is all that crosses the isolated
# engine's pipe).
_OVERFLOW = "the prompt{images} needs {needed} tokens and {fits} fit in a sequence"
_OVERFLOW_NUMBERS = re.compile(r"needs (\d+) tokens and (\d+) fit in a sequence")


def context_overflow(n_tokens: int, fits: int, images: int = 1, note: str = "") -> DocumentError:
    """The ``context_overflow`` error of a request whose prompt does not fit a sequence.

    Args:
        n_tokens: the request's prompt tokens (text and image tokens: KV cells).
        fits: the most prompt tokens a sequence takes.
        images: the request's page images (for the wording).
        note: said in parentheses after the counts (empty: nothing).

    Returns:
        The error; its message says how many tokens the prompt needs and how many fit (``overflow_counts``).
    """
    which = "" if images == 0 else " and its image" if images == 1 else f" and its {images} images"
    message = _OVERFLOW.format(images=which, needed=n_tokens, fits=fits) + (f" ({note})" if note else "")
    return DocumentError(errors.CONTEXT_OVERFLOW, f"{message}; raise --n-ctx or lower the pixel budget")


def overflow_counts(error: BaseException | str) -> tuple[int, int] | None:
    """The token counts of a ``context_overflow`` error made by ``context_overflow``.

    Args:
        error: the error, or its message.

    Returns:
        ``(needed, fits)``: the prompt's tokens and the most a sequence takes; None when the message has no counts.
    """
    match = _OVERFLOW_NUMBERS.search(getattr(error, "message", None) or str(error))
    return (int(match.group(1)), int(match.group(2))) if match else None
