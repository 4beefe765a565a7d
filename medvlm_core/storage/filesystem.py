"""One storage interface over local paths and object stores (fsspec URLs: ``/abs/path``, ``s3://b/k``).

Everything that reads or writes a manifest, an image, a model or a result table goes through ``Storage``,
so local and S3 behave the same and the atomic-write rules live in one place:

* ``write_bytes_atomic``: a reader sees the whole object or none of it (local: temp file + rename;
  object stores: one PUT, which is atomic per object).
* ``put_if_absent``: create-if-absent, for commit records that must be written exactly once.

Object-store calls are retried on transient failures (throttling, 5xx, dropped connections, truncated
bodies) by one ``RetryPolicy``: bounded attempts, exponential backoff with full jitter. The client
libraries' own hidden retries are turned off so that every retry is made, and counted, here
(``Storage.retries``: the run row's ``storage_retries``). Local files are never retried: a full disk is
not transient.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, TypeVar

import fsspec
from fsspec.core import url_to_fs

from medvlm_core import errors
from medvlm_core.errors import DocumentError
from medvlm_core.storage.retries import RetryPolicy, is_transient
from medvlm_core.storage.urls import LOCAL, normalize, protocol_of

# Object-store calls made at once by ``map_io`` (their network latency is what they wait on).
IO_THREADS = 16
T = TypeVar("T")
R = TypeVar("R")


def map_io(url: str, function: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``function`` over ``items`` (small reads and writes under ``url``): on ``IO_THREADS`` threads for an
    object store, one after another for local files.

    Why: an object-store call waits milliseconds on the network, which threads overlap; a local small file is
    read or written (fsync included) in well under a millisecond and the rest (Parquet decoding, merging) holds
    the GIL, so threads only add their start-up and hand-overs. The done index's 64 buckets of a 64-page run:
    0.05 s on threads against 0.027 s in turn (DEVELOPMENT.md).

    Args:
        url: where the files are (its protocol decides).
        function: the call per item.
        items: the items.

    Returns:
        The results, in the items' order.
    """
    if protocol_of(normalize(url)) == LOCAL:
        return [function(item) for item in items]
    with ThreadPoolExecutor(IO_THREADS) as pool:
        return list(pool.map(function, items))


def s3_options(
    endpoint_url: str | None = None,
    key: str | None = None,
    secret: str | None = None,
    token: str | None = None,
    profile: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """s3fs options from explicit values.

    Credentials left out here come from botocore's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
    AWS_SESSION_TOKEN, AWS_PROFILE, instance roles). An S3-compatible store's ``endpoint_url`` (callers take
    it from ``Settings.s3_endpoint`` when the run names none) gets path-style addressing.

    Args:
        endpoint_url: the store's endpoint, None for AWS.
        key: access key id.
        secret: secret access key.
        token: session token.
        profile: AWS profile name.
        extra: more s3fs options.

    Returns:
        The options for ``Storage({"s3": ...})``.
    """
    options: dict[str, Any] = dict(extra or {})
    endpoint = endpoint_url
    if endpoint:
        options["endpoint_url"] = endpoint
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("s3", {"addressing_style": "path"})
        options["config_kwargs"] = config
    for name, value in (("key", key), ("secret", secret), ("token", token), ("profile", profile)):
        if value:
            options[name] = value
    # Each Storage owns its filesystem: fsspec's global instance cache would hand one run's credentials
    # to another run in the same process.
    options["skip_instance_cache"] = True
    return options


class _SyncedFile:
    """A local file whose ``close`` flushes it to disk first (fsync), so a rename or link after it is durable."""

    def __init__(self, path: str):
        self._file = open(path, "wb")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


@contextmanager
def _local_temp(path: str) -> Iterator[tuple[str, Any]]:
    """A temp file next to ``path`` (a dot name: skipped by pyarrow.dataset, never matching a ``*.parquet``
    glob) and its handle; the block closes it (synced) and moves it into place; it is removed in any case."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    f = _SyncedFile(tmp)
    try:
        yield tmp, f
    finally:
        try:
            f.close()  # a no-op when the block closed it; may raise (a full disk) after a failed block
        except OSError:
            pass
        if os.path.exists(tmp):
            os.remove(tmp)


class Storage:
    """Reads and writes local paths and object-store URLs through fsspec.

    ``options`` maps a protocol to its fsspec storage options, e.g.
    ``{"s3": {"endpoint_url": "http://127.0.0.1:8333"}}``. Credentials normally come from the standard
    AWS environment variables or profile; never log this object's options.
    """

    def __init__(self, options: dict[str, dict[str, Any]] | None = None, retry: RetryPolicy | None = None):
        self._options = {k: dict(v) for k, v in (options or {}).items()}
        self._filesystems: dict[str, fsspec.AbstractFileSystem] = {}
        self.retry = retry or RetryPolicy()
        self._lock = threading.Lock()
        self._rng = random.Random()
        self.retries = 0  # object-store calls repeated after a transient failure, since this Storage was made

    def fresh(self) -> "Storage":
        """A new Storage with the same options and retry policy, its retry count at zero (one per run).

        Returns:
            The new storage.
        """
        return Storage(self._options, self.retry)

    def __repr__(self) -> str:  # never print credentials
        return f"Storage(protocols={sorted(self._options)})"

    def filesystem(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem for ``url`` (cached per protocol) and the path within it."""
        url = normalize(url)
        proto = protocol_of(url)
        fs = self._filesystems.get(proto)
        if fs is None:
            options = dict(self._options.get(proto, {}))
            if proto == "s3":
                # One retry layer, ours: botocore and s3fs would otherwise retry silently (uncounted).
                config = dict(options.get("config_kwargs") or {})
                config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
                options["config_kwargs"] = config
                # A cached listing would say "missing" right after a write by someone else (or by a try
                # whose response was lost): ask the store.
                options.setdefault("use_listings_cache", False)
            fs, _ = url_to_fs(url, **options)
            if proto == "s3":
                fs.retries = 1
            self._filesystems[proto] = fs
        return fs, fs._strip_protocol(url)

    def call(self, url: str, operation: Callable[[], T]) -> T:
        """Run ``operation`` (which touches ``url``) under the retry policy when ``url`` is remote."""
        if protocol_of(normalize(url)) == LOCAL:
            return operation()
        failures = 0
        while True:
            try:
                return operation()
            except BaseException as exc:
                failures += 1
                if not isinstance(exc, Exception) or failures >= self.retry.max_attempts or not is_transient(exc):
                    raise
                with self._lock:
                    self.retries += 1
                    pause = self.retry.delay(failures, self._rng)
                time.sleep(pause)

    # -- reading ---------------------------------------------------------------------------------
    def read_bytes(self, url: str, max_bytes: int | None = None) -> bytes:
        """Whole object as bytes. Missing -> DocumentError(not_found); over ``max_bytes`` -> too_large."""
        fs, path = self.filesystem(url)
        size = None

        def read() -> bytes:
            if protocol_of(normalize(url)) == "s3":
                # One GET. s3fs's open() asks the object's size first (a HEAD), and so does cat_file at its
                # default concurrency (to split big objects into ranges): two billed requests a read, twice the
                # wait (256 small reads on SeaweedFS: 512 -> 256 requests, 0.52 -> 0.25 s; DEVELOPMENT.md).
                if max_bytes is None:
                    return fs.cat_file(path, max_concurrency=1)
                if size == 0:  # a range request on an empty object is refused (416)
                    return b""
                # The size was checked, but the object may change: read no more than one byte over the limit.
                return fs.cat_file(path, start=0, end=max_bytes + 1, max_concurrency=1)
            with fs.open(path, "rb") as f:
                return f.read() if max_bytes is None else f.read(max_bytes + 1)

        try:
            if max_bytes is not None:
                size = self.call(url, lambda: fs.size(path))
                if size is not None and size > max_bytes:
                    raise DocumentError(
                        errors.TOO_LARGE, f"{url}: file is {size} bytes, over the max_bytes limit {max_bytes}"
                    )
            data = self.call(url, read)
        except DocumentError:
            raise
        except FileNotFoundError:
            raise DocumentError(errors.NOT_FOUND, f"{url}: file not found") from None
        except IsADirectoryError:
            raise DocumentError(errors.NOT_FOUND, f"{url}: is a directory, not a file") from None
        except PermissionError:
            raise DocumentError(errors.READ_FAILED, f"{url}: access denied") from None
        except OSError as exc:
            raise DocumentError(errors.READ_FAILED, f"{url}: read failed ({type(exc).__name__})") from None
        if max_bytes is not None and len(data) > max_bytes:
            raise DocumentError(errors.TOO_LARGE, f"{url}: file is over the max_bytes limit {max_bytes}")
        return data

    def exists(self, url: str) -> bool:
        """True when the object or folder exists."""
        fs, path = self.filesystem(url)
        return self.call(url, lambda: fs.exists(path))

    def info(self, url: str) -> dict[str, Any]:
        """fsspec's info of one object (size, ETag or mtime, ...). FileNotFoundError if missing."""
        fs, path = self.filesystem(url)
        return self.call(url, lambda: fs.info(path))

    def _find(self, prefix: str, detail: bool = False) -> Any:
        """fsspec's ``find`` under ``prefix``: one listing. A missing prefix lists nothing; so does a missing
        bucket (s3fs raises for it). No ``exists`` first: on S3 that is a HEAD and a LIST of its own."""
        fs, path = self.filesystem(prefix)
        try:
            return self.call(prefix, lambda: fs.find(path, detail=detail))
        except FileNotFoundError:
            return {} if detail else []

    def list_files(self, prefix: str, suffix: str = "") -> list[str]:
        """Full URLs of the files under ``prefix`` (recursive) whose names end with ``suffix``, sorted."""
        proto = protocol_of(normalize(prefix))
        out = []
        for p in self._find(prefix):
            if p.endswith(suffix):
                out.append(p if proto == LOCAL else f"{proto}://{p}")
        return sorted(out)

    def list_fingerprints(self, prefix: str) -> dict[str, str]:
        """Full URL -> fingerprint (size and ETag or mtime) of every file under ``prefix``: what changed."""
        proto = protocol_of(normalize(prefix))
        out = {}
        for p, info in self._find(prefix, detail=True).items():
            version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
            out[p if proto == LOCAL else f"{proto}://{p}"] = f"{info.get('size')}|{version}"
        return dict(sorted(out.items()))

    # -- writing ---------------------------------------------------------------------------------
    def makedirs(self, url: str) -> None:
        """Create a local folder (object stores have no folders: nothing to do)."""
        if protocol_of(normalize(url)) == LOCAL:
            os.makedirs(normalize(url), exist_ok=True)

    @contextmanager
    def open_atomic(self, url: str) -> Iterator[Any]:
        """A binary file handle whose content becomes visible at ``url`` only when the block succeeds."""
        url = normalize(url)
        fs, path = self.filesystem(url)
        if protocol_of(url) == LOCAL:
            with _local_temp(path) as (tmp, f):
                yield f
                f.close()
                os.replace(tmp, path)
        else:
            # Spooled locally first: fsspec files commit on close even when the block raised, and a
            # retried upload needs the bytes again. Then one PUT (or one completed multipart upload):
            # atomic for readers.
            with tempfile.SpooledTemporaryFile(max_size=16 * 2**20) as spool:
                yield spool
                self.call(url, lambda: self._upload(fs, path, spool, "wb"))

    @staticmethod
    def _upload(fs: Any, path: str, spool: Any, mode: str) -> None:
        spool.seek(0)
        with fs.open(path, mode) as out:
            shutil.copyfileobj(spool, out, 8 * 2**20)

    def write_bytes_atomic(self, url: str, data: bytes) -> None:
        """Write ``data`` so that readers see all of it or nothing."""
        with self.open_atomic(url) as f:
            f.write(data)

    def put_if_absent(self, url: str, data: bytes) -> bool:
        """Create ``url`` with ``data`` unless it exists. True if this call created it."""
        url = normalize(url)
        fs, path = self.filesystem(url)
        if protocol_of(url) == LOCAL:
            # Written whole to a temp file, then hard-linked into place: link() fails if the name exists,
            # and a full disk leaves no half-written record behind under the final name.
            try:
                with _local_temp(path) as (tmp, f):
                    f.write(data)
                    f.close()
                    os.link(tmp, path)
            except FileExistsError:
                return False
            return True
        if self.exists(url):
            return False
        def create() -> bool:
            try:
                # "xb" sends If-None-Match: * so two writers racing cannot both win.
                with fs.open(path, "xb") as f:
                    f.write(data)
            except (FileExistsError, OSError) as exc:
                if isinstance(exc, OSError) and not isinstance(exc, FileExistsError) and is_transient(exc):
                    raise
                # SeaweedFS reports the 412 refusal as OSError(EINVAL). A PUT whose response was lost is
                # resent (by aiohttp itself, or by our retry) and refused: an object holding exactly our
                # bytes is ours (a commit record carries its own timestamp, so no other writer's matches).
                if fs.exists(path):
                    return self.read_bytes(url) == data
                raise
            return True

        return self.call(url, create)

    def remove_tree(self, url: str) -> None:
        """Delete a folder/prefix and everything under it; missing is fine."""
        fs, path = self.filesystem(url)
        if protocol_of(normalize(url)) == LOCAL:
            try:
                fs.rm(path, recursive=True)
            except FileNotFoundError:
                pass
            return
        # Object by object, each step retried on its own: one bulk call would redo everything on any fault.
        for found in self.call(url, lambda: fs.find(path)):
            def remove(target: str = found) -> None:
                try:
                    fs.rm_file(target)
                except FileNotFoundError:  # gone already (a retried delete whose answer was lost)
                    pass

            self.call(url, remove)
