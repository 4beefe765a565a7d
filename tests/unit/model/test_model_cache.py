"""Models from object storage (medvlm_core.model.cache): downloaded once into the local cache, verified, atomic,
reused, safe when several workers start at once; local files checked and used where they are; a vendor
``.zip`` split into its text and mmproj GGUFs by their metadata.

Real parts throughout: the generated tiny GGUF pair, a real S3 server (SeaweedFS on loopback, the session's
``s3_server``), real zip files. Errors are ``RunError``s naming the model's URL or file. No Prefect.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
import zipfile
from pathlib import Path

import pytest

from medvlm_core.errors import RunError
from medvlm_core.model import cache
from medvlm_core.model.cache import fetch_file, resolve_model_files, split_bundle
from medvlm_core.storage import Storage, s3_options

BUCKET = "medvlm-model-cache"


@pytest.fixture(scope="module")
def prefect_server():
    """Overrides the session's autouse Prefect test server: nothing here runs a flow."""
    yield


@pytest.fixture(scope="module")
def bucket(s3_server):
    s3_server.create_bucket(BUCKET)
    return BUCKET


@pytest.fixture
def remote(s3, s3_server, bucket):
    """``(storage, prefix)``: a Storage on the S3 server (as a run builds it) and a fresh prefix in the bucket."""
    return Storage({"s3": s3_options(endpoint_url=s3_server.endpoint_url)}), f"s3://{bucket}/{uuid.uuid4().hex[:12]}"


def sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cached_files(cache_dir: Path) -> list[str]:
    """Everything in the model cache, temp files included (names only)."""
    models = cache_dir / "models"
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


def bundle(path: Path, members: dict[str, Path | bytes]) -> Path:
    """A zip holding ``members`` (arcname -> file or bytes), as vendors ship models."""
    with zipfile.ZipFile(path, "w") as z:
        for name, content in members.items():
            if isinstance(content, Path):
                z.write(content, name)
            else:
                z.writestr(name, content)
    return path


@pytest.fixture
def count_downloads(monkeypatch):
    """How many times the real download ran (the counting wrapper calls it unchanged)."""
    calls: list[str] = []
    real = cache._download

    def counted(storage, url, target, expected):
        calls.append(url)
        return real(storage, url, target, expected)

    monkeypatch.setattr(cache, "_download", counted)
    return calls


# ---------------------------------------------------------------------------------------------------------
# Local files


def test_a_local_model_is_used_where_it_is(tiny_llava, tmp_path):
    path = str(tiny_llava.model_path)
    assert fetch_file(path, Storage(), tmp_path / "cache") == path
    assert fetch_file(f"file://{path}", Storage(), tmp_path / "cache", sha(path).upper()) == path  # case of the hash is free
    assert cached_files(tmp_path / "cache") == []  # nothing copied


def test_a_missing_or_mismatched_local_model_is_refused_naming_it(tiny_llava, tmp_path):
    missing = str(tmp_path / "models" / "none.gguf")
    with pytest.raises(RunError, match=rf"^{missing}: model file not found$"):
        fetch_file(missing, Storage(), tmp_path / "cache")
    with pytest.raises(RunError, match=rf"^{tmp_path}: model file not found$"):  # a folder is not a model file
        fetch_file(str(tmp_path), Storage(), tmp_path / "cache")
    path = str(tiny_llava.model_path)
    with pytest.raises(RunError) as info:
        fetch_file(path, Storage(), tmp_path / "cache", "AB" * 32)
    assert str(info.value) == f"{path}: sha256 mismatch (expected {'ab' * 32}); refusing the model"


# ---------------------------------------------------------------------------------------------------------
# S3: download once, reuse, verify


def test_a_model_on_s3_is_downloaded_once_into_the_cache_and_reused(remote, tiny_llava, tmp_path, count_downloads):
    storage, prefix = remote
    url = f"{prefix}/models/tiny.gguf"
    storage.write_bytes_atomic(url, tiny_llava.model_path.read_bytes())
    cache_dir = tmp_path / "cache"
    first = fetch_file(url, storage, cache_dir, sha(tiny_llava.model_path))
    assert Path(first).parent == cache_dir / "models" and first.endswith("-tiny.gguf")
    assert sha(first) == sha(tiny_llava.model_path)
    inode = os.stat(first).st_ino
    # the next run (its own storage), with or without the hash: the cached file, not a new download
    again = fetch_file(url, storage.fresh(), cache_dir)
    assert again == first and os.stat(again).st_ino == inode
    assert fetch_file(f"s3a://{url[5:]}", storage, cache_dir, sha(tiny_llava.model_path)) == first  # s3a is s3
    assert count_downloads == [url]
    assert sorted(n.rsplit("-", 1)[-1] for n in cached_files(cache_dir)) == ["tiny.gguf", "tiny.gguf.json", "tiny.gguf.lock"]


def test_two_urls_with_the_same_file_name_get_two_cache_files(remote, tiny_llava, tmp_path):
    storage, prefix = remote
    storage.write_bytes_atomic(f"{prefix}/a/model.gguf", tiny_llava.model_path.read_bytes())
    storage.write_bytes_atomic(f"{prefix}/b/model.gguf", tiny_llava.mmproj_path.read_bytes())
    a = fetch_file(f"{prefix}/a/model.gguf", storage, tmp_path / "cache")
    b = fetch_file(f"{prefix}/b/model.gguf", storage, tmp_path / "cache")
    assert a != b and (sha(a), sha(b)) == (sha(tiny_llava.model_path), sha(tiny_llava.mmproj_path))


def test_a_model_replaced_on_s3_is_downloaded_again(remote, tiny_llava, tmp_path, count_downloads):
    storage, prefix = remote
    url = f"{prefix}/models/tiny.gguf"
    storage.write_bytes_atomic(url, tiny_llava.model_path.read_bytes())
    first = fetch_file(url, storage, tmp_path / "cache")
    storage.write_bytes_atomic(url, tiny_llava.mmproj_path.read_bytes())  # a new version under the same name
    second = fetch_file(url, storage.fresh(), tmp_path / "cache")
    assert second == first and sha(second) == sha(tiny_llava.mmproj_path)
    assert count_downloads == [url, url]


def test_a_download_that_does_not_match_its_hash_is_refused_and_leaves_nothing(remote, tiny_llava, tmp_path):
    storage, prefix = remote
    url = f"{prefix}/models/tiny.gguf"
    storage.write_bytes_atomic(url, tiny_llava.model_path.read_bytes())
    with pytest.raises(RunError) as info:
        fetch_file(url, storage, tmp_path / "cache", "00" * 32)
    assert str(info.value) == (f"{url}: sha256 mismatch (expected {'00' * 32}, got {sha(tiny_llava.model_path)}); "
                               "refusing the model")
    assert [n for n in cached_files(tmp_path / "cache") if not n.endswith(".lock")] == []  # no model, no temp file
    # with the right hash it is fetched as usual
    assert sha(fetch_file(url, storage, tmp_path / "cache", sha(tiny_llava.model_path))) == sha(tiny_llava.model_path)


def test_a_cached_model_asked_for_with_another_hash_is_checked_again(remote, tiny_llava, tmp_path):
    storage, prefix = remote
    url = f"{prefix}/models/tiny.gguf"
    storage.write_bytes_atomic(url, tiny_llava.model_path.read_bytes())
    path = fetch_file(url, storage, tmp_path / "cache")
    with pytest.raises(RunError, match="sha256 mismatch"):
        fetch_file(url, storage, tmp_path / "cache", "11" * 32)  # the cache never vouches for a hash it did not see
    assert sha(path) == sha(tiny_llava.model_path)  # the good cached copy is still there


def test_a_missing_model_or_wrong_credentials_are_run_errors_naming_the_url(remote, s3_server, tmp_path):
    storage, prefix = remote
    with pytest.raises(RunError, match=rf"^{prefix}/none\.gguf: model file not found$"):
        fetch_file(f"{prefix}/none.gguf", storage, tmp_path / "cache")
    storage.write_bytes_atomic(f"{prefix}/m.gguf", b"GGUF")
    denied = Storage({"s3": s3_options(endpoint_url=s3_server.endpoint_url, key="not-a-key", secret="not-a-secret")})
    with pytest.raises(RunError, match=rf"^{prefix}/m\.gguf: access denied \(check the S3 credentials\)$"):
        fetch_file(f"{prefix}/m.gguf", denied, tmp_path / "cache")
    assert [n for n in cached_files(tmp_path / "cache") if not n.endswith(".lock")] == []


def test_workers_starting_at_once_download_the_model_once(remote, tiny_llava, tmp_path, count_downloads):
    storage, prefix = remote
    url = f"{prefix}/models/tiny.gguf"
    storage.write_bytes_atomic(url, tiny_llava.model_path.read_bytes())
    paths: list[str] = []
    start = threading.Barrier(4)

    def worker():
        own = storage.fresh()
        start.wait()
        paths.append(fetch_file(url, own, tmp_path / "cache", sha(tiny_llava.model_path)))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(paths) == 4 and len(set(paths)) == 1 and sha(paths[0]) == sha(tiny_llava.model_path)
    assert count_downloads == [url]


# ---------------------------------------------------------------------------------------------------------
# Vendor zips


def test_a_bundle_is_split_by_metadata_not_by_names(tiny_llava, tmp_path):
    # named the wrong way round on purpose: the mmproj's architecture (clip) decides
    zip_path = bundle(tmp_path / "vendor.zip", {"model/projector.gguf": tiny_llava.model_path,
                                                "model/text-model.gguf": tiny_llava.mmproj_path,
                                                "README.txt": b"not a model"})
    model, mmproj = split_bundle(str(zip_path), tmp_path / "cache")
    assert (sha(model), sha(mmproj)) == (sha(tiny_llava.model_path), sha(tiny_llava.mmproj_path))
    assert Path(model).parent == Path(mmproj).parent and Path(model).parent.parent == tmp_path / "cache" / "models"
    assert sorted(p.name for p in Path(model).parent.iterdir()) == [".complete", "projector.gguf", "text-model.gguf"]
    assert split_bundle(str(zip_path), tmp_path / "cache") == (model, mmproj)  # extracted once, reused


def test_a_bundles_member_paths_cannot_leave_the_cache(tiny_llava, tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    zip_path = bundle(tmp_path / "a" / "b" / "evil.zip",
                      {"../../../model.gguf": tiny_llava.model_path, "/abs/mmproj.gguf": tiny_llava.mmproj_path})
    model, mmproj = split_bundle(str(zip_path), tmp_path / "a" / "b" / "cache")
    assert Path(model).name == "model.gguf" and Path(mmproj).name == "mmproj.gguf"
    assert Path(model).parent.parent == tmp_path / "a" / "b" / "cache" / "models"
    assert not (tmp_path / "model.gguf").exists() and not (tmp_path / "a" / "model.gguf").exists()


@pytest.mark.parametrize("members, found", [
    ({"model.gguf": "text"}, "found 1 text, 0 mmproj"),
    ({"a.gguf": "text", "b.gguf": "text", "p.gguf": "mmproj"}, "found 2 text, 1 mmproj"),
    ({"p.gguf": "mmproj", "q.gguf": "mmproj", "m.gguf": "text"}, "found 1 text, 2 mmproj"),
    ({"notes.txt": b"hello"}, "found 0 text, 0 mmproj"),
])
def test_a_bundle_without_exactly_one_text_and_one_mmproj_gguf_is_refused(tiny_llava, tmp_path, members, found):
    files = {"text": tiny_llava.model_path, "mmproj": tiny_llava.mmproj_path}
    zip_path = bundle(tmp_path / "vendor.zip", {n: files.get(c, c) for n, c in members.items()})
    with pytest.raises(RunError) as info:
        split_bundle(str(zip_path), tmp_path / "cache")
    assert str(info.value) == (f"{zip_path}: a model bundle must hold exactly one text GGUF and one mmproj GGUF ({found})")


def test_a_file_that_is_not_a_zip_is_refused_naming_it_and_leaves_nothing(tmp_path):
    fake = tmp_path / "model.zip"
    fake.write_bytes(b"GGUF and then some")
    with pytest.raises(RunError, match=rf"^{fake}: cannot extract the model bundle into {tmp_path / 'cache' / 'models'} \(BadZipFile\)$"):
        split_bundle(str(fake), tmp_path / "cache")
    assert [n for n in cached_files(tmp_path / "cache") if not n.endswith(".lock")] == []


# ---------------------------------------------------------------------------------------------------------
# resolve_model_files: what a run calls


def test_a_gguf_pair_on_s3_resolves_to_two_cached_files(remote, tiny_llava, tmp_path):
    storage, prefix = remote
    storage.write_bytes_atomic(f"{prefix}/m.gguf", tiny_llava.model_path.read_bytes())
    storage.write_bytes_atomic(f"{prefix}/p.gguf", tiny_llava.mmproj_path.read_bytes())
    model, mmproj, zip_path = resolve_model_files(f"{prefix}/m.gguf", f"{prefix}/p.gguf", storage, tmp_path / "cache",
                                                  sha(tiny_llava.model_path), sha(tiny_llava.mmproj_path))
    assert (sha(model), sha(mmproj), zip_path) == (sha(tiny_llava.model_path), sha(tiny_llava.mmproj_path), None)
    with pytest.raises(RunError, match=rf"^{prefix}/p\.gguf: sha256 mismatch"):  # each file checked against its own hash
        resolve_model_files(f"{prefix}/m.gguf", f"{prefix}/p.gguf", storage, tmp_path / "cache",
                            sha(tiny_llava.model_path), sha(tiny_llava.model_path))


def test_a_zip_on_s3_resolves_to_its_two_ggufs_and_the_local_zip(remote, tiny_llava, tmp_path):
    storage, prefix = remote
    zip_path = bundle(tmp_path / "vendor.zip", {"text.gguf": tiny_llava.model_path, "mmproj.gguf": tiny_llava.mmproj_path})
    storage.write_bytes_atomic(f"{prefix}/vendor.zip", zip_path.read_bytes())
    model, mmproj, local_zip = resolve_model_files(f"{prefix}/vendor.zip", None, storage, tmp_path / "cache", sha(zip_path))
    assert (sha(model), sha(mmproj), sha(local_zip)) == (sha(tiny_llava.model_path), sha(tiny_llava.mmproj_path), sha(zip_path))
    assert Path(local_zip).parent == tmp_path / "cache" / "models"


def test_a_zip_with_an_mmproj_or_a_gguf_without_one_is_refused(tiny_llava, tmp_path):
    zip_path = bundle(tmp_path / "vendor.zip", {"text.gguf": tiny_llava.model_path, "mmproj.gguf": tiny_llava.mmproj_path})
    with pytest.raises(RunError, match=r"^a \.zip model bundle holds the mmproj too: do not pass --mmproj with it$"):
        resolve_model_files(str(zip_path), str(tiny_llava.mmproj_path), Storage(), tmp_path / "cache")
    with pytest.raises(RunError, match=r"^--mmproj is required unless --model is a \.zip bundle holding both files$"):
        resolve_model_files(str(tiny_llava.model_path), None, Storage(), tmp_path / "cache")
    with pytest.raises(RunError, match=r"none\.gguf: model file not found"):
        resolve_model_files(str(tiny_llava.model_path), str(tmp_path / "none.gguf"), Storage(), tmp_path / "cache")
