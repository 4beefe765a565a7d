"""Models from object storage: download once into a local cache, verified, atomic and safe across workers.

``--model s3://...`` (and ``--mmproj``), or one ``.zip`` holding both as vendors ship them, are copied into
``<cache_dir>/models/`` the first time and reused after. A download goes to a temp file and is renamed into
place only when complete and (if a sha256 was given) verified, under a per-file lock, so several workers
starting at once on one host download it once and never load a half-written file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from medvlm_core import storage as st
from medvlm_core.errors import DocumentError, RunError
from medvlm_core.model.files import file_sha256, read_gguf_metadata
from medvlm_core.storage import Storage

_CHUNK = 8 * 1024 * 1024


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held across processes on this host."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cache_name(url: str) -> str:
    """A cache file name unique per source URL, readable by a person."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return f"{digest}-{os.path.basename(url.rstrip('/')) or 'model'}"


def _remote_fingerprint(storage: Storage, url: str) -> dict:
    """Size and ETag of the remote object: a changed object means a new download."""
    try:
        info = storage.info(url)
    except FileNotFoundError:
        raise RunError(f"{url}: model file not found") from None
    except PermissionError:
        raise RunError(f"{url}: access denied (check the S3 credentials)") from None
    except OSError as exc:
        raise RunError(f"{url}: cannot be read ({type(exc).__name__})") from None
    return {"size": info.get("size"), "etag": str(info.get("ETag") or info.get("etag") or "")}


def _download(storage: Storage, url: str, target: Path, expected_sha256: str | None) -> str:
    """Copy ``url`` to ``target`` atomically, hashing on the way. Returns the sha256."""
    fs, path = storage.filesystem(url)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)

    def attempt() -> str:  # a failed try starts over: the storage retry policy decides how often
        digest = hashlib.sha256()
        with open(tmp, "wb") as out, fs.open(path, "rb") as src:
            for block in iter(lambda: src.read(_CHUNK), b""):
                digest.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        return digest.hexdigest()

    try:
        os.close(fd)
        actual = storage.call(url, attempt)
        if expected_sha256 and actual != expected_sha256.lower():
            raise RunError(f"{url}: sha256 mismatch (expected {expected_sha256.lower()}, got {actual}); refusing the model")
        os.replace(tmp, target)
        return actual
    except RunError:
        raise
    except Exception as exc:
        # ENOSPC, or the store still failing after the retries: say so plainly; the temp file is removed
        # below, nothing half-written remains.
        reason = (exc.strerror if isinstance(exc, OSError) else None) or type(exc).__name__
        raise RunError(f"{url}: download into {target.parent} failed ({reason})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def fetch_file(url: str, storage: Storage, cache_dir: str | os.PathLike, sha256: str | None = None) -> str:
    """A local path for ``url``: local paths are checked and returned as they are, remote ones cached.

    RunError if the file is missing, unreadable, or does not match ``sha256``.
    """
    url = st.normalize(url)
    if st.protocol_of(url) == st.LOCAL:
        if not os.path.isfile(url):
            raise RunError(f"{url}: model file not found")
        if sha256 and file_sha256(url) != sha256.lower():
            raise RunError(f"{url}: sha256 mismatch (expected {sha256.lower()}); refusing the model")
        return url
    models = Path(cache_dir) / "models"
    models.mkdir(parents=True, exist_ok=True)
    target = models / _cache_name(url)
    meta_file = target.with_name(target.name + ".json")
    with _file_lock(target.with_name(target.name + ".lock")):
        fingerprint = _remote_fingerprint(storage, url)
        if target.exists() and meta_file.exists():
            meta = json.loads(meta_file.read_text())
            if meta.get("fingerprint") == fingerprint and (not sha256 or meta.get("sha256") == sha256.lower()):
                return str(target)
        actual = _download(storage, url, target, sha256)
        meta_file.write_text(json.dumps({"url": url, "fingerprint": fingerprint, "sha256": actual}))
    return str(target)


def split_bundle(zip_path: str, cache_dir: str | os.PathLike) -> tuple[str, str]:
    """Extract a vendor ``.zip`` holding a text GGUF and an mmproj GGUF; returns (model, mmproj) paths.

    Which file is which comes from the GGUF metadata (the mmproj's architecture is ``clip``), not names.
    """
    stat = os.stat(zip_path)
    identity = f"{os.path.realpath(zip_path)}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]
    target = Path(cache_dir) / "models" / f"{digest}-{Path(zip_path).name}.d"
    with _file_lock(target.with_name(target.name + ".lock")):
        done = target / ".complete"
        if not done.exists():
            if target.exists():
                shutil.rmtree(target)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            try:
                with zipfile.ZipFile(zip_path) as bundle:
                    members = [m for m in bundle.infolist() if m.filename.lower().endswith(".gguf") and not m.is_dir()]
                    for member in members:
                        # Flatten names: a member path like ../../x must not escape the cache.
                        with bundle.open(member) as src, open(tmp / os.path.basename(member.filename), "wb") as out:
                            shutil.copyfileobj(src, out, _CHUNK)
                (tmp / ".complete").write_text("ok")
                os.replace(tmp, target)
            except (zipfile.BadZipFile, OSError) as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                reason = (exc.strerror if isinstance(exc, OSError) else None) or type(exc).__name__
                raise RunError(f"{zip_path}: cannot extract the model bundle into {target.parent} ({reason})") from None
    ggufs = sorted(p for p in target.iterdir() if p.suffix.lower() == ".gguf")
    projectors = [p for p in ggufs if read_gguf_metadata(p).get("general.architecture") == "clip"]
    texts = [p for p in ggufs if p not in projectors]
    if len(projectors) != 1 or len(texts) != 1:
        raise RunError(
            f"{zip_path}: a model bundle must hold exactly one text GGUF and one mmproj GGUF "
            f"(found {len(texts)} text, {len(projectors)} mmproj)"
        )
    return str(texts[0]), str(projectors[0])


def resolve_model_files(
    model: str,
    mmproj: str | None,
    storage: Storage,
    cache_dir: str | os.PathLike,
    model_sha256: str | None = None,
    mmproj_sha256: str | None = None,
) -> tuple[str, str, str | None]:
    """Local files for the given model URIs; a ``.zip`` model holds both GGUFs and needs no mmproj.

    Args:
        model: the text GGUF's URI, or a model zip's.
        mmproj: the mmproj GGUF's URI (None with a zip).
        storage: where remote models are.
        cache_dir: the local model cache.
        model_sha256: the expected hash of ``model``.
        mmproj_sha256: the expected hash of ``mmproj``.

    Returns:
        ``(model path, mmproj path, the local zip's path or None)``.

    Raises:
        RunError: a missing or mismatched file, or a zip that does not hold exactly the two GGUFs.
    """
    try:
        model_path = fetch_file(model, storage, cache_dir, model_sha256)
        if model_path.lower().endswith(".zip"):
            if mmproj:
                raise RunError("a .zip model bundle holds the mmproj too: do not pass --mmproj with it")
            return (*split_bundle(model_path, cache_dir), model_path)
        if not mmproj:
            raise RunError("--mmproj is required unless --model is a .zip bundle holding both files")
        return model_path, fetch_file(mmproj, storage, cache_dir, mmproj_sha256), None
    except DocumentError as exc:
        raise RunError(exc.message) from None
