"""The per-chunk work of a run, free of orchestration: manifest rows in, result rows out (``result_rows`` builds
each row; ``spec`` holds what a chunk's work is made of).

Stages, each with a clear input and output:

1. ``fetch_documents``: manifest rows -> (row, bytes + sha256 | DocumentError), fetched concurrently in a
   bounded window so the model never waits on storage when it does not have to.
2. ``iter_page_work``: fetched documents -> pages decoded to model-ready images (multi-page documents
   expand into one item per page), or the error that stopped them.
3. ``process_rows``: pages -> engine -> result rows (``ok``, ``error``, ``truncated``; ``skipped`` for pages
   already done), in manifest order, or in the order pages finish with the batched engine.

Stage 1 runs on its own threads; stage 2 on the threads where the engine reads its requests when it reads
ahead (the batched engine's encoder threads, the isolated engine while its child computes), else on a
background thread (``prefetch``), so decoding overlaps the model either way. Only a few pages are held in
memory at any time, however long the chunk.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

from medvlm_core import errors
from medvlm_core.engine.types import Engine, Request, takes_requests_ahead
from medvlm_core.errors import DocumentError
from medvlm_core.inputs.images import load_pages
from medvlm_core.inputs.manifest import ManifestRow
from medvlm_core.inputs.prompts import Prompt
from medvlm_core.output.results import DoneKeys
from medvlm_core.run.params import ImageOptions
from medvlm_core.run.result_rows import page_key, result_row, safe_prompt
from medvlm_core.run.spec import PageWork, RunSpec
from medvlm_core.storage import Storage
from medvlm_core.threads import put_unless_stopped

T = TypeVar("T")


@dataclass
class FetchedDocument:
    """A document's bytes and where they came from."""

    data: bytes
    sha256: str
    fetch_ms: float


def fetch_document(row: ManifestRow, storage: Storage, options: ImageOptions) -> FetchedDocument:
    """Read one document's bytes, hash them and check the expected sha256 if the row gives one."""
    started = time.perf_counter()
    data = storage.read_bytes(row.image_uri, max_bytes=options.max_bytes)
    digest = hashlib.sha256(data).hexdigest()
    if row.sha256 and row.sha256 != digest:
        raise DocumentError(
            errors.SHA256_MISMATCH, f"{row.image_uri}: sha256 of the file does not match the manifest's sha256"
        )
    return FetchedDocument(data=data, sha256=digest, fetch_ms=(time.perf_counter() - started) * 1000.0)


def fetch_documents(
    rows: Iterable[ManifestRow], storage: Storage, options: ImageOptions, workers: int = 4
) -> Iterator[tuple[ManifestRow, FetchedDocument | DocumentError]]:
    """Fetch documents concurrently, at most ``2 * workers`` in flight, yielding in manifest order."""
    window = max(1, 2 * workers)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="medvlm-fetch") as pool:
        pending: list[tuple[ManifestRow, Future]] = []
        for row in rows:
            pending.append((row, pool.submit(fetch_document, row, storage, options)))
            if len(pending) >= window:
                yield _settle(*pending.pop(0))
        while pending:
            yield _settle(*pending.pop(0))


def _settle(row: ManifestRow, future: Future) -> tuple[ManifestRow, FetchedDocument | DocumentError]:
    try:
        return row, future.result()
    except DocumentError as exc:
        return row, exc
    except Exception as exc:  # storage libraries raise many types; one document must not stop the chunk
        return row, DocumentError(errors.READ_FAILED, f"{row.image_uri}: read failed ({type(exc).__name__})")


def iter_page_work(
    fetched: Iterable[tuple[ManifestRow, FetchedDocument | DocumentError]],
    options: ImageOptions,
    is_done: Callable[[ManifestRow, str, int], bool] | None = None,
) -> Iterator[PageWork]:
    """Decode each fetched document into pages; a failure mid-document becomes one error item.

    Pages for which ``is_done(row, image_sha256, page)`` is true come out as ``skipped`` items, undecoded.
    """
    for row, doc in fetched:
        if isinstance(doc, DocumentError):
            yield PageWork(row=row, page=row.page, error=doc)
            continue
        common = dict(row=row, image_sha256=doc.sha256, fetch_ms=doc.fetch_ms)
        skip = (lambda page, row=row, sha=doc.sha256: is_done(row, sha, page)) if is_done else None
        next_page = row.page or 1
        try:
            started = time.perf_counter()
            for page in load_pages(doc.data, row.image_uri, options, page=row.page, skip=skip):
                elapsed = (time.perf_counter() - started) * 1000.0
                yield PageWork(
                    page=page.page, page_count=page.page_count, image=page, preprocess_ms=elapsed,
                    skipped=page.image is None, **common,
                )
                next_page = page.page + 1
                started = time.perf_counter()
        except DocumentError as exc:
            yield PageWork(page=row.page if row.page else (next_page if next_page > 1 else None), error=exc, **common)
        except Exception as exc:  # a decoder bug must cost one document, not the chunk
            err = DocumentError(errors.UNREADABLE_IMAGE, f"{row.image_uri}: image decoding failed ({type(exc).__name__})")
            yield PageWork(page=row.page, error=err, **common)


_DONE = object()


def prefetch(source: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Run ``source`` on a background thread, at most ``depth`` items ahead of the consumer.

    Exceptions from ``source`` are re-raised in the consumer. Stopping early (break, close) stops the
    producer too, so no thread is left blocked.
    """
    items: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: Any) -> bool:
        return put_unless_stopped(items, item, stop)

    def produce() -> None:
        try:
            for item in source:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as exc:  # hand the failure to the consumer
            put((_DONE, exc))

    thread = threading.Thread(target=produce, name="medvlm-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = items.get()
            if item is _DONE:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def process_rows(
    engine: Engine,
    rows: Iterable[ManifestRow],
    spec: RunSpec,
    storage: Storage,
    done: DoneKeys | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Run the engine over manifest rows, yielding one result row per page.

    Never raises for a document's failure; RunError (the engine itself is unusable) does propagate.

    Args:
        engine: a started engine (any of ``medvlm_core.engine``'s).
        rows: the manifest rows.
        spec: the run.
        storage: where the documents are.
        done: result keys already answered: their pages come out with status ``skipped`` and are not run
            (unless ``spec.force``); callers count them and do not write them.
        on_row: called with every row as it is made (counting, progress).

    Returns:
        An iterator of result rows (``ok``, ``error``, ``truncated`` in structured mode, ``skipped``), in the
        order pages finish: a batched engine answers several pages at once; rows that need no model
        (skipped, errors) come out in between.
    """

    def is_done(row: ManifestRow, image_sha256: str, page: int) -> bool:
        prompt, _ = safe_prompt(row, spec.default_prompt)
        return page_key(spec, row, prompt, image_sha256, page) in done

    check = is_done if (done and not spec.force) else None
    fetched = fetch_documents(rows, storage, spec.images, spec.fetch_workers)
    pages = iter_page_work(fetched, spec.images, check)
    if not takes_requests_ahead(engine):
        # Decode the next pages while the engine works on this one. An engine that reads ahead already does so
        # on its own threads: a second thread would only add a hand-over (and its CPU) per page.
        pages = prefetch(pages)
    for out in _run(engine, pages, spec):
        if on_row is not None:
            on_row(out)
        yield out


def _prepared(work: PageWork, spec: RunSpec) -> Prompt:
    prompt, prompt_error = safe_prompt(work.row, spec.default_prompt)
    work.error = work.error or prompt_error
    return prompt


def _run(engine: Engine, pages: Iterable[PageWork], spec: RunSpec) -> Iterator[dict[str, Any]]:
    ready: deque[dict[str, Any]] = deque()  # rows that need no model (skipped, errors), yielded in between
    in_flight: dict[int, tuple[PageWork, Prompt]] = {}

    def requests() -> Iterator[Request]:
        for index, work in enumerate(pages):
            prompt = _prepared(work, spec)
            if work.skipped or work.error is not None:
                ready.append(result_row(work, spec, prompt, None))
                continue
            in_flight[index] = (work, prompt)
            yield Request(index, work.image.image, prompt.text, spec.generation, prompt.schema, prompt.system)

    for key, result in engine.generate_many(requests()):
        while ready:
            yield ready.popleft()
        work, prompt = in_flight.pop(key)
        yield result_row(work, spec, prompt, result)
    while ready:
        yield ready.popleft()
