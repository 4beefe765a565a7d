"""A fault-injecting HTTP/1.1 reverse proxy for S3 on loopback (stdlib only), for reliability tests::

    with FaultProxy(server.endpoint_url, rate=0.15, seed=1234) as proxy:
        fs = s3fs.S3FileSystem(endpoint_url=proxy.endpoint, ...)   # clients talk to the proxy
        ...
        proxy.injected   # {"503": 3, "reset": 2, ...}

See ``FaultProxy`` for the fault kinds. Requests are forwarded byte for byte, Host and Authorization
included, so SigV4 signatures (and presigned URLs) made for ``proxy.endpoint`` stay valid: SeaweedFS
checks them against the Host header it receives.

FINDINGS: what the clients do on each fault
===========================================
Measured with this proxy in front of SeaweedFS 4.48 (test_fault_proxy.py pins most of it down), with
s3fs 2026.9.0 / aiobotocore 3.10.0 (aiohttp 3.14.5) and boto3 / botocore 1.43.117 (urllib3 2.8.0).

Retry layers and their knobs
----------------------------
* botocore's default retry mode here is "legacy" (AWS_RETRY_MODE unset): 5 attempts per API call.
  ``Config(retries={"max_attempts": N})`` means N *retries* (N + 1 attempts); ``total_max_attempts``
  counts attempts, so ``{"total_max_attempts": 1}`` is the only way to say "no retries".
  botocore rewrites the ``retries`` dict it is given in place (pass a copy).
  Both modes retry HTTP 500/502/503/504, throttling codes (SlowDown ...) and connection errors
  (ConnectionClosedError, EndpointConnectionError, read timeouts) raised *before the API call
  returns*, for every method, PUT and POST included (no idempotency check).
* s3fs wraps every call in its own loop (``fs.retries``, a class attribute, default 5 tries in all,
  sleeping 0.1 * 1.7**i s; NOT a constructor argument: ``S3FileSystem(retries=...)`` is passed on to
  aiobotocore's session and fails). It retries ``s3fs.core.S3_RETRYABLE_ERRORS`` (socket.timeout,
  botocore HTTPClientError and subclasses such as ConnectionClosedError / ResponseStreamingError,
  urllib3 IncompleteRead, FSTimeoutError, ResponseParserError, aiohttp.ClientPayloadError) and
  ClientErrors whose text contains "SlowDown", "reduce your request rate" or
  "XAmzContentSHA256Mismatch". It does NOT retry EndpointConnectionError or InternalError (500).
  The layers multiply: a persistent 503 SlowDown costs 5 x 5 = 25 requests and ~40 s.
* aiohttp (under s3fs) resends GET/HEAD/PUT/DELETE once more when the connection fails before a
  response (ClientOSError / ServerDisconnectedError); POST is sent once. It happens inside one
  botocore attempt (RetryAttempts stays 0), so it survives ``total_max_attempts: 1`` and
  ``fs.retries = 1`` (aiohttp's ``ClientSession._retry_connection`` is hard-wired to True).
* boto3/urllib3: urllib3's own retries are off (botocore passes retries=False); only botocore retries.

Per fault kind, s3fs (what surfaces to the caller once every try failed; defaults: requests made)
------------------------------------------------------------------------------------------------
* 503 SlowDown: retried by botocore and by s3fs (25 requests). Raises plain ``OSError`` with
  ``errno.EBUSY`` (16), message "Please reduce your request rate.", ``__cause__`` the botocore
  ClientError (Error.Code "SlowDown"). HEAD has no body, so no S3 code: ClientError code "503",
  ``OSError(EBUSY, "Service Unavailable")``, and s3fs's loop does not retry it (5 requests).
* 500 InternalError: retried by botocore only (5 requests). ``OSError`` with ``errno.EREMOTEIO``
  (121), "We encountered an internal error. Please try again." (HEAD: "Internal Server Error"),
  ``__cause__`` ClientError (Code "InternalError"; HEAD: "500").
* reset (no response): aiohttp x2 (idempotent methods) x botocore 5 = 10 requests (POST: 5), not
  retried by s3fs. Raises ``botocore.exceptions.EndpointConnectionError`` ("Could not connect to the
  endpoint URL", misleading: it did connect) <- aiohttp.ClientOSError <- ConnectionResetError.
  NOT an OSError: ``except OSError`` misses it (it is a BotoCoreError). A single reset on an
  idempotent method is invisible even with all retries off (aiohttp's resend).
* truncate, object body (cat_file, open().read(), get_file, all GetObject): botocore does NOT retry it
  (the body is read after the API call returned); s3fs does (cat_file/_fetch_range: its loop; get_file:
  a Range-resume loop), 5 tries. Raises the raw ``aiohttp.ClientPayloadError`` ("Response payload is
  not completed") <- aiohttp.http_exceptions.ContentLengthError: neither an OSError nor a BotoCoreError.
* truncate, XML body (ListObjectsV2, DeleteObjects): read inside aiobotocore, mapped to
  ``botocore.exceptions.ConnectionClosedError`` (<- ClientPayloadError); retried by botocore and by
  s3fs (25 requests, ~40 s); that exception (an HTTPClientError, not an OSError) surfaces.
* truncate on a response without a body (PUT, HEAD, DELETE, all 2xx with Content-Length 0): the
  proxy resets instead, AFTER the server executed the request ("lost response"); clients treat it
  as a reset and resend. Harmless for plain PUT/DELETE, but a create-if-absent PUT
  (If-None-Match: *, ``fs.open(path, "xb")``) is resent and refused: 412 PreconditionFailed, raised as
  ``OSError(errno.EINVAL)`` (SeaweedFS omits the Condition element that makes s3fs raise
  FileExistsError), although this very call created the object -- even with botocore's and s3fs's
  retries off, because aiohttp resends the PUT (test_lost_response_to_a_conditional_put_comes_back_as_412).
  A failed-looking create must be checked by reading the object back, on the FIRST try too.
* slow: nothing fails or retries (read timeouts default to 60 s); the result is correct.

Per fault kind, boto3 (urllib3)
-------------------------------
* 503 / 500: ClientError (Code "SlowDown" / "InternalError"; HEAD: "503" / "500"), retried by botocore.
* reset: ``botocore.exceptions.ConnectionClosedError`` <- urllib3 ProtocolError <- ConnectionResetError;
  retried by botocore for every method, PUT included.
* truncate, GetObject body: ``Body.read()`` raises ``botocore.exceptions.ResponseStreamingError``
  <- urllib3 ProtocolError <- http.client.IncompleteRead. Never retried by botocore: the caller must
  repeat the get_object call.
* truncate, XML body: urllib3 hands back the short body without an error; botocore's S3 handler for
  "200 with an error inside" fails to parse the XML and turns it into a 500, so it is retried; once
  exhausted it is ClientError code "500", "Internal Server Error".
* lost response to a conditional PUT: botocore resends it -> ClientError PreconditionFailed (412).

Caveat: after a failed write, ``fs.exists`` may answer from s3fs's listings cache (stale "missing")
unless the filesystem was made with ``use_listings_cache=False`` or the cache is invalidated.
"""

from __future__ import annotations

import collections
import random
import socket
import socketserver
import struct
import threading
import time
import uuid
from email.utils import formatdate
from typing import Callable, Iterable
from urllib.parse import urlsplit

KINDS = ("503", "500", "reset", "slow", "truncate")

_MAX_LINE = 65536
_MAX_HEADERS = 200

_ERRORS = {
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "500": (500, "Internal Server Error", "InternalError",
            "We encountered an internal error. Please try again."),
}


class _Closed(Exception):
    """The peer closed the connection (cleanly, between messages, or in the middle of one)."""


class _Message:
    """One HTTP message head: the raw bytes (forwarded unchanged) and the parsed parts."""

    def __init__(self, raw: bytes, start: str, headers: list[tuple[str, str]]):
        self.raw = raw
        self.start = start
        self.headers = headers

    def get(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def tokens(self, name: str) -> set[str]:
        """The comma-separated, lower-cased tokens of all headers called ``name``."""
        name = name.lower()
        out: set[str] = set()
        for key, value in self.headers:
            if key.lower() == name:
                out.update(t.strip().lower() for t in value.split(",") if t.strip())
        return out


def _read_head(rfile, *, allow_eof: bool) -> _Message | None:
    """Read a message head (start line + headers + blank line). None on a clean EOF before it."""
    lines: list[bytes] = []
    while True:
        line = rfile.readline(_MAX_LINE + 1)
        if not line:
            if not lines and allow_eof:
                return None
            raise _Closed("connection closed in the middle of a message head")
        if len(line) > _MAX_LINE or len(lines) > _MAX_HEADERS:
            raise _Closed("message head too long")
        if not lines and line in (b"\r\n", b"\n"):
            continue  # tolerate stray CRLF between messages (RFC 9112 2.2)
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            break
    start = lines[0].decode("latin-1").rstrip("\r\n")
    headers = []
    for line in lines[1:-1]:
        key, _, value = line.decode("latin-1").partition(":")
        headers.append((key.strip(), value.strip()))
    return _Message(b"".join(lines), start, headers)


def _read_exact(rfile, n: int) -> bytes:
    data = rfile.read(n)
    if len(data) != n:
        raise _Closed(f"connection closed after {len(data)} of {n} body bytes")
    return data


def _read_chunked(rfile) -> bytes:
    """The raw bytes of a chunked body (size lines, data, trailers), exactly as they came."""
    parts: list[bytes] = []
    while True:
        line = rfile.readline(_MAX_LINE + 1)
        if not line.endswith(b"\n"):
            raise _Closed("connection closed in a chunk size line")
        parts.append(line)
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers, up to the empty line
                trailer = rfile.readline(_MAX_LINE + 1)
                if not trailer.endswith(b"\n"):
                    raise _Closed("connection closed in chunked trailers")
                parts.append(trailer)
                if trailer in (b"\r\n", b"\n"):
                    return b"".join(parts)
        parts.append(_read_exact(rfile, size + 2))  # data + CRLF


def _read_body(rfile, head: _Message, *, response: bool, request_method: str = "") -> tuple[bytes, bool]:
    """The raw body of a message and whether the message was delimited by closing the connection."""
    if response:
        status = int(head.start.split(None, 2)[1])
        if request_method == "HEAD" or status < 200 or status in (204, 304):
            return b"", False
    if "chunked" in head.tokens("transfer-encoding"):
        return _read_chunked(rfile), False
    length = head.get("content-length")
    if length is not None:
        return _read_exact(rfile, int(length)), False
    if not response:
        return b"", False
    return rfile.read(), True  # read until close


def _rst_close(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP RST instead of a FIN (SO_LINGER on, timeout 0)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def _error_response(kind: str, path: str, method: str, request_id: str) -> bytes:
    status, reason, code, message = _ERRORS[kind]
    resource = path.split("?", 1)[0]
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>"
    ).encode()
    payload = b"" if method == "HEAD" else body
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Server: FaultProxy\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(payload)}\r\n"
        f"x-amz-request-id: {request_id}\r\n"
        + ("Retry-After: 1\r\n" if status == 503 else "")
        + "\r\n"
    ).encode("latin-1")
    return head + payload


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, proxy: "FaultProxy"):
        self.proxy = proxy
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(socketserver.BaseRequestHandler):
    """One client connection: requests are handled one after the other (keep-alive)."""

    def setup(self) -> None:
        self.proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        self.client: socket.socket = self.request
        self.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = self.client.makefile("rb")
        self.upstream: socket.socket | None = None
        self.up_rfile = None
        self.proxy._track(self.client, add=True)

    def finish(self) -> None:
        self._close_upstream()
        try:
            self.rfile.close()
        except OSError:
            pass
        self.proxy._track(self.client, add=False)

    # -- upstream connection ---------------------------------------------------------------------

    def _connect_upstream(self) -> None:
        self._close_upstream()
        sock = socket.create_connection(self.proxy._upstream_addr, timeout=self.proxy.upstream_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.upstream, self.up_rfile = sock, sock.makefile("rb")

    def _close_upstream(self) -> None:
        if self.up_rfile is not None:
            try:
                self.up_rfile.close()
            except OSError:
                pass
        if self.upstream is not None:
            try:
                self.upstream.close()
            except OSError:
                pass
        self.upstream = self.up_rfile = None

    def _exchange(self, request: bytes, method: str) -> tuple[_Message, bytes, bool]:
        """Send ``request`` upstream; return the final response head, its raw body, and close-delimited.

        Interim 1xx responses are skipped (the proxy answers ``Expect: 100-continue`` itself). A kept
        alive upstream connection that the upstream had closed (nothing at all came back) is replaced
        once and the request sent again, as HTTP clients do.
        """
        reused = self.upstream is not None
        if not reused:
            self._connect_upstream()
        try:
            self.upstream.sendall(request)
            head = _read_head(self.up_rfile, allow_eof=reused)
        except (ConnectionResetError, BrokenPipeError):
            if not reused:
                raise
            head = None
        if head is None:  # stale kept-alive connection
            self._connect_upstream()
            self.upstream.sendall(request)
            head = _read_head(self.up_rfile, allow_eof=False)
        try:
            while 100 <= int(head.start.split(None, 2)[1]) < 200:
                head = _read_head(self.up_rfile, allow_eof=False)
            body, until_close = _read_body(self.up_rfile, head, response=True, request_method=method)
        except BaseException:
            self._close_upstream()
            raise
        if until_close or "close" in head.tokens("connection"):
            self._close_upstream()
        return head, body, until_close

    # -- the request loop ------------------------------------------------------------------------

    def handle(self) -> None:
        try:
            while self._one_request():
                pass
        except (_Closed, OSError, ValueError, IndexError):
            pass  # client went away, or a malformed message: drop the connection

    def _one_request(self) -> bool:
        """Handle one request; return whether to keep the client connection open."""
        head = _read_head(self.rfile, allow_eof=True)
        if head is None:
            return False
        method, target = head.start.split(None, 2)[:2]
        kind = self.proxy._decide(method, target)
        expect_continue = "100-continue" in head.tokens("expect")
        if expect_continue:
            # Answer like a server that wants the body; the Expect header itself is forwarded unchanged
            # (upstream's own 100 Continue is skipped in _exchange).
            self.client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body, _ = _read_body(self.rfile, head, response=False)
        keep_alive = "close" not in head.tokens("connection") and not head.start.endswith("HTTP/1.0")

        if kind == "reset":
            _rst_close(self.client)
            return False
        if kind in _ERRORS:
            request_id = "FAULTPROXY" + uuid.uuid4().hex[:16].upper()
            self.client.sendall(_error_response(kind, target, method, request_id))
            return keep_alive
        if kind == "slow":
            time.sleep(self.proxy.slow_seconds)

        resp_head, resp_body, until_close = self._exchange(head.raw + body, method)
        if kind == "truncate":
            if len(resp_body) >= self.proxy.truncate_min_bytes:
                self.client.sendall(resp_head.raw + resp_body[: len(resp_body) // 2])
                try:
                    self.client.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return False
            # Nothing worth truncating (HEAD, 204, tiny body): the response is lost instead.
            self.proxy._record_fallback(method, target)
            _rst_close(self.client)
            return False
        self.client.sendall(resp_head.raw + resp_body)
        if until_close or "close" in resp_head.tokens("connection"):
            return False
        return keep_alive


class FaultProxy:
    """A reverse proxy on ``127.0.0.1:<free port>`` in front of an S3 endpoint that injects faults.

    Every request is forwarded byte for byte (start line, all headers including Host and
    Authorization, body) to ``upstream``, so SigV4 signatures made for ``proxy.endpoint`` stay valid
    as long as the upstream does not care which Host it is called by (SeaweedFS checks the signature
    against the Host header it receives). Per request, with probability ``rate``, one of ``kinds``
    is injected -- only into requests whose method is in ``methods`` and for which
    ``match(method, target)`` is true, when those are given:

    * ``"503"``: answer 503 with an S3 ``SlowDown`` XML error, not forwarded;
    * ``"500"``: answer 500 with an S3 ``InternalError`` XML error, not forwarded;
    * ``"reset"``: after reading the whole request, close the client connection with a TCP RST,
      not forwarded;
    * ``"slow"``: wait ``slow_seconds``, then forward (the response is correct);
    * ``"truncate"``: forward; send the response head (original Content-Length) and half the body,
      then close. Responses with a body under ``truncate_min_bytes`` (HEAD, 204, the empty 200s
      of PUT and DELETE) are lost instead: the request *was* executed upstream, the client
      connection is reset, and it is counted as ``"reset"`` (and in ``truncate_fallbacks``).

    Request and response bodies are buffered whole in memory (test-sized objects). An upstream that
    cannot be reached or breaks off makes the proxy drop the client connection.

    ``inject_next(kind, count)`` queues faults for the next matching requests regardless of ``rate``
    (deterministic tests). Random choices come from ``random.Random(seed)``: the sequence is
    reproducible for a client that sends one request at a time. ``rate``, ``kinds``, ``methods`` (a
    set of upper-case names) and ``match`` may be changed while running (``proxy.rate = 0`` pauses
    faults). Counters, all thread-safe: ``requests``, ``injected`` (kind -> count), ``connections``,
    ``truncate_fallbacks`` and ``log`` ((method, target, kind) per request); ``reset_counters()``.
    """

    def __init__(
        self,
        upstream: str,
        rate: float = 0.0,
        kinds: Iterable[str] = KINDS,
        seed: int | None = None,
        slow_seconds: float = 1.5,
        methods: Iterable[str] | None = None,
        match: Callable[[str, str], bool] | None = None,
        truncate_min_bytes: int = 2,
        upstream_timeout: float = 60.0,
        log_size: int = 10_000,
    ):
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = upstream
        self._upstream_addr = (parts.hostname, parts.port or 80)
        self.rate = rate
        self.kinds = tuple(kinds)
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {KINDS}")
        self.methods = None if methods is None else frozenset(m.upper() for m in methods)
        self.match = match
        self.slow_seconds = slow_seconds
        self.truncate_min_bytes = truncate_min_bytes
        self.upstream_timeout = upstream_timeout
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._requests = 0
        self._injected: collections.Counter[str] = collections.Counter()
        self._truncate_fallbacks = 0
        self._connections = 0
        self._queue: collections.deque[tuple[str, frozenset[str] | None, Callable | None]] = collections.deque()
        self._log: collections.deque[tuple[str, str, str]] = collections.deque(maxlen=log_size)
        self._clients: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> "FaultProxy":
        if self._server is None:
            self._server = _Server(self)
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                name="FaultProxy", daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            clients = list(self._clients)
        for sock in clients:  # wake handler threads blocked on a kept-alive connection
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not running: call start() first")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- counters --------------------------------------------------------------------------------

    @property
    def requests(self) -> int:
        """Requests received (complete request heads), faulty or not."""
        with self._lock:
            return self._requests

    @property
    def injected(self) -> dict[str, int]:
        """A snapshot: fault kind -> how many were injected (truncate fallbacks count as "reset")."""
        with self._lock:
            return dict(self._injected)

    @property
    def connections(self) -> int:
        """Client connections accepted (with keep-alive, fewer than requests)."""
        with self._lock:
            return self._connections

    @property
    def truncate_fallbacks(self) -> int:
        """Truncate faults that hit a response without a body worth cutting and became resets."""
        with self._lock:
            return self._truncate_fallbacks

    @property
    def log(self) -> list[tuple[str, str, str]]:
        """(method, target, kind) per request, kind "" when none was injected; most recent last."""
        with self._lock:
            return list(self._log)

    def reset_counters(self) -> None:
        with self._lock:
            self._requests = 0
            self._injected.clear()
            self._truncate_fallbacks = 0
            self._connections = 0
            self._log.clear()

    def inject_next(
        self,
        kind: str,
        count: int = 1,
        methods: Iterable[str] | None = None,
        match: Callable[[str, str], bool] | None = None,
    ) -> None:
        """Inject ``kind`` into the next ``count`` requests that have one of ``methods`` (if given) and
        for which ``match(method, target)`` is true (if given), whatever ``rate`` is."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {KINDS}")
        only = None if methods is None else frozenset(m.upper() for m in methods)
        with self._lock:
            self._queue.extend([(kind, only, match)] * count)

    def clear_pending(self) -> None:
        """Drop the faults queued by ``inject_next`` that have not been used."""
        with self._lock:
            self._queue.clear()

    # -- internals -------------------------------------------------------------------------------

    def _decide(self, method: str, target: str) -> str | None:
        with self._lock:
            self._requests += 1
            kind = None
            for i, (queued, only, match) in enumerate(self._queue):
                if (only is None or method in only) and (match is None or match(method, target)):
                    kind = queued
                    del self._queue[i]
                    break
            if (
                kind is None and self.rate > 0 and self.kinds
                and (self.methods is None or method in self.methods)
                and (self.match is None or self.match(method, target))
            ):
                if self._rng.random() < self.rate:
                    kind = self._rng.choice(self.kinds)
            if kind is not None:
                self._injected[kind] += 1
            self._log.append((method, target, kind or ""))
            return kind

    def _record_fallback(self, method: str, target: str) -> None:
        with self._lock:
            self._injected["truncate"] -= 1
            if not self._injected["truncate"]:
                del self._injected["truncate"]
            self._injected["reset"] += 1
            self._truncate_fallbacks += 1
            for i in range(len(self._log) - 1, -1, -1):
                if self._log[i] == (method, target, "truncate"):
                    self._log[i] = (method, target, "reset")
                    break

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._clients.add(sock)
                self._connections += 1
            else:
                self._clients.discard(sock)
