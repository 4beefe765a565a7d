"""A fan-out's shard plans and shard records (medvlm_core.run.shards), on a real local output with real Parquet.

The parent cuts a manifest's valid rows into shards as it reads it (``ShardPlanWriter`` as the sink of
``plan_manifest``), ``SHARDS_PER_FILE`` shards to a plan file, a row group each; every shard reads back
exactly its own rows, in manifest order (``read_shard_rows``), and a missing plan or shard is a ``RunError``
naming them. A finished shard's record (``write_shard_record``/``read_shard_record``) reads back with its
counts, model and worker, also as an earlier medvlm wrote it. No Prefect, no model.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_manifest
from medvlm_core.errors import RunError
from medvlm_core.inputs.manifest import PLAN_SCHEMA, ManifestRow, plan_manifest
from medvlm_core.output.paths import OutputLayout
from medvlm_core.run.accounting import ChunkSummary
from medvlm_core.run.shards import (
    SHARDS_PER_FILE,
    ShardPlanWriter,
    ShardRecord,
    ShardWorker,
    read_shard_record,
    read_shard_rows,
    write_shard_record,
)
from medvlm_core.storage import Storage

RUN = "20261206T030000Z-abcdef01"


@pytest.fixture(scope="module")
def prefect_server():
    """Overrides the session's autouse Prefect test server: nothing here runs a flow."""
    yield


@pytest.fixture
def output(tmp_path):
    return Storage(), OutputLayout.of(str(tmp_path / "out"))


def plan_rows(first: int, count: int) -> pl.DataFrame:
    """Valid plan rows (``PLAN_SCHEMA``) numbered ``first`` .. ``first + count - 1``."""
    schema = pl.from_arrow(PLAN_SCHEMA.empty_table()).schema
    rows = [{"row_number": n, "document_id": f"doc-{n:04d}", "image_uri": f"/data/doc-{n:04d}.png", "page": n % 3 or None,
             "prompt_id": None, "prompt": None, "patient_id": f"P-{n}", "encounter_id": None, "sha256": None}
            for n in range(first, first + count)]
    return pl.DataFrame(rows, schema=schema)


def test_a_manifest_is_cut_into_shards_in_manifest_order_and_each_shard_reads_its_own_rows(tmp_path, output):
    storage, layout = output
    records = [{"document_id": f"doc-{n}", "image_uri": f"scans/doc-{n}.png", "page": str(n % 2 + 1), "patient_id": f"P-{n}"}
               for n in range(1, 12)]
    records[4]["image_uri"] = ""  # row 5: quarantined, in no shard
    manifest = write_manifest(tmp_path / "in" / "manifest.csv", records)
    writer = ShardPlanWriter(storage, layout, RUN, shard_size=3)
    # batches of 4 rows: shards cross batch boundaries
    plan = plan_manifest(str(manifest), storage, sink=writer, batch_rows=4)
    assert writer.close() == 4 and writer.sizes == [3, 3, 3, 1]
    assert [(q["row_number"], q["column"]) for q in plan.quarantined] == [(5, "image_uri")]
    assert plan.rows == []  # went to the sink, not into memory
    shards = [read_shard_rows(storage, layout, RUN, i) for i in range(4)]
    assert [[r.row_number for r in rows] for rows in shards] == [[1, 2, 3], [4, 6, 7], [8, 9, 10], [11]]
    first = shards[0][0]
    assert first == ManifestRow(1, "doc-1", str(tmp_path / "in" / "scans" / "doc-1.png"), page=2, patient_id="P-1")
    assert [r.document_id for rows in shards for r in rows] == [f"doc-{n}" for n in range(1, 12) if n != 5]
    # one plan file, a row group per shard
    [part] = storage.list_files(layout.run_staging(RUN), ".parquet")
    assert part == layout.shard_plan(RUN, 0)
    meta = pq.ParquetFile(part).metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [3, 3, 3, 1]


def test_shards_past_a_files_worth_go_to_the_next_plan_file(output):
    storage, layout = output
    writer = ShardPlanWriter(storage, layout, RUN, shard_size=2)
    total = 2 * SHARDS_PER_FILE * 2 + 3  # two full files and a file of two shards (2 + 1 rows)
    for first in range(1, total + 1, 50):
        writer(plan_rows(first, min(50, total + 1 - first)))
    assert writer.close() == 2 * SHARDS_PER_FILE + 2
    assert storage.list_files(layout.run_staging(RUN), ".parquet") == [layout.shard_plan(RUN, p) for p in range(3)]
    assert [pq.ParquetFile(layout.shard_plan(RUN, p)).metadata.num_row_groups for p in range(3)] == [SHARDS_PER_FILE] * 2 + [2]
    assert [r.row_number for r in read_shard_rows(storage, layout, RUN, 0)] == [1, 2]
    assert [r.row_number for r in read_shard_rows(storage, layout, RUN, SHARDS_PER_FILE)] == [2 * SHARDS_PER_FILE + 1,
                                                                                             2 * SHARDS_PER_FILE + 2]
    last = read_shard_rows(storage, layout, RUN, 2 * SHARDS_PER_FILE + 1)
    assert [(r.row_number, r.document_id, r.image_uri) for r in last] == [(total, f"doc-{total:04d}", f"/data/doc-{total:04d}.png")]
    every = [r.row_number for i in range(len(writer.sizes)) for r in read_shard_rows(storage, layout, RUN, i)]
    assert every == list(range(1, total + 1))


def test_a_full_plan_file_is_written_before_the_manifest_ends(output):
    # The parent never holds all the rows: a file's worth of shards is on storage as soon as it is complete.
    storage, layout = output
    writer = ShardPlanWriter(storage, layout, RUN, shard_size=1)
    writer(plan_rows(1, SHARDS_PER_FILE + 5))
    assert storage.exists(layout.shard_plan(RUN, 0)) and not storage.exists(layout.shard_plan(RUN, 1))
    assert len(writer.sizes) == SHARDS_PER_FILE
    assert writer.close() == SHARDS_PER_FILE + 5 and storage.exists(layout.shard_plan(RUN, 1))
    assert [r.row_number for r in read_shard_rows(storage, layout, RUN, SHARDS_PER_FILE + 4)] == [SHARDS_PER_FILE + 5]


def test_no_rows_make_no_shards_and_no_files(output):
    storage, layout = output
    writer = ShardPlanWriter(storage, layout, RUN, shard_size=10)
    writer(plan_rows(1, 0))
    assert writer.close() == 0 and writer.sizes == []
    assert storage.list_files(layout.root, ".parquet") == []


def test_a_shard_size_below_one_is_one_row_a_shard(output):
    storage, layout = output
    writer = ShardPlanWriter(storage, layout, RUN, shard_size=0)
    writer(plan_rows(1, 3))
    assert writer.close() == 3
    assert [read_shard_rows(storage, layout, RUN, i)[0].row_number for i in range(3)] == [1, 2, 3]


def test_a_missing_plan_or_shard_is_a_run_error_naming_it(output):
    storage, layout = output
    with pytest.raises(RunError) as info:
        read_shard_rows(storage, layout, RUN, 3)
    assert str(info.value) == (f"shard 3: its plan {layout.shard_plan(RUN, 0)} is missing "
                               "(was the run's staging cleared?)")
    writer = ShardPlanWriter(storage, layout, RUN, shard_size=2)
    writer(plan_rows(1, 5))
    writer.close()
    assert [r.row_number for r in read_shard_rows(storage, layout, RUN, 2)] == [5]
    with pytest.raises(RunError, match=rf"^shard 3: not in its plan {layout.shard_plan(RUN, 0)}$"):
        read_shard_rows(storage, layout, RUN, 3)
    with pytest.raises(RunError, match=rf"^shard {SHARDS_PER_FILE}: its plan .*part-00001\.parquet is missing"):
        read_shard_rows(storage, layout, RUN, SHARDS_PER_FILE)


def test_plans_of_two_runs_do_not_mix(output):
    storage, layout = output
    for run, first in ((RUN, 1), ("other-run", 100)):
        writer = ShardPlanWriter(storage, layout, run, shard_size=4)
        writer(plan_rows(first, 4))
        writer.close()
    assert [r.row_number for r in read_shard_rows(storage, layout, RUN, 0)] == [1, 2, 3, 4]
    assert [r.row_number for r in read_shard_rows(storage, layout, "other-run", 0)] == [100, 101, 102, 103]


# ---------------------------------------------------------------------------------------------------------
# Shard records


def shard_record(index: int = 2) -> ShardRecord:
    summary = ChunkSummary(0, "")
    for n, status in ((1, "ok"), (2, "ok"), (3, "error")):
        summary.add({"status": status, "manifest_row": n, "document_id": f"doc-{n}", "page": 1, "latency_ms": 10.0 * n,
                     "completion_tokens": 4, "prompt_tokens": 100, "error_type": "image_decode"})
    return ShardRecord(index, summary.to_json(), {"model_name": "tiny-llava", "model_sha256": "ab" * 32,
                                                  "mmproj_sha256": "cd" * 32, "chat_format": "mtmd"},
                       '{"max_tokens": 4}', ShardWorker("gpu-host-1", 4242, "1", None),
                       "2026-12-06T03:00:00+00:00", "2026-12-06T03:05:00+00:00", {"n_parallel": 4, "needed_mb": 900})


def test_a_shard_record_reads_back_with_its_counts_model_and_worker(output):
    storage, layout = output
    record = shard_record()
    write_shard_record(storage, layout, RUN, record)
    assert storage.list_files(layout.run_staging(RUN), ".json") == [layout.shard_record(RUN, 2)]
    read = read_shard_record(storage, layout, RUN, 2)
    assert read == record
    assert read.worker == ShardWorker("gpu-host-1", 4242, "1", None)
    counts = ChunkSummary.from_json(read.summary)
    assert (counts.pages_ok, counts.pages_error, counts.written_rows, counts.error_types) == (2, 1, {1, 2, 3}, {"image_decode": 1})
    assert read.memory == {"n_parallel": 4, "needed_mb": 900}


def test_a_shard_that_did_not_finish_has_no_record(output):
    storage, layout = output
    write_shard_record(storage, layout, RUN, shard_record(2))
    assert read_shard_record(storage, layout, RUN, 3) is None
    assert read_shard_record(storage, layout, "other-run", 2) is None


def test_a_shard_record_written_again_replaces_the_first(output):
    # A retried shard writes its record again: the parent reads the last one whole.
    storage, layout = output
    write_shard_record(storage, layout, RUN, shard_record(2))
    again = ShardRecord(**{**asdict(shard_record(2)), "finished_at": "2026-12-06T04:00:00+00:00"})
    write_shard_record(storage, layout, RUN, again)
    assert read_shard_record(storage, layout, RUN, 2).finished_at == "2026-12-06T04:00:00+00:00"


def test_a_shard_record_as_an_earlier_medvlm_wrote_it_still_reads(output):
    # flows/shard.py wrote a plain dict before records were typed: the same keys, no kind, no version.
    storage, layout = output
    record = shard_record(5)
    old = {"shard_index": 5, "summary": record.summary, "identity": record.identity, "params_json": record.params_json,
           "memory": record.memory, "worker": {"hostname": "gpu-host-1", "pid": 4242, "cuda_visible_devices": "1",
                                               "flow_run_id": None},
           "started_at": record.started_at, "finished_at": record.finished_at}
    storage.write_bytes_atomic(layout.shard_record(RUN, 5), json.dumps(old).encode())
    assert read_shard_record(storage, layout, RUN, 5) == record


def test_a_shard_record_of_a_newer_medvlm_is_a_run_error_naming_the_file(output):
    storage, layout = output
    body = json.loads(shard_record(1).to_bytes()) | {"version": ShardRecord.VERSION + 1}
    storage.write_bytes_atomic(layout.shard_record(RUN, 1), json.dumps(body).encode())
    with pytest.raises(RunError) as info:
        read_shard_record(storage, layout, RUN, 1)
    assert str(info.value).startswith(f"{layout.shard_record(RUN, 1)}: shard record version 2")
    assert str(info.value).endswith("upgrade medvlm")


def test_a_damaged_shard_record_is_a_value_error_naming_the_file(output):
    storage, layout = output
    storage.write_bytes_atomic(layout.shard_record(RUN, 1), b'{"shard_index": 1, "summ')
    with pytest.raises(ValueError, match=rf"^{layout.shard_record(RUN, 1)}: not a shard record"):
        read_shard_record(storage, layout, RUN, 1)


def test_at_document_scope_a_shard_never_splits_a_document(tmp_path):
    """A shard ends after its last document's adjacent rows; a document's rows apart from the others stop the run."""
    layout = OutputLayout.of(str(tmp_path / "out"))
    storage = Storage()
    ids = ["a", "a", "a", "b", "c", "c", "d", "d", "d", "d", "e"]
    frame = pl.from_arrow(PLAN_SCHEMA.empty_table()).vstack(pl.from_arrow(pa.Table.from_pylist(
        [{"row_number": n, "document_id": d, "image_uri": f"/{d}.tif", "page": n} for n, d in enumerate(ids, 1)],
        schema=PLAN_SCHEMA)))
    writer = ShardPlanWriter(storage, layout, "r1", shard_size=2, keep_documents=True)
    writer(frame.head(5))  # a batch boundary inside document c
    writer(frame.slice(5))
    count = writer.close()
    shards = [[r.document_id for r in read_shard_rows(storage, layout, "r1", i)] for i in range(count)]
    assert shards == [["a", "a", "a"], ["b", "c", "c"], ["d", "d", "d", "d"], ["e"]]
    apart = ShardPlanWriter(storage, layout, "r2", shard_size=2, keep_documents=True)
    with pytest.raises(RunError, match=r"manifest row 5: document 'a' has rows apart"):
        apart(frame.with_columns(pl.Series("document_id", ["a", "a", "b", "b", "a"] + ["x"] * 6)))
        apart.close()
