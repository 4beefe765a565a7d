"""The per-chunk work of a run, free of orchestration: manifest rows in, result rows out.

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
import json
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

from medvlm_core import errors
from medvlm_core.engine.types import Engine, Generation, Request, takes_requests_ahead
from medvlm_core.errors import DocumentError, RunError
from medvlm_core.inputs.images import PageImage, load_pages
from medvlm_core.inputs.manifest import ManifestRow
from medvlm_core.inputs.prompts import Prompt, get_prompt
from medvlm_core.model.files import ModelIdentity
from medvlm_core.output import status as row_status
from medvlm_core.output.paths import OutputLayout
from medvlm_core.output.results import DoneKeys, result_key, utc_now
from medvlm_core.output.structured import flatten, item_confidences
from medvlm_core.run.params import EngineConfig, GenerationParams, ImageOptions
from medvlm_core.storage import Storage
from medvlm_core.threads import put_unless_stopped

T = TypeVar("T")


@dataclass(frozen=True)
class RunSpec:
    """Everything a chunk of a run needs. Plain data: picklable, and free of secrets and document data."""

    run_id: str
    layout: OutputLayout
    engine: EngineConfig
    model: ModelIdentity
    generation: GenerationParams
    images: ImageOptions
    default_prompt: Prompt
    params_json: str
    fetch_workers: int = 4  # MEDVLM_FETCH_WORKERS
    # Re-run pages whose result key already has an ok row (default: skip them).
    force: bool = False


@dataclass
class FetchedDocument:
    """A document's bytes and where they came from."""

    data: bytes
    sha256: str
    fetch_ms: float


@dataclass
class PageWork:
    """One unit for the engine: a page image, or the error that replaced it."""

    row: ManifestRow
    page: int | None
    page_count: int | None = None
    image: PageImage | None = None
    error: DocumentError | None = None
    image_sha256: str | None = None
    fetch_ms: float | None = None
    preprocess_ms: float | None = None
    skipped: bool = False


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


def row_prompt(row: ManifestRow, default: Prompt, system: str | None = None) -> Prompt:
    """The prompt for a row: its own text, else its prompt id, else the run's prompt.

    Args:
        row: the manifest row.
        default: the run's prompt.
        system: the run's system prompt, for a row prompt whose library entry brings none.

    Returns:
        The prompt.

    Raises:
        RunError: the row names an unknown prompt id.
    """
    if row.prompt or row.prompt_id:
        return get_prompt(row.prompt_id, row.prompt, system)
    return default


def page_key(spec: RunSpec, row: ManifestRow, prompt: Prompt, image_sha256: str | None, page: int | None) -> str:
    """The result key of one page of one row under this run's model and parameters."""
    return result_key(
        row.document_id, image_sha256, page, spec.model.model_sha256, spec.model.mmproj_sha256, prompt.sha256,
        spec.params_json,
    )


def base_row(work: PageWork, spec: RunSpec, prompt: Prompt) -> dict[str, Any]:
    """The columns every result row has, ok or error."""
    row = work.row
    image = work.image if work.image is not None and work.image.image is not None else None
    return {
        "run_id": spec.run_id,
        "result_key": page_key(spec, row, prompt, work.image_sha256, work.page),
        "document_id": row.document_id,
        "page": work.page,
        "page_count": work.page_count,
        "manifest_row": row.row_number,
        "image_uri": row.image_uri,
        "image_sha256": work.image_sha256,
        "image_format": image.source_format if image else None,
        "image_width": image.image.width if image else None,
        "image_height": image.image.height if image else None,
        "patient_id": row.patient_id,
        "encounter_id": row.encounter_id,
        "prompt_id": prompt.prompt_id,
        "prompt_sha256": prompt.sha256,
        "model_name": spec.model.model_name,
        "model_sha256": spec.model.model_sha256,
        "mmproj_sha256": spec.model.mmproj_sha256,
        "chat_format": spec.model.chat_format,
        "params_json": spec.params_json,
        "fetch_ms": work.fetch_ms,
        "preprocess_ms": work.preprocess_ms,
        "created_at": utc_now(),
    }


def error_row(work: PageWork, spec: RunSpec, prompt: Prompt, error: DocumentError) -> dict[str, Any]:
    """A result row recording why this page (or document) produced no completion."""
    row = base_row(work, spec, prompt)
    row.update(status=row_status.ERROR, error_type=error.error_type, error_message=error.message)
    return row


def _add_structured(out: dict[str, Any], prompt: Prompt, result: Generation) -> None:
    """Parse a constrained answer into ``out[STRUCTURED_ROWS]`` (table -> rows), or mark it truncated/invalid."""
    if out["finish_reason"] == "length":
        # Cut off at max_tokens: the JSON is incomplete, so no partial rows reach the tables.
        out["status"] = row_status.TRUNCATED
        return
    try:
        answer = json.loads(out["completion"])
        if not isinstance(answer, dict):
            raise ValueError("not a JSON object")
        confidence = item_confidences(result.text, result.token_logprobs, result.token_offsets)
    except ValueError:
        out.update(status=row_status.ERROR, error_type=errors.INVALID_OUTPUT,
                   error_message=f"{out['image_uri']}: the model's answer is not the JSON the schema asks for")
        return
    keys = {k: out[k] for k in ("run_id", "result_key", "document_id", "page", "patient_id", "encounter_id")}
    out[STRUCTURED_ROWS] = flatten(prompt.prompt_id, prompt.schema, answer, keys, confidence)


# The key of a result row that carries its structured tables' rows (``_add_structured``) to ``chunks``: not a
# column of the completions table, so it is taken out before the row is written (``completion_columns``).
STRUCTURED_ROWS = "structured"


def completion_columns(row: dict[str, Any]) -> dict[str, Any]:
    """A result row as the completions table's columns: without the structured rows it carries.

    Args:
        row: a result row.

    Returns:
        The row without ``STRUCTURED_ROWS``.
    """
    return {k: v for k, v in row.items() if k != STRUCTURED_ROWS}


def _safe_prompt(row: ManifestRow, default: Prompt) -> tuple[Prompt, DocumentError | None]:
    try:
        return row_prompt(row, default, default.system), None
    except RunError as exc:
        return default, DocumentError(errors.INVALID_ROW, str(exc))


def _result_row(work: PageWork, spec: RunSpec, prompt: Prompt, result: Generation | DocumentError | None) -> dict[str, Any]:
    """The row for one page: skipped, error, or the engine's answer (``result``)."""
    if work.skipped:
        out = base_row(work, spec, prompt)
        out.update(status=row_status.SKIPPED)
    elif work.error is not None:
        out = error_row(work, spec, prompt, work.error)
    elif isinstance(result, DocumentError):
        out = error_row(work, spec, prompt, result)
    else:
        out = base_row(work, spec, prompt)
        out.update(
            status=row_status.OK,
            completion=result.text,
            finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            latency_ms=result.latency_ms,
            reasoning=result.reasoning,
            reasoning_tokens=result.reasoning_tokens,
            reasoning_budget_hit=result.reasoning_budget_hit,
            mean_logprob=result.mean_logprob,
            min_logprob=result.min_logprob,
            top_logprobs=json.dumps(result.top_logprobs, separators=(",", ":")) if result.top_logprobs else None,
        )
        if prompt.schema is not None:
            _add_structured(out, prompt, result)
    work.image = None  # free the pixels before the next page
    return out


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
        prompt, _ = _safe_prompt(row, spec.default_prompt)
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
    prompt, prompt_error = _safe_prompt(work.row, spec.default_prompt)
    work.error = work.error or prompt_error
    return prompt


def _run(engine: Engine, pages: Iterable[PageWork], spec: RunSpec) -> Iterator[dict[str, Any]]:
    ready: deque[dict[str, Any]] = deque()  # rows that need no model (skipped, errors), yielded in between
    in_flight: dict[int, tuple[PageWork, Prompt]] = {}

    def requests() -> Iterator[Request]:
        for index, work in enumerate(pages):
            prompt = _prepared(work, spec)
            if work.skipped or work.error is not None:
                ready.append(_result_row(work, spec, prompt, None))
                continue
            in_flight[index] = (work, prompt)
            yield Request(index, work.image.image, prompt.text, spec.generation, prompt.schema, prompt.system)

    for key, result in engine.generate_many(requests()):
        while ready:
            yield ready.popleft()
        work, prompt = in_flight.pop(key)
        yield _result_row(work, spec, prompt, result)
    while ready:
        yield ready.popleft()
