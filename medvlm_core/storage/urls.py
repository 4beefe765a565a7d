"""URLs and paths as medvlm spells them: local paths and ``file://`` URLs, ``s3://`` (and ``s3a://``) URLs."""

from __future__ import annotations

import os
import posixpath
from urllib.parse import urlparse

LOCAL = "file"


def protocol_of(url: str) -> str:
    """``"s3"`` for ``s3://...``, ``"file"`` for local paths and ``file://`` URLs."""
    if "://" not in url:
        return LOCAL
    scheme = url.split("://", 1)[0].lower()
    return "s3" if scheme in ("s3", "s3a") else scheme


def normalize(url: str) -> str:
    """Canonical form: absolute local paths without ``file://``, ``s3a://`` as ``s3://``."""
    url = str(url)
    proto = protocol_of(url)
    if proto == LOCAL:
        if url.startswith("file://"):
            url = urlparse(url).path
        return os.path.abspath(os.path.expanduser(url))
    if url.lower().startswith("s3a://"):
        return "s3://" + url[6:]
    return url


def is_absolute(uri: str) -> bool:
    """True for URLs with a scheme and for absolute local paths."""
    return "://" in uri or os.path.isabs(uri)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a URL or path with ``/``."""
    if protocol_of(base) == LOCAL:
        return os.path.join(base, *parts)
    return posixpath.join(base.rstrip("/"), *parts)


def dirname(url: str) -> str:
    """The folder (prefix) holding ``url``."""
    if protocol_of(url) == LOCAL:
        return os.path.dirname(url)
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{posixpath.dirname(rest)}"


def resolve(uri: str, base_dir: str) -> str:
    """Resolve ``uri`` (absolute URL, absolute path, or path relative to ``base_dir``) to a full URL."""
    if is_absolute(uri):
        return normalize(uri)
    if protocol_of(base_dir) == LOCAL:
        return os.path.normpath(os.path.join(base_dir, uri))
    scheme, rest = base_dir.split("://", 1)
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, uri))}"
