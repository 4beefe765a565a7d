"""Access to the review workbench: the token, the session cookie and the security headers.

* Every request needs the token: ``Authorization: Bearer TOKEN`` (scripts), or once ``?token=TOKEN`` on a page
  (a browser), which opens a session: an HttpOnly, SameSite=Strict cookie holding a random session id (the token
  itself is never stored in the browser) and a redirect to the same address without the token, so it stays out
  of the history. The login page takes the token and the reviewer's name by a form instead.
* Sessions live in the server's memory (a restart logs everyone out) for ``SESSION_HOURS`` at most.
* A state-changing request (POST) must come from the app's own pages: its ``Origin``, when the browser sends
  one, must be the server's (with SameSite=Strict cookies, a cross-site request carries no session anyway).
* Every response carries the security headers: a Content-Security-Policy that allows only the app's own
  images, scripts and styles with the page's nonce (no inline handlers, no other origin, no framing),
  ``Cache-Control: no-store`` (the pages show PHI), no referrer to other sites (``same-origin``: a browser then
  sends its origin with the app's own POSTs, which the check above needs), no MIME sniffing.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import threading
import time
from dataclasses import dataclass, field

SESSION_COOKIE = "medvlm_review"
TOKEN_PARAM = "token"
SESSION_HOURS = 12
MAX_REVIEWER_CHARS = 80


def new_token() -> str:
    """A new random token (256 bits, URL-safe).

    Returns:
        The token.
    """
    return secrets.token_urlsafe(32)


def token_matches(given: str | None, token: str) -> bool:
    """Whether ``given`` is the token (compared in constant time).

    Args:
        given: what the request carried.
        token: the server's token.

    Returns:
        True when they are equal.
    """
    return bool(given) and hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header.

    Args:
        authorization: the header's value.

    Returns:
        The token, or None.
    """
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def clean_reviewer(name: str | None) -> str | None:
    """A reviewer's name as given, trimmed to one line of at most ``MAX_REVIEWER_CHARS``; None if empty.

    Args:
        name: the name.

    Returns:
        The cleaned name, or None.
    """
    if not name:
        return None
    name = " ".join(name.split())[:MAX_REVIEWER_CHARS]
    return name or None


@dataclass
class Session:
    """A browser's session: who reviews, since when, and the documents they picked."""

    id: str
    reviewer: str | None
    created: float
    picked: set[str] = field(default_factory=set)


class Sessions:
    """The open sessions, in memory (thread-safe)."""

    def __init__(self, max_age_s: float = SESSION_HOURS * 3600):
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.max_age_s = max_age_s

    def create(self, reviewer: str | None) -> Session:
        """Open a session.

        Args:
            reviewer: who reviews (None: asked on the login page).

        Returns:
            The session.
        """
        session = Session(secrets.token_urlsafe(32), reviewer, time.monotonic())
        with self._lock:
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The session with this id, unless it expired.

        Args:
            session_id: the cookie's value.

        Returns:
            The session, or None.
        """
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and time.monotonic() - session.created > self.max_age_s:
                del self._sessions[session_id]
                return None
            return session

    def drop(self, session_id: str | None) -> None:
        """Close a session (logout).

        Args:
            session_id: the cookie's value.
        """
        with self._lock:
            self._sessions.pop(session_id or "", None)


def session_cookie(session_id: str, secure: bool) -> str:
    """The ``Set-Cookie`` value of a session: HttpOnly, SameSite=Strict, the whole app, ``Secure`` under TLS.

    Args:
        session_id: the session's id.
        secure: whether the server speaks TLS.

    Returns:
        The header value.
    """
    return f"{SESSION_COOKIE}={session_id}; Path=/; HttpOnly; SameSite=Strict" + ("; Secure" if secure else "")


def expired_cookie(secure: bool) -> str:
    """The ``Set-Cookie`` value that removes the session cookie (logout).

    Args:
        secure: whether the server speaks TLS.

    Returns:
        The header value.
    """
    return f"{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict" + ("; Secure" if secure else "")


def content_security_policy(nonce: str) -> str:
    """The Content-Security-Policy of every response: the app's own images and requests, the page's own inline
    script and style (by nonce), nothing else.

    Args:
        nonce: the response's nonce.

    Returns:
        The header value.
    """
    return (f"default-src 'none'; img-src 'self'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


def security_headers(nonce: str) -> dict[str, str]:
    """The security headers every response carries.

    Args:
        nonce: the response's CSP nonce.

    Returns:
        Header name -> value.
    """
    return {
        "Content-Security-Policy": content_security_policy(nonce),
        "Cache-Control": "no-store",
        "Pragma": "no-cache",
        "Referrer-Policy": "same-origin",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cross-Origin-Resource-Policy": "same-origin",
        "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
    }


def same_origin(origin: str | None, scheme: str, host: str | None) -> bool:
    """Whether a request's ``Origin`` (when the browser sent one) is the server itself.

    Args:
        origin: the ``Origin`` header.
        scheme: the request's scheme.
        host: its ``Host`` header.

    Returns:
        True when there is no Origin (a script, a same-origin GET) or it matches.
    """
    if origin is None:
        return True
    return bool(host) and origin == f"{scheme}://{host}"


def is_loopback(host: str) -> bool:
    """Whether a bind address is this machine only (``127.0.0.0/8``, ``::1``, ``localhost``).

    Args:
        host: the address to bind.

    Returns:
        True for a loopback address.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
