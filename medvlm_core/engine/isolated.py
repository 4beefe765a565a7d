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
* a child that answers nothing for the page timeout (``EngineConfig.page_timeout``, by default 120 s plus 2 s per
  token a page may generate) while pages are in flight is hung: it is ended and treated like a crash, and the
  page that hangs again alone gets a ``DocumentError`` of type ``timeout``;
* more than ``max_restarts`` crashes (hangs included) in one ``IsolatedEngine``'s life raise ``RunError``: a model or
  machine that keeps crashing should fail the run loudly instead of looping.

Error messages carry only the signal name or exit code, never document text, prompts or completions.
The child inherits the parent's stderr, so llama.cpp's own messages (and an abort's backtrace) show there.

Transport: two one-way pipes (requests parent -> child, results child -> parent) and a sender thread in
the parent that does all the writing, so a multi-MB page image blocking on a full pipe can never stop the
parent from reading results (and the child from making progress). Page keys stay in the parent; the
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
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import multiprocessing
import multiprocessing.connection as mp_connection
import os
from multiprocessing import shared_memory
import queue
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from medvlm_core import errors
from medvlm_core.run.params import EngineConfig, GenerationParams
from medvlm_core.engine.types import NOT_YET, NOT_YET_WAIT_S, Engine, Generation, RawPixels, Request, Result
from medvlm_core.errors import DocumentError, RunError, error_detail, short_message
from medvlm_core.inputs.images import to_rgb
from medvlm_core.isolated_child import start_child

# A fault injector (tests only): called in the child with (intake, attempt) before each page is taken.
FaultInjector = Callable[[int, int], None]


@contextlib.contextmanager
def _main_not_rerun() -> Iterator[None]:
    """Start a spawned child without running the user's ``__main__`` script in it again.

    ``spawn`` re-imports the parent's main module in the child; a plain script that loads a model at its top
    level (no ``if __name__ == "__main__":`` guard, as in the README's examples) would then load it again in the
    child and fail there. The child runs only ``_child_main`` from this module, so the main module is hidden from
    multiprocessing's preparation data while the child starts (it reads them synchronously in ``start()``).
    """
    main = sys.modules.get("__main__")
    saved = {name: getattr(main, name) for name in ("__file__", "__spec__") if main is not None and hasattr(main, name)}
    try:
        for name in saved:
            setattr(main, name, None)
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)


# -- the messages between parent and child (pickled over the pipes) --------------------------------
@dataclass(frozen=True)
class PageRequest:
    """Parent -> child: one page. Pixels as raw RGB bytes in a shared-memory block named ``shared`` (the parent
    owns it until the page is answered), or in ``pixels`` when no block could be made; the page's key stays in
    the parent."""

    id: int
    intake: int
    attempt: int  # 0 in a stream, 1 in the solo retry after a crash
    size: tuple[int, int]
    pixels: bytes | None
    prompt: str
    params: GenerationParams
    schema: dict | None
    system: str | None = None
    shared: str | None = None


@dataclass(frozen=True)
class EndOfStream:
    """Parent -> child: no more pages in the current stream (the child finishes what it has)."""


@dataclass(frozen=True)
class Stop:
    """Parent -> child: exit."""


@dataclass(frozen=True)
class Ready:
    """Child -> parent, once: the model is loaded."""

    load_seconds: float


@dataclass(frozen=True)
class LoadFailed:
    """Child -> parent, once: the model could not be loaded (a one-line, PHI-free message)."""

    message: str


@dataclass(frozen=True)
class Answer:
    """Child -> parent: a page's completion."""

    id: int
    generation: Generation


@dataclass(frozen=True)
class PageFailed:
    """Child -> parent: a page's DocumentError."""

    id: int
    error_type: str
    message: str


@dataclass(frozen=True)
class Idle:
    """Child -> parent: the current stream is done."""


@dataclass(frozen=True)
class Fatal:
    """Child -> parent: the batched engine raised something other than a DocumentError; the child exits."""

    message: str


_STOP_WAIT_S = 5.0  # a clean child exits in well under a second; past this it is killed


def describe_exit(exitcode: int | None) -> str:
    """A process exit status in words: a signal name (``SIGSEGV``) or ``exit code N``."""
    if exitcode is None:
        return "no exit status"
    if exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


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
        if block is None:
            return
        if self.pool is not None:
            self.pool.give(block)
        else:
            _free_block(block)

    def attempt(self, attempt: int) -> PageRequest:
        return dataclasses.replace(self.message, attempt=attempt)


class _Died(Exception):
    """The child process ended (its description in ``args[0]``)."""


class _Hung(Exception):
    """The child sent nothing for ``args[0]`` seconds while pages were in flight."""


# The default page deadline: generous, so that only a stuck llama.cpp call reaches it (a 2-core CPU makes an
# 8B model's tokens at ~2 per second; a GPU at ~50).
PAGE_TIMEOUT_BASE_S = 120.0
PAGE_TIMEOUT_PER_TOKEN_S = 2.0


class _Child:
    """One running child process, its pipe ends and the sender thread that writes its requests."""

    def __init__(self, process: Any, requests: Any, results: Any):
        self.process = process
        self.requests = requests  # the parent's sending end
        self.results = results  # the parent's receiving end
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=_send_loop, args=(self._outbox, requests),
                                        name="medvlm-isolated-sender", daemon=True)
        self._sender.start()

    def send(self, message: Any) -> None:
        """Queue a message for the child (never blocks: the sender thread does the writing)."""
        self._outbox.put(message)

    def receive(self, timeout: float | None = None) -> Any:
        """The child's next message; ``_Died`` once it has exited and every message it sent has been read;
        ``_Hung`` when it sent nothing for ``timeout`` seconds."""
        sentinel = self.process.sentinel
        while True:
            ready = mp_connection.wait([self.results, sentinel], timeout)
            if not ready:
                raise _Hung(timeout)
            # Read what the child wrote before it died first: those pages did finish.
            if self.results in ready or self.results.poll():
                try:
                    return self.results.recv()
                except (EOFError, OSError):
                    break
                except Exception:  # a message cut short by the death: the death is what counts
                    break
            if sentinel in ready:
                break
        self.process.join(_STOP_WAIT_S)
        if self.process.is_alive():  # its result pipe closed but it lives on: unusable, end it
            self.process.kill()
            self.process.join()
        raise _Died(describe_exit(self.process.exitcode))

    def stop(self, graceful: bool) -> None:
        """End the child: ask it to stop (``graceful``) and wait a few seconds, else kill it."""
        if graceful and self.process.is_alive():
            self.send(Stop())
        self._outbox.put(None)  # ends the sender thread once it has written what is queued
        if graceful:
            self._sender.join(_STOP_WAIT_S)
            self.process.join(_STOP_WAIT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._sender.join(_STOP_WAIT_S)  # a write to a dead child fails at once, ending the thread
        self.requests.close()
        self.results.close()


def _send_loop(outbox: queue.SimpleQueue, connection: Any) -> None:
    while True:
        message = outbox.get()
        if message is None:
            return
        try:
            connection.send(message)
        except (OSError, ValueError):  # the child is gone; the receiving side notices its death
            return


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
        # GPU: medvlm_core.model.memory_plan.encode_workers_for): it counts the larger.
        n = config.n_parallel
        self.window = n + (n + (config.encode_workers or 2) if config.overlap_encode else 0) + 1
        self.reads_ahead = True  # the parent takes requests while the child computes the window's pages
        self.load_seconds = 0.0
        self.restarts = 0  # children started after the first one
        self.crashes = 0  # children that died while working
        self._child: _Child | None = None
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

    def _spawn(self) -> _Child:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked llama.cpp or thread state
        request_recv, request_send = ctx.Pipe(duplex=False)
        result_recv, result_send = ctx.Pipe(duplex=False)
        # The child starts outside this package, so that it loads llama.cpp before numpy (isolated_child).
        process = ctx.Process(target=start_child,
                              args=(f"{__name__}:_child_main", self.config, self.chat_format, self.log_phi, self.fault,
                                    request_recv, result_send),
                              name="medvlm-inference", daemon=True)
        started = time.perf_counter()
        with _main_not_rerun():
            process.start()
        # Only the child holds these ends now, so its death reads as EOF here.
        request_recv.close()
        result_send.close()
        child = _Child(process, request_send, result_recv)
        model = self.config.model_path
        if not mp_connection.wait([result_recv, process.sentinel], self.start_timeout_s):
            child.stop(graceful=False)
            raise RunError(f"the inference process did not load {model} within {self.start_timeout_s:g} s")
        try:
            message = child.receive()
        except _Died as died:
            child.stop(graceful=False)
            raise RunError(f"the inference process died ({died.args[0]}) while loading {model}") from None
        if not isinstance(message, Ready):
            child.stop(graceful=True)
            raise RunError(getattr(message, "message", "the inference process sent no ready message"))
        self.load_seconds = time.perf_counter() - started
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

    def _ready_child(self) -> _Child:
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
                        item = _Pending(request.key, *_page_request(next(self._ids), intake, request, self._blocks),
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
                except (_Died, _Hung) as failure:
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

    def _receive(self, child: _Child, pending: dict[int, _Pending], heard: float, short: bool) -> Any:
        """The child's next message; with ``short``, None when none comes within ``NOT_YET_WAIT_S`` (the caller
        asks its source again, so that a page that becomes ready is sent to a child with free slots at once
        rather than after its next answer).

        Raises:
            _Died: the child exited.
            _Hung: it sent nothing for the page timeout of the pages in flight, counted from ``heard``.
        """
        deadline = max(self.page_timeout(p.message.params) for p in pending.values())
        left = deadline - (time.monotonic() - heard)
        try:
            return child.receive(max(0.0, min(left, NOT_YET_WAIT_S) if short else left))
        except _Hung:
            if short and time.monotonic() - heard < deadline:
                return None
            raise _Hung(deadline) from None

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
        """How long the child may go without answering while a page with ``params`` is in flight.

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
                    message = child.receive(self.page_timeout(item.message.params))
                except (_Died, _Hung) as failure:
                    self._crashed(_how(failure))
                    if isinstance(failure, _Hung):
                        yield item.key, DocumentError(
                            errors.TIMEOUT, f"no answer within the page timeout ({failure.args[0]:.0f} s); the "
                            "inference process was ended and restarted")
                    else:
                        yield item.key, DocumentError(
                            errors.ENGINE_CRASH, f"the inference process died ({failure.args[0]}) while processing this page"
                        )
                    if self._failed:  # the culprit's row first, then fail the run loudly
                        raise RunError(self._failed) from None
                    break
                answered = self._answer(message, solo)
                if answered is not None:
                    yield answered


def _free_block(block: Any) -> None:
    block.close()
    try:
        block.unlink()
    except FileNotFoundError:
        pass


class BlockPool:
    """The parent's shared-memory blocks for page pixels, reused from page to page.

    A new block costs its memory's page faults and zeroing on first write (about 5 ms for a 1000x1300 page on
    this project's VM, BENCHMARKS.md's hand-off) where a reused one costs a copy (under 1 ms). A block is the
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


def _how(failure: Exception) -> str:
    """A child's failure in words: its exit (``SIGABRT``) or its silence."""
    if isinstance(failure, _Hung):
        return f"no answer within {failure.args[0]:.0f} s"
    return failure.args[0]


def _page_request(rid: int, intake: int, request: Request, pool: BlockPool | None = None) -> tuple[PageRequest, Any]:
    """What the child needs of a request, without its key, and the shared-memory block holding its pixels.

    Pixels are raw RGB (BatchedEngine converts to RGB anyway, and ``tobytes`` of a palette image alone would lose
    its palette), written once into a shared-memory block (from ``pool``, else a new one) that the child reads in
    place: no pickling of ~4 MB per page through the pipe (BENCHMARKS.md, the hand-off). Where no block can be
    made (``/dev/shm`` full or absent) they go through the pipe.
    """
    image = to_rgb(request.image)
    data = image.tobytes()
    block = None
    try:
        block = (pool or BlockPool(keep=0)).take(len(data))  # keep=0: a new block, the caller frees it
        block.buf[: len(data)] = data
    except OSError:
        if block is not None:
            _free_block(block)
        block = None
    message = PageRequest(rid, intake, 0, image.size, None if block else data, request.prompt, request.params,
                          request.schema, request.system, block.name if block else None)
    return message, block


def shared_block_prefix() -> str:
    """How this process's shared-memory blocks are named (then random hex), so that an operator, or a test,
    sees whose a block in ``/dev/shm`` is.

    Returns:
        ``medvlm_<pid>_``.
    """
    return f"medvlm_{os.getpid()}_"


def _shared_pixels(message: PageRequest) -> bytearray:
    """The page's pixels: from the pipe, or copied out of the parent's shared-memory block (closed here; the
    parent unlinks it). Spawned children share the parent's resource tracker, so attaching registers nothing new."""
    if message.shared is None:
        return bytearray(message.pixels or b"")
    block = shared_memory.SharedMemory(name=message.shared)
    try:
        return bytearray(block.buf[: message.size[0] * message.size[1] * 3])
    finally:
        block.close()


# -- the child --------------------------------------------------------------------------------------

class _Stream:
    """The child's side of one stream: Requests read from the pipe until EndOfStream (or Stop / EOF)."""

    def __init__(self, connection: Any, first: Any, fault: FaultInjector | None):
        self.connection = connection
        self.first = first
        self.fault = fault
        self.stopped = False  # the parent asked the child to stop (or went away)

    def __iter__(self) -> Iterator[Request | None]:
        message = self.first
        while True:
            if message is None:
                # Nothing in the pipe yet: NOT_YET, so that the batched engine goes on decoding the pages it has
                # (blocking here would stall an inline-encoder engine's decode loop while the parent waits for
                # an answer) and asks again.
                yield NOT_YET
            elif isinstance(message, EndOfStream):
                return
            elif not isinstance(message, PageRequest):  # Stop
                self.stopped = True
                return
            else:
                if self.fault is not None:
                    self.fault(message.intake, message.attempt)  # tests: the pages before this one are in flight
                pixels = RawPixels(message.size[0], message.size[1], _shared_pixels(message))  # straight to libmtmd
                yield Request(message.id, pixels, message.prompt, message.params, message.schema, message.system)
            try:
                message = self.connection.recv() if self.connection.poll() else None
            except (EOFError, OSError):  # the parent is gone
                self.stopped = True
                return


def _child_main(config: EngineConfig, chat_format: str, log_phi: bool, fault: FaultInjector | None,
                requests: Any, results: Any) -> None:
    """The child process: load the model, report ready, then answer streams of requests until stopped."""
    # Ctrl-C reaches the whole process group; the parent decides when the child stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from medvlm_core.engine.batched import BatchedEngine
    from medvlm_core.engine.llama import VisionEngine

    engine = batched = None
    try:
        try:
            # The child answers every page through the batched context; the engine's own context only has
            # to exist (llama-cpp-python makes one per model), so keep it small instead of another n_ctx of KV.
            small = config.replace(n_ctx=max(256, config.n_batch))
            engine = VisionEngine(small, chat_format, log_phi=log_phi).start()
            batched = BatchedEngine(engine, n_seq=config.n_parallel, ctx_per_seq=config.n_ctx,
                                    overlap=config.overlap_encode, encode_workers=config.encode_workers,
                                    interleave_prefill=config.interleave_prefill)
        except RunError as exc:
            results.send(LoadFailed(str(exc)))
            return
        except Exception as exc:  # e.g. ValueError for a bad mmproj; no traceback: the parent shows one line
            # Loading sees no document, so llama-cpp-python's text (file paths, reasons) carries no PHI.
            results.send(LoadFailed(f"llama.cpp could not load {config.model_path} with {config.mmproj_path} "
                                    f"({type(exc).__name__}: {short_message(exc)})"))
            return
        results.send(Ready(engine.load_seconds))
        while True:
            try:
                message = requests.recv()
            except (EOFError, OSError):
                return
            if isinstance(message, Stop):
                return
            stream = _Stream(requests, message, fault)
            try:
                for rid, result in batched.generate_many(stream):
                    if isinstance(result, DocumentError):
                        results.send(PageFailed(rid, result.error_type, result.message))
                    else:
                        results.send(Answer(rid, result))
            except (BrokenPipeError, EOFError):
                return
            except RunError as exc:
                results.send(Fatal(str(exc)))
                return
            except Exception as exc:
                results.send(Fatal(f"the batched engine failed{error_detail(exc, log_phi)}"))
                return
            if stream.stopped:
                return
            results.send(Idle())
    except (BrokenPipeError, EOFError, OSError):  # the parent went away mid-send
        return
    finally:
        if batched is not None:
            batched.close()
        if engine is not None:
            engine.close()
