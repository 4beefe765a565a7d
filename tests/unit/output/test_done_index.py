"""The done index (medvlm_core.output.done_index): it always answers what reading the whole history would, a run's
lookup reads only the buckets of its own documents, runs it lacks are still seen, then folded in, and an index
of an older version is read as it is, then migrated.

The history is written in the real output layout with pyarrow (only the columns the index reads), on a local
folder and on a real S3 server (SeaweedFS).
"""

from __future__ import annotations

import hashlib
import json
import random
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import HEX64, completion_row, run_row
from medvlm_core.output import done_index, status
from medvlm_core.output.paths import OutputLayout
from medvlm_core.storage import Storage, s3_options

BUCKET = "medvlm-index"


def _key(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def write_history(storage: Storage, layout: OutputLayout, runs: int, rows: int, seed: int = 0, first: int = 0) -> dict[str, set[str]]:
    """``runs`` published completions files of ``rows`` rows each (ok, truncated or error; repeated documents).

    Returns:
        Document id -> its answered keys (what the index must give back).
    """
    rng = random.Random(seed)
    answered: dict[str, set[str]] = {}
    for r in range(first, first + runs):
        run_id = f"202601{r % 28 + 1:02d}T020000Z-{r:08x}"
        docs = [f"doc-{rng.randrange(rows * runs // 2)}" for _ in range(rows)]
        keys = [_key(d, r, i) for i, d in enumerate(docs)]
        statuses = [rng.choice([status.OK, status.OK, status.TRUNCATED, status.ERROR]) for _ in docs]
        for d, k, s in zip(docs, keys, statuses):
            if s in status.ANSWERED:
                answered.setdefault(d, set()).add(k)
        table = pa.table({"document_id": docs, "result_key": keys, "status": statuses})
        url = layout.table_part("completions", f"2026-01-{r % 28 + 1:02d}", run_id)
        with storage.open_atomic(url) as f:
            pq.write_table(table, f)
    return answered


def read_bucket(data: bytes) -> pa.Table:
    """A bucket file's table (the current version's format: Arrow IPC)."""
    return pa.ipc.open_file(pa.py_buffer(data)).read_all()


def expected(answered: dict[str, set[str]], documents=None) -> set[str]:
    return set().union(*[answered.get(d, set()) for d in (documents if documents is not None else answered)])


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return Storage(), OutputLayout.of(str(tmp_path / "out"))
    server = request.getfixturevalue("s3_server")
    request.getfixturevalue("s3")  # the server's credentials in the environment
    server.create_bucket(BUCKET)
    storage = Storage({"s3": s3_options(endpoint_url=server.endpoint_url)})
    return storage, OutputLayout.of(f"s3://{BUCKET}/{uuid.uuid4().hex[:10]}")


def test_the_index_answers_what_the_whole_history_does(output):
    storage, layout = output
    answered = write_history(storage, layout, runs=12, rows=60)
    # No index yet (an output from before it): every run is read directly, and the answer is already right.
    assert done_index.read_state(storage, layout) is None
    assert done_index.load_done_keys(storage, layout).keys == expected(answered)

    added = done_index.catch_up(storage, layout)
    assert len(added) == 12 and sorted(done_index.read_state(storage, layout)["runs"]) == added
    assert done_index.load_done_keys(storage, layout).keys == expected(answered)
    some = sorted(answered)[:7] + ["never-seen"]
    assert done_index.load_done_keys(storage, layout, some).keys == expected(answered, some)
    assert done_index.catch_up(storage, layout) == []  # nothing left to fold in

    # Adding the same runs again changes no bucket (no duplicate keys).
    buckets = storage.list_files(layout.done_index(), ".arrow")
    before = {u: read_bucket(storage.read_bytes(u)).num_rows for u in buckets}
    done_index.add_runs(storage, layout, done_index.published_completions(storage, layout))
    assert {u: read_bucket(storage.read_bytes(u)).num_rows for u in buckets} == before
    assert sum(before.values()) == len(expected(answered))


def test_a_run_that_answers_known_pages_again_rewrites_no_bucket(output):
    # A forced re-run of the same pages with the same model and parameters gives the same result keys: its
    # publish must not rewrite buckets (a file write each); a run with new keys rewrites only their buckets.
    storage, layout = output
    answered = write_history(storage, layout, runs=3, rows=50, seed=4)
    done_index.catch_up(storage, layout)
    buckets = storage.list_files(layout.done_index(), ".arrow")
    before = {u: storage.read_bytes(u) for u in buckets}

    def publish(run_id: str, day: str, rows: list[tuple[str, str]]) -> dict[str, str]:
        """A published completions file of ``ok`` rows: run id -> its URL, as add_runs takes it."""
        url = layout.table_part("completions", day, run_id)
        table = pa.table({"document_id": [d for d, _ in rows], "result_key": [k for _, k in rows], "status": [status.OK] * len(rows)})
        with storage.open_atomic(url) as f:
            pq.write_table(table, f)
        return {run_id: url}

    pairs = sorted((d, k) for d, keys in answered.items() for k in keys)[:30]
    fresh = [(f"doc-new-{i}", _key("new", i)) for i in range(3)]
    again = "20260201T020000Z-rerun000"
    assert done_index.add_runs(storage, layout, publish(again, "2026-02-01", pairs + [pairs[0]])) == 0  # a key twice, too
    assert {u: storage.read_bytes(u) for u in buckets} == before
    assert again in done_index.read_state(storage, layout)["runs"]

    gained = {done_index.bucket_of(d, done_index.BUCKETS) for d, _ in fresh}
    assert done_index.add_runs(storage, layout, publish("20260202T020000Z-mixed000", "2026-02-02", pairs[:5] + fresh)) == len(gained)
    after = {u: storage.read_bytes(u) for u in storage.list_files(layout.done_index(), ".arrow")}
    changed = {u for u in after if before.get(u) != after[u]}
    assert changed == {done_index.bucket_url(layout, b) for b in gained}
    for url in changed:  # old keys kept, each pair once
        table = read_bucket(after[url])
        pairs_there = list(zip(table["document_id"].to_pylist(), table["result_key"].to_pylist()))
        assert len(pairs_there) == len(set(pairs_there))
    assert done_index.load_done_keys(storage, layout).keys == expected(answered) | {k for _, k in fresh}


def test_a_published_run_the_index_lacks_is_still_seen_then_folded_in(tmp_path):
    storage, layout = Storage(), OutputLayout.of(str(tmp_path / "out"))
    old = write_history(storage, layout, runs=3, rows=40, seed=1)
    done_index.catch_up(storage, layout)
    # Two runs published after, as when a publish is cut between its tables and the index: not in the state.
    new = write_history(storage, layout, runs=2, rows=40, seed=2, first=3)
    published = done_index.published_completions(storage, layout)
    assert len(published) == 5 and len(done_index.read_state(storage, layout)["runs"]) == 3
    assert done_index.load_done_keys(storage, layout).keys == expected(old) | expected(new)
    assert done_index.catch_up(storage, layout) == sorted(published)[3:]
    assert done_index.load_done_keys(storage, layout).keys == expected(old) | expected(new)


def test_a_lookup_reads_only_its_documents_buckets(tmp_path, monkeypatch):
    storage, layout = Storage(), OutputLayout.of(str(tmp_path / "out"))
    answered = write_history(storage, layout, runs=20, rows=200, seed=3)
    done_index.catch_up(storage, layout)
    read: list[str] = []
    original = Storage.read_bytes

    def counting(self, url, max_bytes=None):
        read.append(url)
        return original(self, url, max_bytes)

    monkeypatch.setattr(Storage, "read_bytes", counting)
    documents = sorted(answered)[:25]
    keys = done_index.load_done_keys(storage, layout, documents).keys
    assert keys == expected(answered, documents)
    buckets = {done_index.bucket_of(d, done_index.BUCKETS) for d in documents}
    bucket_files = [u for u in read if u.endswith(".arrow")]
    assert len(bucket_files) <= len(buckets) and not any("/completions/" in u for u in read)


def as_version_1(storage: Storage, layout: OutputLayout) -> dict[str, pa.Table]:
    """Turn the output's index into a version 1 index (Parquet buckets), as an older medvlm wrote it.

    Returns:
        Bucket file name (without suffix) -> its table.
    """
    tables = {}
    for url in storage.list_files(layout.done_index(), ".arrow"):
        table = read_bucket(storage.read_bytes(url))
        base = url[:-len(".arrow")]
        with storage.open_atomic(base + ".parquet") as f:
            pq.write_table(table, f)
        storage.remove_tree(url)
        tables[base.rsplit("/", 1)[-1]] = table
    state = done_index.read_state(storage, layout)
    storage.write_bytes_atomic(layout.done_index() + "/state.json", json.dumps({**state, "version": 1}).encode())
    return tables


def test_an_index_of_version_1_is_read_as_it_is_then_migrated(output):
    storage, layout = output
    answered = write_history(storage, layout, runs=6, rows=40, seed=5)
    done_index.catch_up(storage, layout)
    tables = as_version_1(storage, layout)
    assert storage.list_files(layout.done_index(), ".arrow") == []
    some = sorted(answered)[:9]
    # Read as it is (a shard started by an older parent, a reader before the lease holder's catch_up).
    assert done_index.load_done_keys(storage, layout).keys == expected(answered)
    assert done_index.load_done_keys(storage, layout, some).keys == expected(answered, some)

    # A migration cut before its state leaves the old index whole: still read, migrated again later.
    original = storage.write_bytes_atomic

    def cut_at_the_state(url, data):
        if url.endswith("state.json"):
            raise OSError("killed")
        original(url, data)

    storage.write_bytes_atomic = cut_at_the_state
    with pytest.raises(OSError):
        done_index.catch_up(storage, layout)
    storage.write_bytes_atomic = original
    assert done_index.read_state(storage, layout)["version"] == 1
    assert done_index.load_done_keys(storage, layout).keys == expected(answered)

    assert done_index.catch_up(storage, layout) == []  # no run was missing: only the format changed
    assert done_index.read_state(storage, layout)["version"] == done_index.VERSION == 2
    assert storage.list_files(layout.done_index(), ".parquet") == []
    migrated = {u[:-len(".arrow")].rsplit("/", 1)[-1]: read_bucket(storage.read_bytes(u))
                for u in storage.list_files(layout.done_index(), ".arrow")}
    assert {k: t.to_pylist() for k, t in migrated.items()} == {k: t.to_pylist() for k, t in tables.items()}
    assert done_index.load_done_keys(storage, layout).keys == expected(answered)
    assert done_index.load_done_keys(storage, layout, some).keys == expected(answered, some)


def test_a_publish_on_a_version_1_index_migrates_it_first(tmp_path):
    # A publish rolled forward (recover_interrupted_publishes) runs before catch_up: add_runs meets the old index.
    storage, layout = Storage(), OutputLayout.of(str(tmp_path / "out"))
    answered = write_history(storage, layout, runs=3, rows=30, seed=6)
    done_index.catch_up(storage, layout)
    as_version_1(storage, layout)
    new = write_history(storage, layout, runs=1, rows=30, seed=7, first=3)
    run_id, url = sorted(done_index.published_completions(storage, layout).items())[-1]
    assert done_index.add_runs(storage, layout, {run_id: url}) > 0
    state = done_index.read_state(storage, layout)
    assert state["version"] == 2 and run_id in state["runs"] and len(state["runs"]) == 4
    assert storage.list_files(layout.done_index(), ".parquet") == []
    assert done_index.load_done_keys(storage, layout).keys == expected(answered) | expected(new)


def test_an_index_newer_than_this_medvlm_is_a_clear_run_error(tmp_path):
    from medvlm_core.errors import RunError

    storage, layout = Storage(), OutputLayout.of(str(tmp_path / "out"))
    storage.write_bytes_atomic(layout.done_index() + "/state.json", b'{"version": 9, "buckets": 16, "runs": []}')
    with pytest.raises(RunError, match="done index version 9 is newer than this medvlm reads"):
        done_index.load_done_keys(storage, layout)


def test_bucket_of_is_stable():
    # Stored indexes depend on it: these values must never change.
    assert done_index.bucket_of("discharge-0001", 4096) == int(hashlib.sha256(b"discharge-0001").hexdigest()[:16], 16) % 4096
    assert {done_index.bucket_of(f"d{i}", 16) for i in range(200)} == set(range(16))


def test_publish_calls_back_once_every_table_is_visible_and_before_its_bookkeeping(tmp_path):
    # What only reports on the tables (the flow's artifacts) starts from the callback, while the publish writes the
    # done index and the commit record: by then every table must be readable, and neither of those written yet.
    from medvlm_core.output import publish, results

    storage, layout = Storage(), OutputLayout.of(str(tmp_path / "out"))
    results.write_rows(storage, layout.staged_chunk("r1", "completions", 0), "completions", [completion_row()])
    seen = []

    def on_tables(tables: dict[str, str]) -> None:
        seen.append({
            "tables": tables,
            "rows": {t: pq.read_table(pa.BufferReader(storage.read_bytes(u))).num_rows for t, u in tables.items()},
            "indexed": done_index.load_done_keys(storage, layout).keys,
            "committed": storage.exists(layout.commit("r1")),
        })

    published = publish.publish_run(storage, layout, "r1", "2026-12-04", [], run_row(), on_tables=on_tables)
    assert [s["tables"] for s in seen] == [published] and set(published) == {"completions", "runs"}
    assert seen[0]["rows"] == {"completions": 1, "runs": 1}
    # The index already answers for the run from its published file (done_index reads runs it lacks directly),
    # but neither its state nor the commit record lists the run yet.
    assert seen[0]["committed"] is False and seen[0]["indexed"] == {HEX64}
    assert storage.exists(layout.commit("r1")) and "r1" in done_index.read_state(storage, layout)["runs"]
