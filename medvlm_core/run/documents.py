"""Document scope: one answer per clinical document from all its pages, in one prompt or by map-reduce.

The counterpart of ``pages.process_rows`` when a run's scope is ``document``. A document is the manifest rows
that share a ``document_id`` (one file; all its pages, or the pages its rows name), answered in page order:

* ``single_prompt``: every page's image in one prompt. With ``document_method = auto`` it is chosen when the
  pages fit ``n_ctx`` beside the answer's ``max_tokens`` (estimated from the projector, ``model/image_tokens``);
  when they do not and the projector's image tokens follow the pixels (Qwen-VL), the pages are first made
  smaller, down to ``image_min_tokens`` a page, and the budget used is recorded.
* ``map_reduce``: each page answered exactly as page scope would (same keys: page rows already in the output are
  reused, not asked again; new ones are written as ordinary page rows), then a text-only consolidation of the
  page answers; when those do not fit one prompt they are consolidated in parts first (a reduce tree).

The engine is the judge of what fits: a single prompt that overflows the context under ``auto`` falls back to
map_reduce. Phases run one after another over the chunk's documents (single prompts and map pages stream through
the engine together; fallbacks; then the consolidation rounds), so only a document's page answers are kept
between phases, never its pixels.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from PIL import Image

from medvlm_core import errors
from medvlm_core.engine.types import Engine, Generation, Request
from medvlm_core.errors import DocumentError
from medvlm_core.inputs.images import PageImage, fit_to_budget, load_pages
from medvlm_core.inputs.manifest import ManifestRow
from medvlm_core.inputs.prompts import Prompt
from medvlm_core.model.image_tokens import ImageTokens, image_tokens_of
from medvlm_core.output import status as row_status
from medvlm_core.output.results import DoneKeys, read_answers, utc_now
from medvlm_core.run.accounting import COVERED_ROWS
from medvlm_core.run.document_prompts import document_key, document_prompt, reduce_prompt
from medvlm_core.run.pages import FetchedDocument, fetch_documents
from medvlm_core.run.result_rows import add_structured, answer_columns, page_key, result_row, safe_prompt
from medvlm_core.run.spec import PageWork, RunSpec
from medvlm_core.storage import Storage

SINGLE_PROMPT, MAP_REDUCE = "single_prompt", "map_reduce"
# Tokens kept for the chat template, the question and the image markers when deciding what fits.
TEXT_RESERVE = 128
# The smallest image token budget a page is lowered to when the run sets no image_min_tokens.
MIN_PAGE_TOKENS = 64
_TOKENS: dict[str, ImageTokens] = {}  # mmproj path -> its image tokens (read once per process)


@dataclass
class Document:
    """One document of a chunk at document scope, and what is known of it as its phases go."""

    rows: list[ManifestRow]
    prompt: Prompt
    error: DocumentError | None = None
    file_sha256: str | None = None
    fetch_ms: float | None = None
    preprocess_ms: float = 0.0
    page_count: int | None = None
    numbers: list[int] = field(default_factory=list)  # the pages answered, in order
    source_format: str | None = None
    key: str | None = None
    method: str | None = None
    budget: int | None = None
    answers: dict[int, str] = field(default_factory=dict)  # page -> its answer (map_reduce)
    reused: dict[int, str] = field(default_factory=dict)  # page -> the result key of its answer in the output
    failed: dict[int, DocumentError] = field(default_factory=dict)  # pages whose answer is an error
    tokens: list[int] = field(default_factory=lambda: [0, 0])  # prompt and completion tokens asked in this run
    mapped: bool = False  # its pages were asked (map_reduce)
    started: float = field(default_factory=time.perf_counter)

    @property
    def row(self) -> ManifestRow:
        """The document's first manifest row (its id, file, patient, encounter)."""
        return self.rows[0]

    @property
    def wanted(self) -> list[int] | None:
        """The pages its rows name, or None for every page."""
        if any(r.page is None for r in self.rows):
            return None
        return sorted({r.page for r in self.rows})


def group_documents(rows: Iterable[ManifestRow]) -> list[list[ManifestRow]]:
    """Manifest rows grouped by document id, in the order each document first appears.

    Args:
        rows: manifest rows.

    Returns:
        One list of rows per document.
    """
    groups: dict[str, list[ManifestRow]] = {}
    for row in rows:
        groups.setdefault(row.document_id, []).append(row)
    return list(groups.values())


def image_tokens(spec: RunSpec) -> ImageTokens:
    """The run's projector's image tokens (read from the mmproj once per process)."""
    path = spec.engine.mmproj_path
    if path not in _TOKENS:
        try:
            _TOKENS[path] = image_tokens_of(path)
        except Exception:  # an unreadable projector is the engine's to report: no estimate here
            _TOKENS[path] = ImageTokens("unknown")
    return _TOKENS[path]


def _open(rows: list[ManifestRow], fetched: FetchedDocument | DocumentError, spec: RunSpec,
          done: DoneKeys | None) -> tuple[Document, list[PageImage]]:
    """A document's rows and file -> the document with its key, and its pages decoded (none when skipped)."""
    prompt, prompt_error = safe_prompt(rows[0], spec.default_prompt)
    doc = Document(rows, prompt, error=prompt_error)
    if doc.error is None and len({r.image_uri for r in rows}) > 1:
        doc.error = DocumentError(errors.INVALID_ROW, f"document {doc.row.document_id}: its manifest rows name "
                                  "different files; at document scope one document is one file")
    if isinstance(fetched, DocumentError):
        doc.error = doc.error or fetched
    if doc.error is not None:
        return doc, []
    doc.file_sha256, doc.fetch_ms = fetched.sha256, fetched.fetch_ms
    doc.key = document_key(spec, doc.row, prompt, fetched.sha256, doc.wanted)
    if done is not None and not spec.force and doc.key in done:
        return doc, []
    wanted, limit = doc.wanted, spec.documents.max_document_pages
    pages: list[PageImage] = []
    started = time.perf_counter()
    try:
        for page in load_pages(fetched.data, doc.row.image_uri, spec.images,
                               skip=(lambda p: p not in wanted) if wanted else None):
            doc.page_count = page.page_count
            if len(wanted or range(page.page_count)) > limit:
                raise DocumentError(errors.TOO_LARGE, f"{doc.row.image_uri}: document has "
                                    f"{len(wanted or range(page.page_count))} pages to answer, over the "
                                    f"max_document_pages limit {limit}")
            if page.image is not None:
                pages.append(page)
        missing = sorted(set(wanted or []) - {p.page for p in pages})
        if missing:
            raise DocumentError(errors.PAGE_OUT_OF_RANGE, f"{doc.row.image_uri}: page {missing[0]} is out of range "
                                f"(the document has {doc.page_count} pages)")
    except DocumentError as exc:
        doc.error = exc
        return doc, []
    except Exception as exc:  # a decoder bug costs one document
        doc.error = DocumentError(errors.UNREADABLE_IMAGE, f"{doc.row.image_uri}: image decoding failed "
                                  f"({type(exc).__name__})")
        return doc, []
    doc.preprocess_ms = (time.perf_counter() - started) * 1000.0
    doc.numbers = [p.page for p in pages]
    doc.source_format = pages[0].source_format if pages else None
    return doc, pages


def plan_method(doc: Document, pages: list[PageImage], spec: RunSpec, tokens: ImageTokens) -> list[PageImage]:
    """Choose how to answer a document (``doc.method``, ``doc.budget``) and give its pages as they will be sent.

    Args:
        doc: the document.
        pages: its decoded pages.
        spec: the run.
        tokens: the projector's image tokens.

    Returns:
        The pages, made smaller when a lowered image token budget makes them fit one prompt.
    """
    forced = spec.documents.document_method
    if forced == MAP_REDUCE:
        doc.method = MAP_REDUCE
        return pages
    # the question's tokens, at about two characters a token (a real tokenizer makes them fewer)
    room = spec.engine.n_ctx - spec.generation.max_tokens - TEXT_RESERVE - len(document_prompt(doc.prompt).text) // 2
    need = [tokens.estimate(p.image.width, p.image.height) for p in pages]
    if not tokens.known or None in need or sum(need) <= room:
        doc.method = SINGLE_PROMPT  # fits, or cannot be told: the engine decides (auto falls back on overflow)
        return pages
    per_page = room // max(1, len(pages))
    if tokens.adjustable and per_page >= (spec.engine.image_min_tokens or MIN_PAGE_TOKENS):
        doc.method, doc.budget = SINGLE_PROMPT, per_page
        return [_smaller(p, tokens.pixels_for(per_page)) for p in pages]
    doc.method = SINGLE_PROMPT if forced == SINGLE_PROMPT else MAP_REDUCE
    return pages


def _smaller(page: PageImage, max_pixels: int) -> PageImage:
    size = fit_to_budget(page.image.width, page.image.height, max_pixels)
    if size == page.image.size:
        return page
    image = page.image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return PageImage(page.page, page.page_count, image, page.source_width, page.source_height, page.source_format)


def document_row(doc: Document, spec: RunSpec, result: Generation | DocumentError | None,
                 status: str | None = None) -> dict[str, Any]:
    """A document's result row: its answer, its error, or (``status`` skipped) the answer already in the output.

    Args:
        doc: the document.
        spec: the run.
        result: the answer (or error) of its single prompt or last consolidation; None with ``doc.error`` or
            a status.
        status: ``skipped`` for a document whose key is done.

    Returns:
        The row (with the manifest rows it covers, ``COVERED_ROWS``, and in structured mode its items).
    """
    row = doc.row
    out: dict[str, Any] = {
        "run_id": spec.run_id, "result_key": doc.key or document_key(spec, row, doc.prompt, doc.file_sha256 or "",
                                                                      doc.wanted),
        "document_id": row.document_id, "page": None, "page_count": doc.page_count, "manifest_row": row.row_number,
        "image_uri": row.image_uri, "image_sha256": doc.file_sha256, "image_format": doc.source_format,
        "patient_id": row.patient_id, "encounter_id": row.encounter_id, "prompt_id": doc.prompt.prompt_id,
        "prompt_sha256": doc.prompt.sha256, "model_name": spec.model.model_name,
        "model_sha256": spec.model.model_sha256, "mmproj_sha256": spec.model.mmproj_sha256,
        "chat_format": spec.model.chat_format, "params_json": spec.params_json, "fetch_ms": doc.fetch_ms,
        "preprocess_ms": doc.preprocess_ms, "created_at": utc_now(), "scope": "document",
        "pages": doc.numbers or None, "method": doc.method, "image_token_budget": doc.budget,
        COVERED_ROWS: [r.row_number for r in doc.rows],
    }
    error = doc.error or (result if isinstance(result, DocumentError) else None)
    if status is not None:
        out["status"] = status
    elif error is not None:
        out.update(status=row_status.ERROR, error_type=error.error_type, error_message=error.message)
    else:
        out.update(answer_columns(result))
        out.update(prompt_tokens=doc.tokens[0], completion_tokens=doc.tokens[1],
                   latency_ms=(time.perf_counter() - doc.started) * 1000.0)
        if doc.prompt.schema is not None:
            add_structured(out, doc.prompt, result, pages=doc.numbers)
    return out


def process_documents(
    engine: Engine,
    rows: Iterable[ManifestRow],
    spec: RunSpec,
    storage: Storage,
    done: DoneKeys | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Answer each document of ``rows`` as a whole, yielding its document row and (map_reduce) its page rows.

    Never raises for a document's failure; RunError (the engine itself is unusable) does propagate.

    Args:
        engine: a started engine.
        rows: the manifest rows (a document's rows are grouped by its id).
        spec: the run (``spec.documents``: the method and the page limit).
        storage: where the documents and the output are.
        done: result keys already answered: a done document is ``skipped`` (counted, not written); a done page
            of a map-reduce document is reused.
        on_row: called with every row as it is made.

    Returns:
        An iterator of result rows: document rows (``scope = 'document'``) and page rows.
    """
    for out in _phases(engine, group_documents(rows), spec, storage, done):
        if on_row is not None:
            on_row(out)
        yield out


def _phases(engine: Engine, groups: list[list[ManifestRow]], spec: RunSpec, storage: Storage,
            done: DoneKeys | None) -> Iterator[dict[str, Any]]:
    tokens = image_tokens(spec)
    mapping: list[Document] = []  # documents answered page by page
    ready: deque[dict[str, Any]] = deque()  # rows that need no model, yielded in between
    asked: dict[Any, Any] = {}  # request key -> what it asks (a document, or a page of one)

    def first_pass() -> Iterator[Request]:
        fetched = fetch_documents([g[0] for g in groups], storage, spec.images, spec.fetch_workers)
        by_id = {g[0].document_id: g for g in groups}
        for index, (first, result) in enumerate(fetched):
            doc, pages = _open(by_id[first.document_id], result, spec, done)
            if doc.error is not None:
                ready.append(document_row(doc, spec, None))
            elif not pages:  # its key is done
                ready.append(document_row(doc, spec, None, status=row_status.SKIPPED))
            else:
                pages = plan_method(doc, pages, spec, tokens)
                if doc.method == SINGLE_PROMPT:
                    asked[("doc", index)] = doc
                    sent = document_prompt(doc.prompt)
                    yield Request(("doc", index), tuple(p.image for p in pages), sent.text, spec.generation,
                                  sent.schema, sent.system)
                else:
                    mapping.append(doc)
                    yield from _page_requests(doc, pages, spec, done, asked, ready)

    for key, result in engine.generate_many(first_pass()):
        while ready:
            yield ready.popleft()
        yield from _answered(key, result, asked, spec, mapping)
    while ready:
        yield ready.popleft()
    fallbacks = [d for d in mapping if not d.mapped]
    if fallbacks:  # single prompts that did not fit: page by page, pages decoded again
        yield from _map_again(engine, fallbacks, spec, storage, done)
    yield from _reduce(engine, mapping, spec, storage)


def _page_requests(doc: Document, pages: list[PageImage], spec: RunSpec, done: DoneKeys | None,
                   asked: dict[Any, Any], ready: deque) -> Iterator[Request]:
    """A map-reduce document's page requests (its done pages reused: a skipped row each)."""
    doc.mapped = True
    for page in pages:
        work = PageWork(row=doc.row, page=page.page, page_count=page.page_count, image=page,
                        image_sha256=doc.file_sha256, fetch_ms=doc.fetch_ms)
        key = page_key(spec, doc.row, doc.prompt, doc.file_sha256, page.page)
        if done is not None and not spec.force and key in done:
            doc.reused[page.page] = key
            work.skipped = True
            ready.append(result_row(work, spec, doc.prompt, None))
            continue
        asked[("page", id(doc), page.page)] = (doc, work)
        yield Request(("page", id(doc), page.page), page.image, doc.prompt.text, spec.generation,
                      doc.prompt.schema, doc.prompt.system)


def _answered(key: Any, result: Generation | DocumentError, asked: dict[Any, Any], spec: RunSpec,
              mapping: list[Document]) -> Iterator[dict[str, Any]]:
    """The rows of one engine answer: a document's single prompt, or one page of a map-reduce document."""
    item = asked.pop(key)
    if key[0] == "page":
        doc, work = item
        out = result_row(work, spec, doc.prompt, result)
        if out["status"] in row_status.ANSWERED:
            doc.answers[work.page] = out["completion"]
            doc.tokens[0] += out.get("prompt_tokens") or 0
            doc.tokens[1] += out.get("completion_tokens") or 0
        else:
            doc.failed[work.page] = DocumentError(out["error_type"], out["error_message"])
        yield out
        return
    doc = item
    overflow = isinstance(result, DocumentError) and result.error_type == errors.CONTEXT_OVERFLOW
    if overflow and spec.documents.document_method == "auto":
        doc.method, doc.budget = MAP_REDUCE, None  # did not fit after all: page by page
        mapping.append(doc)
        return
    if isinstance(result, Generation):
        doc.tokens = [result.prompt_tokens, result.completion_tokens]
    yield document_row(doc, spec, result)


def _map_again(engine: Engine, docs: list[Document], spec: RunSpec, storage: Storage,
               done: DoneKeys | None) -> Iterator[dict[str, Any]]:
    """Map the documents whose single prompt overflowed: fetch and decode their pages again, ask each page."""
    asked: dict[Any, Any] = {}
    ready: deque[dict[str, Any]] = deque()

    def requests() -> Iterator[Request]:
        fetched = fetch_documents([d.row for d in docs], storage, spec.images, spec.fetch_workers)
        for doc, (_, result) in zip(docs, fetched):
            again, pages = _open(doc.rows, result, spec, None)
            if again.error is not None:
                doc.error = again.error
                continue
            yield from _page_requests(doc, pages, spec, done, asked, ready)

    for key, result in engine.generate_many(requests()):
        while ready:
            yield ready.popleft()
        yield from _answered(key, result, asked, spec, [])
    yield from ready


def _reduce(engine: Engine, docs: list[Document], spec: RunSpec, storage: Storage) -> Iterator[dict[str, Any]]:
    """Consolidate the map-reduce documents' page answers: every document's whole consolidation is asked at once;
    one that does not fit the context is consolidated as a tree (``_consolidate``)."""
    reused = {key for d in docs for key in d.reused.values()}
    texts = read_answers(storage, spec.layout, reused) if reused else {}
    ready: list[tuple[Document, list[tuple[str, str]]]] = []
    for doc in docs:
        for page, key in doc.reused.items():
            if key in texts:
                doc.answers[page] = texts[key]
            else:
                doc.failed[page] = DocumentError(errors.READ_FAILED, f"{doc.row.image_uri}: the answer of page "
                                                 f"{page} is in the done index but not in the completions table")
        if doc.error is not None or doc.failed:
            yield document_row(doc, spec, doc.error or _first_failure(doc))
            continue
        ready.append((doc, [(f"Page {p}", doc.answers[p]) for p in sorted(doc.answers)]))
    requests = [_reduce_request(i, doc, parts, spec) for i, (doc, parts) in enumerate(ready)]
    for index, result in engine.generate_many(requests):
        doc, parts = ready[index]
        if isinstance(result, DocumentError) and result.error_type == errors.CONTEXT_OVERFLOW and len(parts) > 1:
            result = _consolidate(engine, doc, parts, spec, tried=True)
        if isinstance(result, Generation):
            doc.tokens[0] += result.prompt_tokens
            doc.tokens[1] += result.completion_tokens
        yield document_row(doc, spec, result)


def _reduce_request(key: Any, doc: Document, parts: list[tuple[str, str]], spec: RunSpec) -> Request:
    prompt = reduce_prompt(doc.prompt, parts, len(doc.numbers))
    return Request(key, None, prompt.text, spec.generation, prompt.schema, prompt.system)


def _consolidate(engine: Engine, doc: Document, parts: list[tuple[str, str]], spec: RunSpec,
                 tried: bool = False) -> Generation | DocumentError:
    """One answer from a document's parts: asked at once, or, when that does not fit the context, each half
    consolidated (recursively) and then the two halves' answers together (a reduce tree).

    Args:
        engine: the engine.
        doc: the document (its tokens are counted).
        parts: (label, answer) of consecutive pages or page ranges.
        spec: the run.
        tried: the caller already asked ``parts`` at once and it did not fit.

    Returns:
        The consolidated answer, or the error that stopped it (a ``context_overflow`` when two parts alone do
        not fit).
    """
    if not tried:
        [(_, result)] = list(engine.generate_many([_reduce_request(0, doc, parts, spec)]))
        if not (isinstance(result, DocumentError) and result.error_type == errors.CONTEXT_OVERFLOW):
            return result
    if len(parts) < 3:
        labels = ", ".join(label for label, _ in parts)
        return DocumentError(errors.CONTEXT_OVERFLOW, f"{doc.row.image_uri}: the answers of {labels} do not fit one "
                             f"consolidation prompt in n_ctx={spec.engine.n_ctx}; raise --n-ctx or lower --max-tokens")
    middle = len(parts) // 2
    halves = []
    for half in (parts[:middle], parts[middle:]):
        if len(half) == 1:
            halves.append(half[0])
            continue
        result = _consolidate(engine, doc, half, spec)
        if isinstance(result, DocumentError):
            return result
        doc.tokens[0] += result.prompt_tokens
        doc.tokens[1] += result.completion_tokens
        halves.append((f"Pages {_first_page(half[0][0])}-{_last_page(half[-1][0])}", result.text))
    return _consolidate(engine, doc, halves, spec)


def _first_page(label: str) -> str:
    return label.split()[-1].split("-")[0]


def _last_page(label: str) -> str:
    return label.split()[-1].split("-")[-1]


def _first_failure(doc: Document) -> DocumentError:
    page, error = sorted(doc.failed.items())[0]
    return DocumentError(error.error_type, f"{doc.row.image_uri}: page {page} of the document has no answer "
                         f"({error.error_type}), so the document has none")


def document_chunks(rows: list[ManifestRow], size: int) -> list[list[ManifestRow]]:
    """Chunks of about ``size`` manifest rows that never split a document: its rows go together, grouped.

    Args:
        rows: the run's (or shard's) manifest rows.
        size: rows per chunk (a document with more rows is a chunk of its own).

    Returns:
        The chunks, documents in the order they first appear.
    """
    chunks: list[list[ManifestRow]] = []
    current: list[ManifestRow] = []
    for group in group_documents(rows):
        if current and len(current) + len(group) > max(1, size):
            chunks.append(current)
            current = []
        current.extend(group)
    if current:
        chunks.append(current)
    return chunks
