"""Local storage behaviour: URI resolution, atomic writes, create-if-absent, moves."""

from __future__ import annotations

import os
import threading

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
