"""Native-crash isolation: run the batched engine in a supervised child process.

llama.cpp can end the whole process on a bad model or input (``GGML_ABORT``, a segfault in a kernel), and
no Python ``try`` catches that. ``IsolatedEngine`` therefore loads the model in a child process (started
with multiprocessing's "spawn", so the child owns the only llama.cpp state and the parent never loads the
model or touches VRAM) and feeds it pages over pipes. When the child dies with pages in flight:

* the parent records which pages were unanswered, starts a new child (reloading the model), and re-runs
  each of those pages alone, one at a time with nothing else in flight;
* a page whose solo run also kills the child is the culprit: it gets a ``DocumentError`` of type
  ``engine_crash`` ("the inference process died (SIGABRT) while processing this page"), the child is
  started again, and the run goes on; pages that were merely in the same batch get their normal results;
* a child that answers nothing for the request timeout of the requests in flight is hung: it is ended and treated
  like a crash, and the request that hangs again alone gets a ``DocumentError`` of type ``timeout``. The timeout
  is per page (``EngineConfig.page_timeout``, by default 120 s plus 2 s per token a request may generate) times
  the request's pages (``request_timeout``): a document's request may take as long as its pages would alone;
* a request holding several pages (a document in one prompt) is one unit throughout: all its pages go to the
  child together, and a crash while it is in flight costs that request (``engine_crash``), as for one page;
* more than ``max_restarts`` crashes (hangs included) in one ``IsolatedEngine``'s life raise ``RunError``: a model or
  machine that keeps crashing should fail the run loudly instead of looping.

Error messages carry only the signal name or exit code, never document text, prompts or completions.
The child inherits the parent's stderr, so llama.cpp's own messages (and an abort's backtrace) show there.

Transport: two one-way pipes (requests parent -> child, results child -> parent) and a sender thread in
the parent that does all the writing, so a multi-MB page image blocking on a full pipe can never stop the
parent from reading results (and the child from making progress). A request's pixels, all its pages in one
block, go through shared memory (``shared_pixels``). Page keys stay in the parent; the
child only sees integer ids. At most ``window`` requests are unanswered at a time (as many as the child's
batched engine can take ahead), which keeps intake lazy and memory bounded. Neither side blocks on a source
that has nothing yet (``NOT_YET``, as ``SharedStream`` gives between chunks): the parent waits a few ms for the
child and asks again, so a page that becomes ready reaches a child with free slots at once, and the child's
stream gives its batched engine ``NOT_YET`` while its pipe is empty, so the batch goes on decoding.

Fault injection (tests only): ``IsolatedEngine(..., fault=...)`` takes a picklable callable that the child
calls with ``(intake, attempt)`` just before it takes each page (intake: 0-based, counted per
``generate_many`` call, so per stream where a ``SharedStream`` feeds several chunks through one call; attempt: 0 in the batch, 1 in the solo retry). ``medvlm_core.testing.faults`` has
the one the crash tests use, which calls llama.cpp's real ``ggml_abort``. Production code passes none.

As with any "spawn" child, the child imports the parent's ``__main__`` module (as ``__mp_main__``): a
script that creates an ``IsolatedEngine`` must keep its top-level work under ``if __name__ == "__main__":``.

This module is the supervisor (intake, retries, crash and hang accounting); the other parts are
``child_messages`` (what goes over the pipes), ``child_process`` (starting a child, writing to it, hearing from
it), ``child_loop`` (the child's side) and ``shared_pixels`` (the page pixels' shared-memory hand-off).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from medvlm_core import errors
from medvlm_core.engine.child_messages import (
    Answer,
    EndOfStream,
    Fatal,
    FaultInjector,
    PageFailed,
    PageRequest,
    describe_exit,
)
from medvlm_core.engine.child_process import Child, ChildDied, ChildHung, spawn_child
from medvlm_core.engine.shared_pixels import BlockPool, page_request, release_block
from medvlm_core.engine.types import NOT_YET, NOT_YET_WAIT_S, Engine, Request, Result
from medvlm_core.errors import DocumentError, RunError
from medvlm_core.run.params import EngineConfig, GenerationParams

__all__ = ["FaultInjector", "IsolatedEngine", "PAGE_TIMEOUT_BASE_S", "PAGE_TIMEOUT_PER_TOKEN_S"]


# The default page deadline: generous, so that only a stuck llama.cpp call reaches it (a 2-core CPU makes an
# 8B model's tokens at ~2 per second; a GPU at ~50).
PAGE_TIMEOUT_BASE_S = 120.0
PAGE_TIMEOUT_PER_TOKEN_S = 2.0


@dataclass
class _Pending:
    """An unanswered request, kept in the parent (with its pixels) until answered, for a possible retry."""

    key: Any
    message: PageRequest
    block: Any = None  # the SharedMemory holding its pixels, freed (or given back to ``pool``) by release()
    pool: "BlockPool | None" = None

    @property
    def id(self) -> int:
        return self.message.id

    def release(self) -> None:
        """Give the page's shared-memory block back to its pool, or free it (once the page is answered or given
        up). Idempotent."""
        block, self.block = self.block, None
        release_block(block, self.pool)

    def attempt(self, attempt: int) -> PageRequest:
        return dataclasses.replace(self.message, attempt=attempt)


class IsolatedEngine(Engine):
    """The batched engine in a supervised child process: a native crash costs the pages in flight a
    retry (and the culprit page an ``engine_crash`` error), never the run.

    ``start()`` (or ``with IsolatedEngine(...) as engine``) spawns the child and waits for the model to
    load; ``generate_many`` then behaves like ``BatchedEngine.generate_many``; ``close()`` stops the child.
    Calls to ``generate_many`` from several threads are serialised (``SharedStream`` merges them into one).
    """

    def __init__(self, config: EngineConfig, chat_format: str, max_restarts: int = 10, start_timeout_s: float = 300,
                 log_phi: bool = False, fault: FaultInjector | None = None):
        """
        Args:
            config: the model files and llama.cpp settings (the child loads them).
            chat_format: one of ``medvlm_core.model.files.CHAT_FORMATS``.
            max_restarts: crashes tolerated over this engine's life before ``RunError``.
            start_timeout_s: how long a child may take to start and load the model.
            log_phi: the ``MEDVLM_LOG_PHI`` debug setting, handed to the child.
            fault: tests only: a picklable fault injector the child calls before each page.
        """
        self.config = config
        self.chat_format = chat_format
        self.log_phi = log_phi
        self.fault = fault
        self.max_restarts = max_restarts
        self.start_timeout_s = start_timeout_s
        # Unanswered requests at most: the child's batch (n_parallel), its encoded-ahead queue (as many
        # again, BatchedEngine's default) and one being encoded per encoder, plus one waiting in the pipe. The
        # parent never loads llama.cpp, so it cannot ask for the default number of encoders (1 on CPU, 2 on a
        # GPU: medvlm_core.model.memory_plan.encode_workers_for): it counts the larger. Requests, not pages: a
        # document's request holds all its pages' pixels (memory_plan.document_host_mb counts them).
        n = config.n_parallel
        self.window = n + (n + (config.encode_workers or 2) if config.overlap_encode else 0) + 1
        self.reads_ahead = True  # the parent takes requests while the child computes the window's pages
        self.load_seconds = 0.0
        self.restarts = 0  # children started after the first one
        self.crashes = 0  # children that died while working
        self._child: Child | None = None
        self._open = False  # between start() and close()
        self._failed: str | None = None  # set once crashes exceeded max_restarts
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self._blocks = BlockPool(keep=self.window)  # page pixels' shared memory, reused from page to page

    @property
    def gave_up(self) -> str | None:
        """Why the engine gave up (its child kept crashing), or None."""
        return self._failed

    @property
    def loaded(self) -> bool:
        """True between ``start()`` and ``close()`` (a crashed child is replaced on the next page)."""
        return self._open

    @property
    def pixel_blocks(self) -> BlockPool:
        """The shared-memory blocks that hand page pixels to the child, reused from page to page (its ``created``
        and ``free`` counts are for measurements and tests)."""
        return self._blocks

    def start(self) -> "IsolatedEngine":
        """Spawn the child and wait until it has loaded the model (idempotent).

        Returns:
            The engine itself.

        Raises:
            RunError: the child's own message if the model cannot be loaded, or if the child dies or times
                out while loading.
        """
        with self._lock:
            if self._child is None:
                self._failed = None
                self._child = self._spawn()
            if self._blocks.closed:  # started again after close()
                self._blocks = BlockPool(keep=self.window)
            self._open = True
            return self

    def close(self) -> None:
        """Stop the child (killing it if it does not exit within a few seconds). Idempotent."""
        self._open = False  # checked by a generate_many running in another thread before it restarts anything
        child, self._child = self._child, None
        if child is not None:
            child.stop(graceful=True)
        self._blocks.close()  # after the child: it may still be reading a page's block until it stops

    def _spawn(self) -> Child:
        child, self.load_seconds = spawn_child(self.config, self.chat_format, self.log_phi, self.fault,
                                               self.start_timeout_s)
        return child

    def _crashed(self, how: str) -> None:
        """Count a crash of the current child and drop it; past ``max_restarts`` the engine gives up (closes)
        and the next ``_ready_child`` raises RunError. The replacement is started lazily by ``_ready_child``,
        so that a crash is counted before the culprit's error row is handed out."""
        self.crashes += 1
        if self._child is not None:
            self._child.stop(graceful=False)
            self._child = None
        if self.crashes > self.max_restarts and not self._failed:
            crashes = f"{self.crashes} crash" + ("es" if self.crashes != 1 else "")
            self._failed = (f"the inference process keeps dying ({crashes}, the last by {how}; at most "
                            f"{self.max_restarts} tolerated); see llama.cpp's messages above for the cause")
            self.close()

    def _ready_child(self) -> Child:
        """The running child, started anew if it crashed or was stopped; RunError once given up or closed."""
        if self._failed:
            raise RunError(self._failed)
        if self._child is not None and not self._child.process.is_alive():  # died while idle between calls
            self._crashed(describe_exit(self._child.process.exitcode))
            if self._failed:
                raise RunError(self._failed)
        if not self._open:
            raise RunError("the IsolatedEngine is not started (or was closed); call start() first")
        if self._child is None:  # after a crash, an early stop or a fatal error
            self._child = self._spawn()
            self.restarts += 1
        return self._child

    def generate_many(self, requests: Iterable[Request]) -> Iterator[tuple[Any, Result]]:
        """Answer every request, yielding ``(key, Generation or DocumentError)`` as each finishes.

        As ``BatchedEngine.generate_many``: requests are taken lazily (at most ``window`` unanswered), and
        an exception raised by the iterable propagates after the pages in flight are finished. In
        addition, a page whose processing kills the child twice (in its batch, then alone) is answered
        with ``DocumentError(engine_crash)``; RunError after more than ``max_restarts`` crashes.
        """
        with self._lock:
            yield from self._generate(iter(requests))

    def _generate(self, source: Iterator[Request]) -> Iterator[tuple[Any, Result]]:
        child = self._ready_child()
        pending: dict[int, _Pending] = {}  # in intake order
        intake = 0
        exhausted = False
        ended = False  # the current child's stream is closed (it was sent "end")
        source_error: BaseException | None = None
        heard = time.monotonic()  # the silence clock: the child's last message, or the first page put in flight
        try:
            while True:
                not_yet = False  # the source has no page now but may have more soon: ask again shortly
                while not exhausted and len(pending) < self.window:
                    try:
                        request = next(source)
                        if request is NOT_YET:
                            if pending:  # wait briefly for the child below, then ask again
                                not_yet = True
                                break
                            time.sleep(NOT_YET_WAIT_S)
                            continue
                        if not pending:
                            heard = time.monotonic()
                        item = _Pending(request.key, *page_request(next(self._ids), intake, request, self._blocks),
                                        pool=self._blocks)
                    except StopIteration:
                        exhausted = True
                        break
                    except Exception as exc:  # the source (or a page it gave) failed: finish what is in flight first
                        source_error, exhausted = exc, True
                        break
                    intake += 1
                    pending[item.id] = item
                    child.send(item.message)
                if exhausted and not ended:
                    child.send(EndOfStream())  # without it the child would wait for more pages with slots free
                    ended = True
                if not pending:
                    if source_error is not None:
                        raise source_error
                    return
                try:
                    message = self._receive(child, pending, heard, not_yet)
                    if message is None:  # no message within the short wait: ask the source again
                        continue
                    heard = time.monotonic()
                except (ChildDied, ChildHung) as failure:
                    if not self._open:  # close() from another thread, not a crash
                        raise RunError("the IsolatedEngine was closed while generating") from None
                    self._crashed(_how(failure))
                    if self._failed:
                        raise RunError(self._failed) from None
                    yield from self._retry_alone(pending)
                    if exhausted:
                        ended = True  # the solo streams were each closed; nothing is open
                    else:
                        child, ended = self._ready_child(), False
                    continue
                answered = self._answer(message, pending)
                if answered is not None:
                    yield answered
        finally:
            if self._child is not None and self._child is child and (pending or not ended):
                if pending:
                    # The consumer stopped early (or an error): pages are still in flight in the child. Ending
                    # it is immediate; the next call starts a new one.
                    self._child.stop(graceful=False)
                    self._child = None
                else:
                    child.send(EndOfStream())
            for item in pending.values():  # unanswered (an error, or the consumer stopped): their blocks go
                item.release()  # (after the child that could still read them has stopped)

    def _receive(self, child: Child, pending: dict[int, _Pending], heard: float, short: bool) -> Any:
        """The child's next message; with ``short``, None when none comes within ``NOT_YET_WAIT_S`` (the caller
        asks its source again, so that a page that becomes ready is sent to a child with free slots at once
        rather than after its next answer).

        Raises:
            ChildDied: the child exited.
            ChildHung: it sent nothing for the longest request timeout of the requests in flight, counted from
                ``heard``.
        """
        deadline = max(self._timeout(p) for p in pending.values())
        left = deadline - (time.monotonic() - heard)
        try:
            return child.receive(max(0.0, min(left, NOT_YET_WAIT_S) if short else left))
        except ChildHung:
            if short and time.monotonic() - heard < deadline:
                return None
            raise ChildHung(deadline) from None

    def _answer(self, message: Any, pending: dict[int, _Pending]) -> tuple[Any, Result] | None:
        """The (key, result) a child message answers, None for bookkeeping messages and stale answers."""
        if isinstance(message, Fatal):
            if self._child is not None:
                self._child.stop(graceful=False)
                self._child = None
            raise RunError(message.message)
        if not isinstance(message, (Answer, PageFailed)):
            return None
        item = pending.pop(message.id, None)
        if item is None:  # an answer from a stream abandoned earlier
            return None
        item.release()
        if isinstance(message, Answer):
            return item.key, message.generation
        return item.key, DocumentError(message.error_type, message.message)

    def page_timeout(self, params: GenerationParams) -> float:
        """How long the child may go without answering while a one-page request with ``params`` is in flight.

        Args:
            params: the page's sampling parameters.

        Returns:
            Seconds: the config's ``page_timeout``, else ``PAGE_TIMEOUT_BASE_S`` plus ``PAGE_TIMEOUT_PER_TOKEN_S``
            per token the page may generate (``max_tokens``, or ``n_ctx`` when it is -1).
        """
        if self.config.page_timeout:
            return self.config.page_timeout
        tokens = self.config.n_ctx if params.max_tokens == -1 else params.max_tokens
        return PAGE_TIMEOUT_BASE_S + PAGE_TIMEOUT_PER_TOKEN_S * tokens

    def request_timeout(self, params: GenerationParams, images: int) -> float:
        """How long the child may go without answering while a request with ``params`` and ``images`` pages is in
        flight: ``page_timeout`` times the number of pages (a text-only request counts as one).

        Scaled linearly because a document's request does the work of its pages in one sequence (each page's
        image encoded and prefilled in turn; the prompt, and so each decode step, grows with them) before it can
        answer, and with nothing in between to show progress. A page's deadline is already generous (it catches a
        stuck llama.cpp call, not a slow one), so the product is too, and a one-page request keeps its deadline.

        Args:
            params: the request's sampling parameters.
            images: its page images.

        Returns:
            Seconds.
        """
        return self.page_timeout(params) * max(1, images)

    def _timeout(self, item: _Pending) -> float:
        return self.request_timeout(item.message.params, item.message.images)

    def _retry_alone(self, pending: dict[int, _Pending]) -> Iterator[tuple[Any, Result]]:
        """After a crash (or a hang) with ``pending`` in flight: run each of them alone in a new child, once.
        Alone, a second crash names its culprit (``engine_crash``), a second hang too (``timeout``); the pages that
        were only in the same batch get their answers."""
        suspects = list(pending.values())
        pending.clear()
        try:
            yield from self._retry_each(suspects)
        finally:
            for item in suspects:
                item.release()

    def _retry_each(self, suspects: list[_Pending]) -> Iterator[tuple[Any, Result]]:
        for item in suspects:
            child = self._ready_child()
            child.send(item.attempt(1))
            child.send(EndOfStream())
            solo = {item.id: item}
            while solo:
                try:
                    message = child.receive(self._timeout(item))
                except (ChildDied, ChildHung) as failure:
                    self._crashed(_how(failure))
                    yield item.key, _culprit_error(failure, item.message.images)
                    if self._failed:  # the culprit's row first, then fail the run loudly
                        raise RunError(self._failed) from None
                    break
                answered = self._answer(message, solo)
                if answered is not None:
                    yield answered


def _culprit_error(failure: Exception, images: int) -> DocumentError:
    """The error of a request that killed (or hung) the child again alone: ``timeout`` or ``engine_crash``, worded
    for a page, a request of several pages or a text-only prompt."""
    what = "this page" if images == 1 else f"this request of {images} pages" if images else "this text-only prompt"
    if isinstance(failure, ChildHung):
        timeout = "the page timeout" if images == 1 else f"the request timeout for {what}"
        return DocumentError(errors.TIMEOUT, f"no answer within {timeout} ({failure.args[0]:.0f} s); the "
                             "inference process was ended and restarted")
    return DocumentError(errors.ENGINE_CRASH, f"the inference process died ({failure.args[0]}) while processing {what}")


def _how(failure: Exception) -> str:
    """A child's failure in words: its exit (``SIGABRT``) or its silence."""
    if isinstance(failure, ChildHung):
        return f"no answer within {failure.args[0]:.0f} s"
    return failure.args[0]
