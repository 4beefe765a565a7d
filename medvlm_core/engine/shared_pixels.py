"""Handing a request's page pixels from the isolated engine's parent to its child through shared memory.

The parent writes a request's raw RGB pixels once into one POSIX shared-memory block (``page_request``): all of
its pages one after another, in page order, so a document's request takes one block as a page's does. It sends
only the block's name and the pages' sizes; the child copies them out (``read_pages``). That spares pickling ~4 MB
per page through the pipe (docs/benchmarks.md, the hand-off). Blocks come from a ``BlockPool`` and go back to it
when the request is answered (``release_block``). Where no block can be made (``/dev/shm`` full or absent) the
pixels go through the pipe instead. A text-only request takes no block.
"""

from __future__ import annotations

import os
import secrets
import threading
from multiprocessing import shared_memory
from typing import Any

from medvlm_core.engine.child_messages import PageRequest
from medvlm_core.engine.types import RawPixels, Request
from medvlm_core.inputs.images import to_rgb


def _free_block(block: Any) -> None:
    block.close()
    try:
        block.unlink()
    except FileNotFoundError:
        pass


class BlockPool:
    """The parent's shared-memory blocks for page pixels, reused from page to page.

    A new block costs its memory's page faults and zeroing on first write (about 5 ms for a 1000x1300 page on
    this project's VM, docs/benchmarks.md's hand-off) where a reused one costs a copy (under 1 ms). A block is the
    child's to read only while its page is unanswered: it comes back here when the page is answered or given
    up, and the next page's pixels go in it. At most ``keep`` free blocks are kept (the engine's window: as
    many as can be in flight at once); the rest, and all of them at ``close()``, are unlinked.

    Args:
        keep: free blocks kept for reuse.
    """

    # Sizes are rounded up to this, so pages of nearly the same size share blocks.
    GRAIN = 1 << 20

    def __init__(self, keep: int):
        self.keep = keep
        self._free: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False
        self.created = 0  # blocks made (measurements, tests)

    def take(self, size: int) -> Any:
        """A block of at least ``size`` bytes: the smallest free one that fits, else a new one.

        Args:
            size: bytes needed.

        Returns:
            A ``SharedMemory`` named ``shared_block_prefix() + hex``.

        Raises:
            OSError: no block can be made (``/dev/shm`` full or absent).
        """
        with self._lock:
            fits = [b for b in self._free if b.size >= size]
            if fits:
                block = min(fits, key=lambda b: b.size)
                self._free.remove(block)
                return block
        block = shared_memory.SharedMemory(create=True, size=-(-max(1, size) // self.GRAIN) * self.GRAIN,
                                           name=shared_block_prefix() + secrets.token_hex(8))
        self.created += 1
        return block

    def give(self, block: Any) -> None:
        """Take a block back: kept for the next page, or unlinked when the pool is full or closed.

        Args:
            block: a block ``take`` gave.
        """
        with self._lock:
            if not self._closed and len(self._free) < self.keep:
                self._free.append(block)
                return
        _free_block(block)

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._closed

    @property
    def free(self) -> int:
        """Free blocks held now."""
        with self._lock:
            return len(self._free)

    def close(self) -> None:
        """Unlink every free block; blocks given back later are unlinked too. Idempotent."""
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
        for block in free:
            _free_block(block)


def release_block(block: Any, pool: BlockPool | None = None) -> None:
    """Hand back a page's block once the page is answered or given up: to ``pool``, else freed (unlinked).

    Args:
        block: the block ``page_request`` gave, or None (the pixels went through the pipe: nothing to do).
        pool: the pool it came from; None for a block made on its own.
    """
    if block is None:
        return
    if pool is not None:
        pool.give(block)
    else:
        _free_block(block)


def page_request(rid: int, intake: int, request: Request, pool: BlockPool | None = None) -> tuple[PageRequest, Any]:
    """What the child needs of a request, without its key, and the shared-memory block holding its pixels.

    Pixels are raw RGB (BatchedEngine converts to RGB anyway, and ``tobytes`` of a palette image alone would lose
    its palette), every page's written once, one after another, into one shared-memory block (from ``pool``, else a
    new one) that the child reads in place: no pickling of ~4 MB per page through the pipe (docs/benchmarks.md, the
    hand-off). Where no block can be made (``/dev/shm`` full or absent) they go through the pipe. A text-only
    request has neither.

    Args:
        rid: the id the child answers with.
        intake: the request's 0-based place in its stream (for fault injection).
        request: the request (one page, a document's pages, or none).
        pool: where to take the block from; None: a new block, which the caller frees (``release_block``).

    Returns:
        ``(message, block)``: the message for the child (attempt 0) and the block, or None when the pixels are in
        the message itself (or there are none).
    """
    images = [to_rgb(image) for image in request.images]
    sizes = tuple(image.size for image in images)
    total = sum(w * h * 3 for w, h in sizes)
    block = None
    pixels = None
    if images:
        try:
            block = (pool or BlockPool(keep=0)).take(total)  # keep=0: a new block, the caller frees it
            offset = 0
            for image in images:  # page by page: no joined copy of a whole document in this process
                data = image.tobytes()
                block.buf[offset: offset + len(data)] = data
                offset += len(data)
        except OSError:
            if block is not None:
                _free_block(block)
            block = None
            pixels = b"".join(image.tobytes() for image in images)
    message = PageRequest(rid, intake, 0, sizes, pixels, request.prompt, request.params, request.schema,
                          request.system, block.name if block else None)
    return message, block


def shared_block_prefix() -> str:
    """How this process's shared-memory blocks are named (then random hex), so that an operator, or a test,
    sees whose a block in ``/dev/shm`` is.

    Returns:
        ``medvlm_<pid>_``.
    """
    return f"medvlm_{os.getpid()}_"


def read_pixels(message: PageRequest) -> bytearray:
    """The request's pixels, in the child: from the pipe, or copied out of the parent's shared-memory block (closed
    here; the parent unlinks it). Spawned children share the parent's resource tracker, so attaching registers
    nothing new.

    Args:
        message: the request.

    Returns:
        Raw RGB bytes of every page, one after another (``width * height * 3`` each; empty for a text-only request).
    """
    return bytearray().join(_read(message))


def read_pages(message: PageRequest) -> tuple[RawPixels, ...]:
    """The request's pages as the batched engine takes them, in the child (each page's pixels copied once).

    Args:
        message: the request.

    Returns:
        One ``RawPixels`` per page, in page order (none for a text-only request).
    """
    return tuple(RawPixels(w, h, data) for (w, h), data in zip(message.sizes, _read(message)))


def _read(message: PageRequest) -> list[bytearray]:
    """Each page's raw RGB bytes, copied out of the pipe's bytes or the shared-memory block (closed after)."""
    sizes = [w * h * 3 for w, h in message.sizes]
    if message.shared is None:
        source: Any = memoryview(message.pixels or b"")
        block = None
    else:
        block = shared_memory.SharedMemory(name=message.shared)
        source = block.buf
    try:
        out, offset = [], 0
        for size in sizes:
            out.append(bytearray(source[offset: offset + size]))
            offset += size
        return out
    finally:
        if block is not None:
            del source  # no export of the block's buffer may outlive it: close() refuses then
            block.close()
