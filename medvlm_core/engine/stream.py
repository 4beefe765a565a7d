"""One batch alive across chunks: the chunk tasks of a worker feed one running stream of the engine.

Without it, each inference task (chunk) calls ``generate_many`` on its own and the engine serialises the calls:
as a chunk tails off, the batch empties to its last page and the next chunk starts from an empty batch. A
``SharedStream`` in front of the engine runs a single ``generate_many`` of the engine beneath (on a driver
thread) for as long as some caller has pages to give or pages are in flight, and each caller's
``generate_many`` hands its pages to that stream and receives its own results back:

* the oldest caller's pages go in first; the next caller's pages fill the slots as soon as the oldest has none
  left to give, so while one chunk's last pages decode the next chunk's first ones are already in the batch
  (Prefect's task runner keeps two chunks of a worker running at once);
* each caller gets exactly the results of its own requests (their keys, its own ``DocumentError`` rows), so
  rows are still staged per chunk and the exactly-once bookkeeping is unchanged;
* an exception raised by a caller's request iterable reaches that caller only, after its pages in flight are
  answered; an engine failure (``RunError``: the model is unusable) reaches every caller of that stream;
* a caller that stops early is forgotten: its pages in flight finish and their results are dropped;
* while no caller has pages left to give but pages are in flight, the stream tells the engine ``NOT_YET``
  (the engine goes on decoding and asks again), so a chunk that joins before the last pages are answered
  still finds the batch running; once nothing is in flight the stream ends (the engine's call returns) and the
  next call starts a new one.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from medvlm_core.engine.types import NOT_YET, Engine, Request, Result, takes_requests_ahead
from medvlm_core.errors import RunError

_DONE = object()


@dataclasses.dataclass
class _Broken:
    """The stream's engine failed: the caller raises ``error``."""

    error: BaseException


@dataclasses.dataclass(eq=False)
class _Feed:
    """One caller of ``generate_many``: its requests, what was taken from them and answered, its results."""

    ticket: int
    requests: Iterator[Request]
    driver: int  # the stream (driver run) that takes its pages
    results: "queue.SimpleQueue[Any]" = dataclasses.field(default_factory=queue.SimpleQueue)
    giving: bool = True  # its iterable may give more pages
    taken: int = 0
    answered: int = 0
    error: BaseException | None = None  # its iterable raised: re-raised to it once its pages are answered


class SharedStream(Engine):
    """Concurrent ``generate_many`` calls (a worker's chunk tasks) share one running stream of ``engine``.

    Args:
        engine: the engine beneath (a ``BatchedEngine`` or an ``IsolatedEngine``), started or not.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        # The callers' requests are read where the engine beneath reads its own: on its threads if it reads ahead.
        self.reads_ahead = takes_requests_ahead(engine)
        self._lock = threading.Lock()
        self._tickets = itertools.count()
        self._drivers = itertools.count(1)
        self._feeds: dict[int, _Feed] = {}  # by ticket, oldest first
        self._driver = 0  # the stream that takes new callers' pages; 0: none (the next caller starts one)
        self._closed = False
        self._threads: list[threading.Thread] = []  # the stream threads started (finished ones pruned)
        # Measurements: calls joined, and streams of the engine they went through (calls / streams: chunks a batch
        # carried on through without draining).
        self.calls = 0
        self.streams_started = 0

    @property
    def loaded(self) -> bool:
        """The engine's ``loaded``."""
        return self.engine.loaded

    @property
    def load_seconds(self) -> float:
        """How long the engine took to load."""
        return getattr(self.engine, "load_seconds", 0.0)

    @property
    def gave_up(self) -> str | None:
        """The engine's reason for giving up (an ``IsolatedEngine`` whose child kept crashing), else None."""
        return getattr(self.engine, "gave_up", None)

    @property
    def callers(self) -> int:
        """How many ``generate_many`` calls are under way (joined, not yet answered in full)."""
        with self._lock:
            return len(self._feeds)

    def start(self) -> "SharedStream":
        """Start the engine beneath.

        Returns:
            This stream.
        """
        self.engine.start()
        return self

    def close(self, timeout_s: float = 120.0) -> None:
        """Take no more pages and wait for the running stream to finish its pages in flight (idempotent), so that
        the engine beneath can be closed: closing an in-process engine while its stream decodes would crash.

        Args:
            timeout_s: the longest wait for the stream's thread.
        """
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout_s)

    def generate_many(self, requests: Iterable[Request]) -> Iterator[tuple[Any, Result]]:
        """Answer every request, yielding ``(key, Generation or DocumentError)`` as each finishes.

        As the engine's ``generate_many``, except that the pages of calls that overlap in time go through one
        running stream (see the module docstring).

        Args:
            requests: the pages to answer (taken lazily, by the engine's threads).

        Returns:
            An iterator of this call's ``(request.key, result)`` pairs.

        Raises:
            RunError: the engine is unusable; or whatever ``requests`` raised, after its pages in flight.
        """
        feed = self._join(iter(requests))
        try:
            while True:
                item = feed.results.get()
                if item is _DONE:
                    if feed.error is not None:
                        raise feed.error
                    return
                if isinstance(item, _Broken):
                    raise item.error
                yield item
        finally:
            with self._lock:
                feed.giving = False
                self._feeds.pop(feed.ticket, None)  # results still to come for it are dropped

    def _join(self, requests: Iterator[Request]) -> _Feed:
        with self._lock:
            start = self._driver == 0
            if start:
                self._driver = next(self._drivers)
            feed = _Feed(next(self._tickets), requests, self._driver)
            self._feeds[feed.ticket] = feed
            self.calls += 1
            self.streams_started += start
        if start:
            thread = threading.Thread(target=self._drive, args=(feed.driver,), name=f"medvlm-stream-{feed.driver}",
                                      daemon=True)
            with self._lock:  # started under the lock: close() never sees a thread it cannot join yet
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
                thread.start()
        return feed

    def _drive(self, driver: int) -> None:
        """Run the engine over ``_source`` and hand each result to its caller."""
        try:
            for (ticket, key), result in self.engine.generate_many(self._source(driver)):
                with self._lock:
                    feed = self._feeds.get(ticket)
                    if feed is None:  # its caller stopped early
                        continue
                    feed.answered += 1
                    feed.results.put((key, result))
                    self._finish_if_done(feed)
        except BaseException as exc:  # the engine failed: every caller it was serving hears it
            self._fail(driver, exc)
            return
        # A normal end: every caller of this stream has been answered, unless the stream was closed.
        self._fail(driver, RunError("the engine was closed before it answered every page"))

    def _fail(self, driver: int, error: BaseException) -> None:
        """Raise ``error`` to the callers the stream ``driver`` still serves (none after a normal end)."""
        with self._lock:
            if self._driver == driver:
                self._driver = 0
            for feed in list(self._feeds.values()):
                if feed.driver == driver:
                    feed.giving = False
                    feed.results.put(_Broken(error))
                    del self._feeds[feed.ticket]

    def _source(self, driver: int) -> Iterator[Request | None]:
        """The requests of the stream: the oldest caller's first; ``NOT_YET`` while no caller has pages to give
        but pages are in flight (the next chunk may join meanwhile); ends when neither holds.

        Never raises: a caller's iterable failing ends that caller's part only. Called by one engine thread at
        a time (the engines take requests under a lock), so each caller's iterable is too.
        """
        while True:
            with self._lock:
                feed = None if self._closed else next((f for f in self._feeds.values() if f.giving), None)
                if feed is None:
                    in_flight = not self._closed and any(f.driver == driver and f.taken > f.answered
                                                         for f in self._feeds.values())
                    if not in_flight:
                        if self._driver == driver:
                            self._driver = 0  # callers from now on start a new stream
                        return
            if feed is None:  # pages still in flight: the next chunk may join before they are answered
                yield NOT_YET
                continue
            try:
                request = next(feed.requests)
            except StopIteration:
                self._stop_giving(feed, None)
                continue
            except BaseException as exc:  # ends this caller's part: raised to it after its pages in flight
                self._stop_giving(feed, exc)
                continue
            with self._lock:
                if feed.ticket not in self._feeds:  # its caller stopped meanwhile
                    continue
                feed.taken += 1
            yield dataclasses.replace(request, key=(feed.ticket, request.key))

    def _stop_giving(self, feed: _Feed, error: BaseException | None) -> None:
        with self._lock:
            feed.giving = False
            feed.error = error
            self._finish_if_done(feed)

    def _finish_if_done(self, feed: _Feed) -> None:
        """Under the lock: end a caller that has given its last page and had every page answered."""
        if not feed.giving and feed.answered >= feed.taken and self._feeds.get(feed.ticket) is feed:
            del self._feeds[feed.ticket]
            feed.results.put(_DONE)
