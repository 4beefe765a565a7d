"""Storage behaviour: URI resolution, atomic writes, create-if-absent, moves; on S3, the requests a read or a
listing sends."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import pytest

from medvlm_core import errors
from medvlm_core import storage as st
from medvlm_core.errors import DocumentError
from medvlm_core.storage import Storage


def test_resolve_relative_and_absolute():
    assert st.resolve("img/a.png", "s3://b/manifests") == "s3://b/manifests/img/a.png"
    assert st.resolve("../img/a.png", "s3://b/manifests") == "s3://b/img/a.png"
    assert st.resolve("s3a://x/y.png", "/tmp") == "s3://x/y.png"
    assert st.resolve("file:///data/a.png", "/tmp") == "/data/a.png"
    assert st.resolve("a.png", "/data/in") == "/data/in/a.png"
    assert st.dirname("s3://b/p/m.csv") == "s3://b/p"


def test_read_errors_are_document_errors(tmp_path):
    storage = Storage()
    with pytest.raises(DocumentError) as info:
        storage.read_bytes(str(tmp_path / "nope.png"))
    assert info.value.error_type == errors.NOT_FOUND and "nope.png" in info.value.message
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 100)
    with pytest.raises(DocumentError) as info:
        storage.read_bytes(str(big), max_bytes=10)
    assert info.value.error_type == errors.TOO_LARGE


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    storage = Storage()
    target = tmp_path / "out" / "t.parquet"
    with pytest.raises(RuntimeError):
        with storage.open_atomic(str(target)) as f:
            f.write(b"half")
            raise RuntimeError("disk went away")
    assert not target.exists() and os.listdir(tmp_path / "out") == []
    storage.write_bytes_atomic(str(target), b"whole")
    assert target.read_bytes() == b"whole" and os.listdir(tmp_path / "out") == ["t.parquet"]


def test_put_if_absent_writes_once(tmp_path):
    storage = Storage()
    url = str(tmp_path / "_commits" / "r1.json")
    assert storage.put_if_absent(url, b"first") is True
    assert storage.put_if_absent(url, b"second") is False
    assert open(url, "rb").read() == b"first"


def test_list_and_remove(tmp_path):
    storage = Storage()
    storage.write_bytes_atomic(str(tmp_path / "a" / "1.parquet"), b"1")
    storage.write_bytes_atomic(str(tmp_path / "a" / "b" / "2.parquet"), b"2")
    assert [os.path.basename(p) for p in storage.list_files(str(tmp_path / "a"), ".parquet")] == ["1.parquet", "2.parquet"]
    storage.remove_tree(str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()


def test_map_io_runs_local_work_in_turn_and_object_store_work_on_threads(tmp_path):
    def where(item):
        return item, threading.get_ident()

    caller = threading.get_ident()
    local = st.map_io(str(tmp_path), where, range(40))
    assert [item for item, _ in local] == list(range(40))
    assert {thread for _, thread in local} == {caller}
    remote = st.map_io("s3://bucket/out/_index", where, range(40))
    assert [item for item, _ in remote] == list(range(40))
    assert caller not in {thread for _, thread in remote}


def _s3_storage(s3_server, bucket: str) -> Storage:
    s3_server.create_bucket(bucket)
    return Storage({"s3": st.s3_options(endpoint_url=s3_server.endpoint_url)})


@contextmanager
def s3_requests(storage: Storage, url: str) -> Iterator[tuple[Any, list[str]]]:
    """The s3fs filesystem ``storage`` uses for ``url``, and the S3 operations it sends inside the block, in order.

    fsspec caches filesystem instances: whatever the block sets on this one is removed after it.
    """
    fs, _ = storage.filesystem(url)
    before = set(fs.__dict__)
    calls: list[str] = []
    original = fs._call_s3

    async def counting(method, *args, **kwargs):
        calls.append(method)
        return await original(method, *args, **kwargs)

    fs._call_s3 = counting
    try:
        yield fs, calls
    finally:
        for name in set(fs.__dict__) - before:
            del fs.__dict__[name]


def test_an_s3_read_is_one_get_request(s3_server, s3):
    # Requests are what an object store bills and waits on: a whole-object read is one GET (s3fs's open() and
    # cat_file would first ask the size with a HEAD); a read under max_bytes asks the size once, then reads at
    # most one byte over the limit.
    storage = _s3_storage(s3_server, "medvlm-reads")
    base = "s3://medvlm-reads/r"
    storage.write_bytes_atomic(f"{base}/small.bin", b"a" * 1000)
    storage.write_bytes_atomic(f"{base}/empty.bin", b"")
    with s3_requests(storage, base) as (fs, calls):
        assert storage.read_bytes(f"{base}/small.bin") == b"a" * 1000
        assert calls == ["get_object"]
        calls.clear()
        assert storage.read_bytes(f"{base}/small.bin", max_bytes=1000) == b"a" * 1000
        assert calls == ["head_object", "get_object"]
        assert storage.read_bytes(f"{base}/empty.bin") == b"" and storage.read_bytes(f"{base}/empty.bin", max_bytes=10) == b""
        with pytest.raises(DocumentError) as info:
            storage.read_bytes(f"{base}/small.bin", max_bytes=999)
        assert info.value.error_type == errors.TOO_LARGE
        with pytest.raises(DocumentError) as info:
            storage.read_bytes(f"{base}/missing.bin")
        assert info.value.error_type == errors.NOT_FOUND and "missing.bin" in info.value.message
        # An object that grows between the size check and the read: no more than max_bytes + 1 bytes come back.
        got: list[int] = []
        cat_file = fs.cat_file
        fs.size = lambda path: 10
        fs.cat_file = lambda path, **kw: got.append(len(data := cat_file(path, **kw))) or data
        with pytest.raises(DocumentError) as info:
            storage.read_bytes(f"{base}/small.bin", max_bytes=500)
        assert info.value.error_type == errors.TOO_LARGE and got == [501]


def test_an_s3_listing_is_one_list_request(s3_server, s3):
    # No existence check before a listing (on S3 a HEAD and a LIST of its own): a missing prefix, or bucket,
    # lists nothing.
    storage = _s3_storage(s3_server, "medvlm-lists")
    base = "s3://medvlm-lists/l"
    for name in ("a/1.json", "a/b/2.json", "ab.json"):
        storage.write_bytes_atomic(f"{base}/{name}", b"{}")
    with s3_requests(storage, base) as (_, calls):
        assert storage.list_files(f"{base}/a", ".json") == [f"{base}/a/1.json", f"{base}/a/b/2.json"]
        assert calls == ["list_objects_v2"]
        assert list(storage.list_fingerprints(f"{base}/a")) == [f"{base}/a/1.json", f"{base}/a/b/2.json"]
        assert storage.list_files(f"{base}/missing") == [] and storage.list_fingerprints(f"{base}/missing") == {}
        assert storage.list_files("s3://medvlm-no-such-bucket/x") == []
