"""The review workbench's web application (Starlette; Jinja2 templates with inline CSS and JS, no build step).

Pages: ``/`` the queue (filters by table, document type, reason and state; counts of done and left), ``/page/KEY``
one answer's page image beside its items, ``/login``. API: ``POST /api/corrections`` (a submission, see
``submit``), ``GET /api/queue`` (the queue as JSON), ``GET /image/KEY`` (the page as PNG). ``auth`` guards every
route; each page and image shown is recorded in ``access_log`` before it is sent. The server's log has one line
per request: method, path (result keys only, never a query string), status and time; an error is logged by its
type, never its message (a DuckDB or storage message may quote a value).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import duckdb
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from medvlm_core.errors import DocumentError
from medvlm_core.output.results import utc_now
from medvlm_core.review import auth
from medvlm_core.review.corrections import new_file_id, write_access, write_corrections
from medvlm_core.review.images import MAX_PIXELS, PageImages
from medvlm_core.review.pages import Page, answer, load_page
from medvlm_core.review.queue import (
    REASONS,
    Entry,
    Queue,
    build_queue,
    counts,
    mark_done,
    next_page,
    select,
    with_picked,
)
from medvlm_core.review.store import OutputStore
from medvlm_core.review.submit import (
    CorrectionError,
    as_text,
    changed_items,
    submission_rows,
)
from medvlm_core.storage import Storage

LOG = logging.getLogger("medvlm.review")
TEMPLATES = Path(__file__).parent / "templates"
OPEN_PATHS = ("/login", "/favicon.ico")
MAX_BODY_BYTES = 1_000_000
_HEX64 = set("0123456789abcdef")


@dataclass
class ReviewConfig:
    """How the workbench serves one output.

    Attributes:
        output: the output URI (local or ``s3://``).
        storage: reads and writes it.
        token: the token every request needs.
        reviewer: the reviewer's name for every session (None: each login gives one).
        threshold: the confidence threshold where no evaluation gives one.
        picked: documents in every reviewer's queue.
        secure: whether the server speaks TLS (the cookie is then ``Secure``).
        max_pixels: pixel budget of the page images.
    """

    output: str
    storage: Storage
    token: str
    reviewer: str | None = None
    threshold: float = 0.9
    picked: tuple[str, ...] = ()
    secure: bool = False
    max_pixels: int = MAX_PIXELS


class Workbench:
    """The server's state: sessions, rendered pages, the output (``store``) and the queue (rebuilt when a run
    publishes or a reviewer picks another document)."""

    def __init__(self, config: ReviewConfig):
        self.config = config
        self.sessions = auth.Sessions()
        self.images = PageImages(config.storage, max_pixels=config.max_pixels)
        self.store = OutputStore(config.output, config.storage)
        self._lock = threading.Lock()
        self._cached: dict[Any, Queue] = {}  # the queue without a reviewer's own picks, by the output's fingerprint

    def queue(self, cursor: duckdb.DuckDBPyConnection, picked: set[str]) -> Queue:
        """The queue for a reviewer, its entries marked done or not (a copy: the cache is shared).

        Args:
            cursor: a cursor of ``store``.
            picked: the documents the reviewer picked (besides the server's).

        Returns:
            The queue.
        """
        fingerprint = self.store.fingerprint
        with self._lock:
            cached = self._cached.get(fingerprint)
        if cached is None:  # a run or an evaluation published: the queue is built again
            cached = build_queue(cursor, self.config.storage, self.config.threshold, self.config.picked)
            with self._lock:
                self._cached = {fingerprint: cached}
        queue = cached.copy()
        if picked - set(self.config.picked):
            with_picked(cursor, queue, picked | set(self.config.picked))
        mark_done(cursor, queue.entries)
        return queue

    def log_access(self, request: Request, action: str, page: Page | None) -> None:
        """Record an access in ``access_log`` (before anything is sent)."""
        now = utc_now()
        row = {"accessed_at": now, "reviewer": request.state.reviewer, "action": action,
               "client": request.client.host if request.client else None}
        if page is not None:
            row.update(document_id=page.document_id, page=page.page, run_id=page.run_id, result_key=page.result_key)
        write_access(self.config.storage, self.config.output, row, now)


def _picked(request: Request) -> set[str]:
    session = getattr(request.state, "session", None)
    return session.picked if session else set()


def _templates() -> Environment:
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]))
    env.filters["text"] = lambda v: "" if v is None else as_text(v)
    return env


def _render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    env: Environment = request.app.state.templates
    context.update(nonce=request.state.nonce, reviewer=getattr(request.state, "reviewer", None))
    return HTMLResponse(env.get_template(name).render(**context), status_code=status)


def _bench(request: Request) -> Workbench:
    return request.app.state.workbench


def _valid_key(key: str) -> bool:
    return len(key) == 64 and set(key) <= _HEX64


def _filters(request: Request) -> dict[str, str | None]:
    q = request.query_params
    return {name: (q.get(name) or None) for name in ("table", "type", "reason", "state")}


def _page_url(entry: Entry, filters: dict[str, str | None] | None = None) -> str:
    query = {"run": entry.run_id, **{k: v for k, v in (filters or {}).items() if v}}
    anchor = f"#item-{entry.table_name}-m{entry.item}" if entry.kind == "item" else ""
    return f"/page/{entry.result_key}?{urlencode(query)}{anchor}"


# -- pages ------------------------------------------------------------------------------------------------


def queue_page(request: Request) -> Response:
    """The queue: what is left to check, most doubtful first, with filters and counts."""
    bench = _bench(request)
    with bench.store.cursor() as cursor:
        queue = bench.queue(cursor, _picked(request))
    filters = _filters(request)
    state = filters["state"] if filters["state"] in ("left", "done", "all") else "left"
    shown = select(queue.entries, filters["table"], filters["type"], filters["reason"],
                   None if state == "all" else state)
    matching = select(queue.entries, filters["table"], filters["type"], filters["reason"])
    options = {
        "table": sorted({e.table_name for e in queue.entries if e.table_name}),
        "type": sorted({e.document_type for e in queue.entries if e.document_type}),
        "reason": [r for r in REASONS if any(r in e.reasons for e in queue.entries)],
    }
    return _render(request, "queue.html", entries=shown, counts=counts(matching), filters=filters, state=state,
                   options=options, thresholds=queue.thresholds, sources=queue.threshold_source,
                   url=lambda e: _page_url(e, filters), missing=request.query_params.get("missing"))


def item_page(request: Request) -> Response:
    """One answer: the page image beside its items, their confidence, the model's reasoning, the actions."""
    key = request.path_params["key"]
    bench = _bench(request)
    with bench.store.cursor() as cursor:
        page = load_page(cursor, key, request.query_params.get("run")) if _valid_key(key) else None
        if page is None:
            return _render(request, "message.html", 404, title="Not found", message="No such answer in this output.")
        queue = bench.queue(cursor, _picked(request))
    bench.log_access(request, "page", page)
    filters = _filters(request)
    doubts = {(e.table_name, e.item): e for e in queue.entries if (e.result_key, e.run_id) == (page.result_key, page.run_id)}
    threshold = queue.thresholds.get(page.prompt_id or "", bench.config.threshold)
    mine = select(queue.entries, filters["table"], filters["type"], filters["reason"])
    return _render(request, "page.html", page=page, doubts=doubts, threshold=threshold, counts=counts(mine),
                   query=urlencode({"run": page.run_id, **{k: v for k, v in filters.items() if v}}),
                   filters=urlencode({k: v for k, v in filters.items() if v}))


def image(request: Request) -> Response:
    """The page image as PNG (recorded in the access log)."""
    key = request.path_params["key"]
    bench = _bench(request)
    page = None
    if _valid_key(key):
        with bench.store.cursor() as cursor:
            page = answer(cursor, key, request.query_params.get("run"))
    if page is None or page.page is None or not page.image_uri:
        return Response(status_code=404)
    bench.log_access(request, "image", page)
    try:
        png = bench.images.get(page.image_uri, page.page)
    except DocumentError as exc:
        LOG.warning("page image unavailable (%s)", exc.error_type)
        return Response(status_code=404)
    return Response(png, media_type="image/png")


def next_entry(request: Request) -> Response:
    """Redirect to the next page with something left to check (keyboard ``n``)."""
    filters = _filters(request)
    bench = _bench(request)
    with bench.store.cursor() as cursor:
        queue = bench.queue(cursor, _picked(request))
    entries = select(queue.entries, filters["table"], filters["type"], filters["reason"])
    after = (request.query_params["after"], request.query_params.get("run", "")) if "after" in request.query_params else None
    found = next_page(entries, after)
    if found is None:
        return RedirectResponse("/?" + urlencode({k: v for k, v in filters.items() if v}), 303)
    return RedirectResponse(_page_url(found, filters), 303)


async def pick(request: Request) -> Response:
    """Add a document to the reviewer's queue by its id and open its first page."""
    session = getattr(request.state, "session", None)
    form = parse_qs((await request.body()).decode("utf-8", "replace")[:2000])
    document_id = (form.get("document_id") or [""])[0].strip()
    if session is None or not document_id:
        return RedirectResponse("/", 303)
    bench = _bench(request)
    session.picked.add(document_id)
    queue = await _threaded(_queue_of, bench, session.picked)
    found = [e for e in queue.entries if e.document_id == document_id and e.kind == "page"]
    if not found:
        session.picked.discard(document_id)
        return RedirectResponse("/?missing=1", 303)
    return RedirectResponse(_page_url(found[0]), 303)


async def submit(request: Request) -> Response:
    """``POST /api/corrections``: record one submission (one file) and say what changed."""
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        return JSONResponse({"error": "submission too large"}, 413)
    try:
        data = json.loads(body)
    except ValueError:
        return JSONResponse({"error": "the submission must be JSON"}, 400)
    key = data.get("result_key") if isinstance(data, dict) else None
    if not isinstance(key, str) or not _valid_key(key):
        return JSONResponse({"error": "result_key must be an answer's key"}, 400)
    run = data.get("run_id")
    bench = _bench(request)
    page = await _threaded(_page_of, bench, key, run if isinstance(run, str) else None)
    if page is None:
        return JSONResponse({"error": "no such answer in this output"}, 404)
    now = utc_now()
    try:
        rows = submission_rows(data, page, request.state.reviewer, now, new_file_id(now))
    except CorrectionError as exc:
        return JSONResponse({"error": str(exc)}, 400)
    if rows:
        await _threaded(write_corrections, bench.config.storage, bench.config.output, rows, now)
    return JSONResponse({"ok": True, "rows": len(rows), "reviewer": request.state.reviewer,
                         "submission_id": rows[0]["submission_id"] if rows else None, "changed": changed_items(rows)})


def queue_json(request: Request) -> Response:
    """``GET /api/queue``: the queue's entries (filters as on the queue page) and counts."""
    filters = _filters(request)
    bench = _bench(request)
    with bench.store.cursor() as cursor:
        queue = bench.queue(cursor, _picked(request))
    state = filters["state"] if filters["state"] in ("left", "done") else None
    entries = select(queue.entries, filters["table"], filters["type"], filters["reason"], state)
    return JSONResponse({"counts": counts(select(queue.entries, filters["table"], filters["type"], filters["reason"])),
                         "thresholds": queue.thresholds,
                         "entries": [dataclasses.asdict(e) for e in entries]})


def favicon(request: Request) -> Response:
    """``GET /favicon.ico``: none (answered without the token, so that browsers do not log a refusal)."""
    return Response(status_code=204)


def health(request: Request) -> Response:
    """``GET /health``: the server answers (with the token)."""
    return JSONResponse({"ok": True})


async def login(request: Request) -> Response:
    """The login form (token and name), and its submission."""
    bench = _bench(request)
    session = bench.sessions.get(request.cookies.get(auth.SESSION_COOKIE))
    target = request.query_params.get("next") or "/"
    if not target.startswith("/") or target.startswith("//"):
        target = "/"
    if request.method == "GET":
        return _render(request, "login.html", has_session=session is not None, ask_name=bench.config.reviewer is None,
                       target=target)
    form = parse_qs((await request.body()).decode("utf-8", "replace")[:4000])
    name = auth.clean_reviewer((form.get("reviewer") or [""])[0]) or bench.config.reviewer
    if session is None:
        if not auth.token_matches((form.get("token") or [""])[0].strip(), bench.config.token):
            return _render(request, "login.html", 401, has_session=False, ask_name=bench.config.reviewer is None,
                           target=target, error="That token is not this server's.")
        session = bench.sessions.create(None)
    if name is None:
        return _render(request, "login.html", 400, has_session=True, ask_name=True, target=target,
                       error="Your name is needed: it signs your corrections.")
    session.reviewer = name
    response = RedirectResponse(target, 303)
    response.headers["Set-Cookie"] = auth.session_cookie(session.id, bench.config.secure)
    return response


async def logout(request: Request) -> Response:
    """End the session."""
    bench = _bench(request)
    bench.sessions.drop(request.cookies.get(auth.SESSION_COOKIE))
    response = RedirectResponse("/login", 303)
    response.headers["Set-Cookie"] = auth.expired_cookie(bench.config.secure)
    return response


def _queue_of(bench: Workbench, picked: set[str]) -> Queue:
    with bench.store.cursor() as cursor:
        return bench.queue(cursor, picked)


def _page_of(bench: Workbench, key: str, run: str | None) -> Page | None:
    with bench.store.cursor() as cursor:
        return load_page(cursor, key, run)


async def _threaded(function: Any, *args: Any) -> Any:
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(function, *args)


# -- access: the token, the session, the headers, the log ---------------------------------------------------


class Guard(BaseHTTPMiddleware):
    """Every request: the token or a session (else 401), same-origin POSTs, the security headers, one log line."""

    async def dispatch(self, request: Request, call_next: Any) -> Response:
        """Check access, run the route, add the headers, log the request (never its query string)."""
        started = time.monotonic()
        request.state.nonce = secrets.token_urlsafe(16)
        try:
            response = await self._guarded(request, call_next)
        except Exception as exc:  # the message may quote a value: logged by type only
            LOG.error("%s %s failed (%s)", request.method, request.url.path, type(exc).__name__)
            response = Response("Internal error (see the server's log).", 500, media_type="text/plain")
        for name, value in auth.security_headers(request.state.nonce).items():
            response.headers.setdefault(name, value)
        LOG.info("%s %s %d %.0f ms", request.method, request.url.path, response.status_code,
                 (time.monotonic() - started) * 1000)
        return response

    async def _guarded(self, request: Request, call_next: Any) -> Response:
        bench: Workbench = request.app.state.workbench
        config = bench.config
        if request.method not in ("GET", "HEAD") and not auth.same_origin(
                request.headers.get("origin"), request.url.scheme, request.headers.get("host")):
            return JSONResponse({"error": "cross-origin request refused"}, 403)
        request.state.session = None
        given = auth.bearer(request.headers.get("authorization"))
        if given is not None:
            if not auth.token_matches(given, config.token):
                return JSONResponse({"error": "invalid token"}, 401)
            request.state.reviewer = config.reviewer or auth.clean_reviewer(
                request.headers.get("x-medvlm-reviewer")) or "token"
            return await call_next(request)
        if request.url.path in OPEN_PATHS:
            return await call_next(request)
        session = bench.sessions.get(request.cookies.get(auth.SESSION_COOKIE))
        if session is None and auth.TOKEN_PARAM in request.query_params and request.method == "GET":
            if not auth.token_matches(request.query_params[auth.TOKEN_PARAM], config.token):
                return _unauthorized(request)
            session = bench.sessions.create(config.reviewer or auth.clean_reviewer(request.query_params.get("reviewer")))
            rest = [(k, v) for k, v in request.query_params.multi_items() if k not in (auth.TOKEN_PARAM, "reviewer")]
            target = request.url.path + ("?" + urlencode(rest) if rest else "")
            if session.reviewer is None:
                target = "/login?" + urlencode({"next": target})
            response = RedirectResponse(target, 303)
            response.headers["Set-Cookie"] = auth.session_cookie(session.id, config.secure)
            return response
        if session is None:
            return _unauthorized(request)
        if session.reviewer is None:
            return RedirectResponse("/login?" + urlencode({"next": request.url.path}), 303)
        request.state.session = session
        request.state.reviewer = session.reviewer
        return await call_next(request)


def _unauthorized(request: Request) -> Response:
    if "text/html" in request.headers.get("accept", ""):
        return _render(request, "login.html", 401, has_session=False, target=request.url.path,
                       ask_name=request.app.state.workbench.config.reviewer is None,
                       error="This workbench needs its token: open the address the server printed, or log in.")
    return JSONResponse({"error": "token required (Authorization: Bearer TOKEN)"}, 401)


def create_app(config: ReviewConfig) -> Starlette:
    """The review workbench over one output.

    Args:
        config: the output, its storage, the token and the defaults.

    Returns:
        The ASGI application (serve it with uvicorn: ``flows/review_cli.py``).
    """
    routes = [
        Route("/", queue_page), Route("/page/{key}", item_page), Route("/image/{key}", image),
        Route("/next", next_entry), Route("/pick", pick, methods=["POST"]),
        Route("/api/corrections", submit, methods=["POST"]), Route("/api/queue", queue_json),
        Route("/health", health), Route("/favicon.ico", favicon), Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(Guard)])
    app.state.workbench = Workbench(config)
    app.state.templates = _templates()
    return app
