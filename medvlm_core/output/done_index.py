"""The done index: which pages an output has already answered, by document, kept up to date at publish.

    <output>/_index/done/bucket-XXXX.arrow     (document_id, result_key) of the answered pages (``ok``,
                                               ``truncated``) of the documents whose id hashes to bucket XXXX,
                                               an Arrow IPC file
    <output>/_index/done/state.json            {"version": 2, "buckets": N, "runs": [the run ids it holds]}

Why: deciding which pages are done used to read the ``result_key`` of every completions file ever published,
in every run and in every shard of a fan-out, so a run's start-up grew with the output's history. A shard now
reads only the buckets of its own documents: a few hundred small files, whatever the history.

Consistency: the published tables are the truth and the index is derived from them. Publishing a run adds
its keys to the buckets, then its id to ``state.json``, then writes its commit record (all of it in
``publish.publish_staged``, which a crashed publish rolls forward; adding a run twice changes nothing). A
reader also reads, directly, the completions file of every published run that ``state.json`` does not list
(an output written before the index existed, a publish cut between the buckets and the state), so the answer
is always what reading the whole history would give. The run holding the output's lease folds such runs into
the index (``catch_up``) before any page is decided. Removing published files by hand leaves their keys in
the index: delete ``_index/`` then, and the next run rebuilds it.

Versions: version 1 kept its buckets as Parquet (``bucket-XXXX.parquet``). A bucket is one small file read
whole, where Parquet's footer and page decoding cost ~0.15 ms a file and Arrow IPC ~0.01 ms (DEVELOPMENT.md):
hundreds of bucket reads start every shard, and every publish reads its pages' buckets again. The lease holder
rewrites a version 1 index as version 2 when it first writes to it (``catch_up`` before any page is decided, or a
publish rolled forward before that): the buckets, then the state, then the old files go (a cut there leaves
unread ``.parquet`` files behind, nothing else). Readers read either version as it is.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from medvlm_core import errors
from medvlm_core import storage as st
from medvlm_core.errors import DocumentError, RunError
from medvlm_core.output import status
from medvlm_core.output.paths import OutputLayout
from medvlm_core.output.results import DoneKeys, no_space_is_a_run_error
from medvlm_core.storage import Storage

# Buckets of a new index: with 4096, a 256-document shard reads about 250 files, each holding 1/4096 of the
# history (a few hundred keys at a million pages), so its start-up barely moves as the history grows.
BUCKETS = 4096
# The index version new indexes get, and each version's bucket file suffix (module docstring).
VERSION = 2
_SUFFIX = {1: ".parquet", 2: ".arrow"}
_SCHEMA = pa.schema([("document_id", pa.string()), ("result_key", pa.string())])


def bucket_of(document_id: str, buckets: int) -> int:
    """The index bucket of a document (stable across processes and versions: a hash, not Python's ``hash``).

    Args:
        document_id: the document's id.
        buckets: the index's number of buckets.

    Returns:
        The bucket, ``0 <= b < buckets``.
    """
    return int.from_bytes(hashlib.sha256(document_id.encode("utf-8")).digest()[:8], "big") % buckets


def bucket_url(layout: OutputLayout, bucket: int, version: int = VERSION) -> str:
    """Where bucket ``bucket`` of the index lives (its file name says the index's version).

    Args:
        layout: the output's layout.
        bucket: the bucket's number.
        version: the index's version (version 1 buckets are Parquet, version 2 Arrow IPC).

    Returns:
        The bucket's URL.
    """
    return st.join(layout.done_index(), f"bucket-{bucket:04x}{_SUFFIX[version]}")


def _state_url(layout: OutputLayout) -> str:
    return st.join(layout.done_index(), "state.json")


def read_state(storage: Storage, layout: OutputLayout) -> dict | None:
    """The index's state (its bucket count and the runs it holds).

    Args:
        storage: where the output is.
        layout: the output's layout.

    Returns:
        The state, or None when the output has no index yet.

    Raises:
        RunError: the index was written by a newer medvlm (a version this one cannot read).
    """
    url = _state_url(layout)
    try:  # one read, no existence check first (on S3 that is one request more, or two when missing)
        state = json.loads(storage.read_bytes(url))
    except DocumentError as exc:
        if exc.error_type == errors.NOT_FOUND:
            return None
        raise
    if state.get("version") not in _SUFFIX:
        raise RunError(f"{url}: done index version {state.get('version')} is newer than this medvlm reads "
                       f"(up to {VERSION}): upgrade medvlm, or delete {layout.done_index()} to rebuild the index")
    return state


def published_completions(storage: Storage, layout: OutputLayout) -> dict[str, str]:
    """The published completions file of every run (one listing, no file read).

    Args:
        storage: where the output is.
        layout: the output's layout.

    Returns:
        Run id -> its completions file.
    """
    found = {}
    for url in storage.list_files(layout.table("completions"), ".parquet"):
        name = url.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("part-"):
            found[name[len("part-"):-len(".parquet")]] = url
    return found


def _answered(storage: Storage, url: str, documents: frozenset[str] | None = None) -> pa.Table:
    """(document_id, result_key) of a completions file's answered rows (of ``documents`` only, if given)."""
    table = pq.read_table(io.BytesIO(storage.read_bytes(url)), columns=["document_id", "result_key", "status"])
    keep = pc.is_in(table["status"], value_set=pa.array(status.ANSWERED))
    if documents is not None:
        keep = pc.and_(keep, pc.is_in(table["document_id"], value_set=pa.array(sorted(documents), pa.string())))
    return table.filter(keep).select(["document_id", "result_key"]).cast(_SCHEMA)


def _existing_buckets(storage: Storage, layout: OutputLayout, version: int) -> set[str] | None:
    """The bucket files there are: one listing on an object store, cheaper than asking for each of hundreds.
    None on a local disk, where listing stats every file (~45 ms at 4,096 buckets, more than reading a shard's
    buckets): a missing bucket is found by reading it."""
    if st.protocol_of(st.normalize(layout.done_index())) == st.LOCAL:
        return None
    return set(storage.list_files(layout.done_index(), _SUFFIX[version]))


def _read_bucket(storage: Storage, layout: OutputLayout, bucket: int, existing: set[str] | None,
                 version: int) -> pa.Table:
    """A bucket's pairs; empty if it has none (not in ``existing``, or missing where ``existing`` is None)."""
    url = bucket_url(layout, bucket, version)
    if existing is not None and url not in existing:
        return _SCHEMA.empty_table()
    try:
        data = storage.read_bytes(url)
    except DocumentError as exc:
        if existing is None and exc.error_type == errors.NOT_FOUND:
            return _SCHEMA.empty_table()
        raise
    if version == 1:
        # ParquetFile, not read_table: read_table's dataset layer costs twice the read of one small file.
        return pq.ParquetFile(io.BytesIO(data)).read().cast(_SCHEMA)
    return pa.ipc.open_file(pa.py_buffer(data)).read_all().cast(_SCHEMA)


def _write_bucket(storage: Storage, layout: OutputLayout, bucket: int, table: pa.Table) -> None:
    """Write a bucket (current version) atomically: readers see the old pairs or the new, never part."""
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, _SCHEMA) as writer:
        writer.write_table(table.cast(_SCHEMA))
    url = bucket_url(layout, bucket)
    with no_space_is_a_run_error(url):
        storage.write_bytes_atomic(url, sink.getvalue())


def load_done_keys(storage: Storage, layout: OutputLayout, document_ids: Iterable[str] | None = None) -> DoneKeys:
    """The result keys already answered in an output, for some documents or all.

    Args:
        storage: where the output is.
        layout: the output's layout.
        document_ids: the documents a run (or shard) is about to process; None for every document. Only their
            buckets are read.

    Returns:
        The keys of every published ``ok`` or ``truncated`` page of those documents (a truncated answer is
        deterministic: a re-run would cut it off again).
    """
    documents = None if document_ids is None else frozenset(document_ids)
    state = read_state(storage, layout)
    published = published_completions(storage, layout)
    covered = set(state["runs"]) if state else set()
    tables = []
    if state:
        buckets, version = state["buckets"], state["version"]
        wanted = range(buckets) if documents is None else sorted({bucket_of(d, buckets) for d in documents})
        existing = _existing_buckets(storage, layout, version)
        tables += st.map_io(layout.done_index(), lambda b: _read_bucket(storage, layout, b, existing, version), wanted)
        if documents is not None:  # a bucket also holds other documents' keys
            value_set = pa.array(sorted(documents), pa.string())
            tables = [t.filter(pc.is_in(t["document_id"], value_set=value_set)) for t in tables]
    for run_id, url in published.items():  # published but not (yet) in the index: read directly
        if run_id not in covered:
            tables.append(_answered(storage, url, documents))
    keys: set[str] = set()
    for table in tables:
        keys.update(table.column("result_key").to_pylist())
    return DoneKeys(frozenset(keys))


def add_runs(storage: Storage, layout: OutputLayout, runs: dict[str, str]) -> int:
    """Add published runs' answered keys to the index (by the run that holds the output's lease).

    Each touched bucket that gains a key is rewritten once, atomically, with its old and new keys (no
    duplicates); one whose keys are all there already (a forced re-run of the same pages, a publish rolled
    forward twice) is left as it is. The state lists the runs last, so a cut here leaves runs that readers still
    read directly.

    Args:
        storage: where the output is.
        layout: the output's layout.
        runs: run id -> its published completions file.

    Returns:
        The buckets rewritten (those that gained a key).
    """
    state = _writable_state(storage, layout) or {"version": VERSION, "buckets": BUCKETS, "runs": []}
    new = [run for run in runs if run not in set(state["runs"])]
    if not new:
        return 0
    buckets = state["buckets"]
    added = pa.concat_tables(st.map_io(layout.done_index(), lambda run: _answered(storage, runs[run]), new))
    # Sorted by bucket, each bucket's new keys are one zero-copy slice.
    of = _buckets_of(added.column("document_id"), buckets)
    order = np.argsort(of, kind="stable")
    added, of = added.take(pa.array(order)), of[order]
    touched, starts, counts = np.unique(of, return_index=True, return_counts=True)
    existing = _existing_buckets(storage, layout, VERSION)

    def rewrite(item: tuple[int, int, int]) -> bool:
        bucket, start, count = item
        old = _read_bucket(storage, layout, bucket, existing, VERSION)
        # A bucket holds a few hundred pairs at most (module docstring): Python sets beat Arrow's group-by
        # (~0.5 ms a call) at this size, and tell whether the bucket changes at all.
        have = set(_pairs(old))
        gained = sorted(set(_pairs(added.slice(start, count))) - have)
        if not gained:
            return False
        fresh = pa.table([pa.array([d for d, _ in gained], pa.string()), pa.array([k for _, k in gained], pa.string())],
                         schema=_SCHEMA)
        _write_bucket(storage, layout, bucket, pa.concat_tables([old, fresh]))
        return True

    rewritten = sum(st.map_io(layout.done_index(), rewrite, zip(touched.tolist(), starts.tolist(), counts.tolist())))
    state["runs"] = sorted(set(state["runs"]) | set(new))
    storage.write_bytes_atomic(_state_url(layout), json.dumps(state).encode())
    return rewritten


def _pairs(table: pa.Table) -> Iterator[tuple[str, str]]:
    """A bucket table's (document_id, result_key) pairs."""
    return zip(table.column("document_id").to_pylist(), table.column("result_key").to_pylist())


def _buckets_of(documents: pa.ChunkedArray, buckets: int) -> np.ndarray:
    """``bucket_of`` for a column of document ids, a slice at a time (no list of a million strings)."""
    def each() -> Iterator[int]:
        for start in range(0, len(documents), 65_536):
            for document_id in documents.slice(start, 65_536).to_pylist():
                yield bucket_of(document_id, buckets)

    return np.fromiter(each(), dtype=np.int32, count=len(documents))


def catch_up(storage: Storage, layout: OutputLayout) -> list[str]:
    """Fold every published run the index does not hold into it (an output from before the index, a publish
    cut between the buckets and the state). Only the run holding the output's lease may call this.

    Args:
        storage: where the output is.
        layout: the output's layout.

    Returns:
        The run ids added.
    """
    state = _writable_state(storage, layout)
    covered = set(state["runs"]) if state else set()
    missing = {run: url for run, url in published_completions(storage, layout).items() if run not in covered}
    if missing:
        add_runs(storage, layout, missing)
    return sorted(missing)


def _writable_state(storage: Storage, layout: OutputLayout) -> dict | None:
    """The index's state for the lease holder about to write to it: an older index migrated first."""
    state = read_state(storage, layout)
    if state is not None and state["version"] != VERSION:
        state = _migrate(storage, layout, state)
    return state


def _migrate(storage: Storage, layout: OutputLayout, state: dict) -> dict:
    """Rewrite an older index as the current version (module docstring); only the lease holder may.

    The new buckets are written first and the state last, so a cut before the state leaves the old index whole
    (the next ``catch_up`` migrates again); the old files go only after the state.
    """
    old = state["version"]
    urls = storage.list_files(layout.done_index(), _SUFFIX[old])
    existing = set(urls)
    prefix = st.join(layout.done_index(), "bucket-")

    def convert(url: str) -> None:
        bucket = int(url[len(prefix):-len(_SUFFIX[old])], 16)
        _write_bucket(storage, layout, bucket, _read_bucket(storage, layout, bucket, existing, old))

    st.map_io(layout.done_index(), convert, urls)
    state = {**state, "version": VERSION}
    storage.write_bytes_atomic(_state_url(layout), json.dumps(state).encode())
    st.map_io(layout.done_index(), storage.remove_tree, urls)
    return state
