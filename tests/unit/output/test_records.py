"""The small JSON records medvlm keeps beside its tables (medvlm_core.output.records): the publish marker, the
commit record, the lease record and the shard record, typed and versioned on one base (``JsonRecord``).

Each reads back what it wrote; a record an earlier medvlm wrote (no ``kind``, no ``version``) still reads; one
written by a newer medvlm is a ``RunError`` naming the file and saying to upgrade; bytes that are not such a
record are a ``ValueError`` naming the file. The commit record keeps the audit's keys at the top level of its
JSON, where users read them. Then the same through real publishing on a local output: a marker an earlier
medvlm left is rolled forward, a newer one stops the run before anything is published. No Prefect, no model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pyarrow.parquet as pq
import pytest

from conftest import completion_row, run_row
from medvlm_core.errors import RunError
from medvlm_core.output import publish, results
from medvlm_core.output.lease import LeaseRecord, OutputLease
from medvlm_core.output.paths import OutputLayout
from medvlm_core.output.records import CommitRecord, JsonRecord, PublishMarker, checked_json
from medvlm_core.run.shards import ShardRecord, ShardWorker
from medvlm_core.storage import Storage


@pytest.fixture(scope="module")
def prefect_server():
    """Overrides the session's autouse Prefect test server: nothing here runs a flow."""
    yield


AUDIT = {"shards": 3, "failed_shards": [2], "shard_workers": [{"shard_index": 0, "worker": {"hostname": "gpu-1"}}]}

RECORDS = {
    "publish-marker": PublishMarker("20261206T030000Z-aaaa0001", "2026-12-06", AUDIT),
    "commit": CommitRecord("20261206T030000Z-aaaa0001", "2026-12-06T03:04:05+00:00",
                           {"completions": "/out/completions/run_date=2026-12-06/part.parquet",
                            "runs": "/out/runs/run_date=2026-12-06/part.parquet"}, AUDIT),
    "lease": LeaseRecord(epoch=7, run_id="20261206T030000Z-aaaa0001", token="f" * 32, host="worker-7", pid=4242,
                         acquired_at="2026-12-06T03:00:00.000+00:00", expires_at="2026-12-06T03:02:00.000+00:00",
                         machine="boot/pid:[4026531836]", process_started="12345", released=True),
    "shard": ShardRecord(shard_index=4, summary='{"pages_ok": 2}', identity={"model_name": "tiny-llava"},
                         params_json='{"max_tokens": 4}', worker=ShardWorker("gpu-2", 99, "0,1", "flow-run-1"),
                         started_at="2026-12-06T03:00:00+00:00", finished_at="2026-12-06T03:01:00+00:00",
                         memory={"n_parallel": 4}),
}


def unversioned(record: JsonRecord) -> bytes:
    """The record as an earlier medvlm wrote it: the same JSON without ``kind`` and ``version``."""
    body = json.loads(record.to_bytes())
    del body["kind"], body["version"]
    return json.dumps(body).encode()


def with_version(record: JsonRecord, version) -> bytes:
    body = json.loads(record.to_bytes())
    body["version"] = version
    return json.dumps(body).encode()


# ---------------------------------------------------------------------------------------------------------
# Every record: round trip, an earlier medvlm's record, a newer medvlm's record, garbage


@pytest.mark.parametrize("kind", RECORDS)
def test_a_record_reads_back_what_it_wrote_with_its_kind_and_version(kind):
    record = RECORDS[kind]
    data = record.to_bytes()
    body = json.loads(data)
    assert (body["kind"], body["version"]) == (kind, type(record).VERSION) == (type(record).KIND, 1)
    assert type(record).from_bytes(data, "/out/x.json") == record


@pytest.mark.parametrize("kind", RECORDS)
def test_a_record_without_kind_and_version_as_an_earlier_medvlm_wrote_it_still_reads(kind):
    record = RECORDS[kind]
    assert type(record).from_bytes(unversioned(record), "/out/old.json") == record


@pytest.mark.parametrize("kind", RECORDS)
def test_a_record_of_a_newer_medvlm_names_the_file_and_says_to_upgrade(kind):
    record = RECORDS[kind]
    url = f"s3://bucket/out/_staging/r1/{kind}.json"
    with pytest.raises(RunError) as info:
        type(record).from_bytes(with_version(record, type(record).VERSION + 1), url)
    message = str(info.value)
    assert message.startswith(url + ":") and "upgrade medvlm" in message
    assert f"version {type(record).VERSION + 1}" in message and f"{kind} record" in message


@pytest.mark.parametrize("kind", RECORDS)
@pytest.mark.parametrize("garbage", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"a string"', b"null"])
def test_bytes_that_are_not_a_record_are_a_value_error_naming_the_file(kind, garbage):
    url = f"/out/_staging/r1/{kind}.json"
    with pytest.raises(ValueError, match=f"^{url}: not a {kind} record"):
        type(RECORDS[kind]).from_bytes(garbage, url)


@pytest.mark.parametrize("kind", ["publish-marker", "lease", "shard"])
def test_a_json_object_missing_the_records_fields_is_a_value_error_naming_the_file(kind):
    url = f"/out/{kind}.json"
    with pytest.raises(ValueError, match=f"^{url}: not a {kind} record"):
        type(RECORDS[kind]).from_bytes(b'{"hello": "world"}', url)
    # another kind's record is not this one either: its kind says so
    other = RECORDS["commit"].to_bytes()
    with pytest.raises(ValueError, match=f"^{url}: a 'commit' record, not a {kind} record"):
        type(RECORDS[kind]).from_bytes(other, url)


def test_a_json_object_that_is_not_a_commit_record_is_a_value_error_naming_the_file():
    url = "/out/_commits/r1.json"
    with pytest.raises(ValueError, match=f"^{url}: not a commit record"):
        CommitRecord.from_bytes(b'{"hello": "world"}', url)


def test_keys_a_later_minor_version_added_are_ignored():
    record = RECORDS["publish-marker"]
    body = json.loads(record.to_bytes()) | {"published_by": "medvlm 9.9", "priority": 3}
    assert PublishMarker.from_bytes(json.dumps(body).encode(), "/out/m.json") == record


def test_an_error_without_a_url_still_says_which_record():
    with pytest.raises(RunError, match=r"^a lease record: lease record version 2 is newer .*upgrade medvlm"):
        LeaseRecord.from_bytes(with_version(RECORDS["lease"], 2))
    with pytest.raises(ValueError, match=r"^data: not a lease record"):
        LeaseRecord.from_bytes(b"{")


# ---------------------------------------------------------------------------------------------------------
# The base and checked_json on a record of its own


@dataclass(frozen=True)
class Note(JsonRecord):
    """A record at version 2, as a subclass that changed its fields would be."""

    KIND: ClassVar[str] = "note"
    VERSION: ClassVar[int] = 2

    text: str
    count: int = 0


def test_a_subclass_reads_its_own_and_older_versions_and_refuses_newer_ones():
    note = Note("hello", 3)
    assert json.loads(note.to_bytes()) == {"kind": "note", "version": 2, "text": "hello", "count": 3}
    assert Note.from_bytes(note.to_bytes()) == note
    assert Note.from_bytes(with_version(note, 1)) == note
    assert Note.from_bytes(b'{"text": "hi"}') == Note("hi")  # unversioned: version 1, the default fills in
    with pytest.raises(RunError, match=r"^/n\.json: note record version 3 is newer than this medvlm reads \(2\): upgrade medvlm$"):
        Note.from_bytes(with_version(note, 3), "/n.json")


@pytest.mark.parametrize("version", ["2", 1.5, None, [1]])
def test_a_version_that_is_not_a_whole_number_is_refused(version):
    with pytest.raises(ValueError, match=r"^/n\.json: note record version .* is not a version number"):
        checked_json(Note, json.dumps({"text": "x", "version": version}).encode(), "/n.json")


def test_checked_json_gives_the_whole_object_of_a_version_it_reads():
    raw = checked_json(Note, b'{"text": "x", "version": 2, "extra": [1]}', "/n.json")
    assert raw == {"text": "x", "version": 2, "extra": [1]}


# ---------------------------------------------------------------------------------------------------------
# The commit record: the audit's keys at the top level


def test_the_commit_record_keeps_the_audits_keys_at_the_top_level_of_its_json():
    body = json.loads(RECORDS["commit"].to_bytes())
    assert body["shards"] == 3 and body["failed_shards"] == [2]
    assert body["shard_workers"][0]["worker"]["hostname"] == "gpu-1"
    assert "audit" not in body
    assert set(body) == {"run_id", "committed_at", "tables", "kind", "version", "shards", "failed_shards", "shard_workers"}
    assert body["tables"]["completions"].endswith("part.parquet")


def test_a_commit_record_written_by_an_earlier_medvlm_reads_its_audit_from_the_top_level():
    # What results.commit_record wrote before records were typed: the audit spread into the body, no kind, no version.
    old = json.dumps({"run_id": "r0", "committed_at": "2026-11-01T00:00:00+00:00", "tables": {"completions": "/c.parquet"},
                      "shards": 2, "failed_shards": []}, sort_keys=True).encode()
    record = CommitRecord.from_bytes(old, "/out/_commits/r0.json")
    assert record == CommitRecord("r0", "2026-11-01T00:00:00+00:00", {"completions": "/c.parquet"},
                                  {"shards": 2, "failed_shards": []})


def test_the_publish_marker_keeps_its_audit_under_audit():
    body = json.loads(RECORDS["publish-marker"].to_bytes())
    assert body["audit"] == AUDIT and body["run_date"] == "2026-12-06"


def test_values_json_cannot_hold_are_written_as_text():
    from datetime import datetime, timezone

    when = datetime(2026, 12, 6, 3, 0, tzinfo=timezone.utc)
    marker = PublishMarker("r1", "2026-12-06", {"started_at": when})
    assert PublishMarker.from_bytes(marker.to_bytes()).audit == {"started_at": str(when)}
    commit = CommitRecord("r1", "c", {}, {"started_at": when})
    assert json.loads(commit.to_bytes())["started_at"] == str(when)


# ---------------------------------------------------------------------------------------------------------
# The shard record's worker


def test_a_shard_records_worker_reads_back_as_a_shard_worker():
    read = ShardRecord.from_bytes(RECORDS["shard"].to_bytes())
    assert isinstance(read.worker, ShardWorker)
    assert (read.worker.hostname, read.worker.pid, read.worker.cuda_visible_devices) == ("gpu-2", 99, "0,1")
    assert json.loads(RECORDS["shard"].to_bytes())["worker"] == {
        "hostname": "gpu-2", "pid": 99, "cuda_visible_devices": "0,1", "flow_run_id": "flow-run-1"}


def test_a_worker_key_a_later_minor_version_added_is_ignored():
    body = json.loads(RECORDS["shard"].to_bytes())
    body["worker"]["gpu_name"] = "NVIDIA H100"
    assert ShardRecord.from_bytes(json.dumps(body).encode(), "/out/shard-00004.json") == RECORDS["shard"]


# ---------------------------------------------------------------------------------------------------------
# Through real publishing and the real lease, on a local output


def stage_run(storage: Storage, layout: OutputLayout, run_id: str, marker: bytes) -> None:
    """A run killed while publishing: its staged completions and runs rows and the given marker, no commit."""
    results.write_rows(storage, layout.staged_chunk(run_id, "completions", 0), "completions",
                       [completion_row(run_id=run_id, document_id=f"doc-{i}", manifest_row=i) for i in (1, 2)])
    results.write_rows(storage, layout.staged(run_id, "runs", "run.parquet"), "runs", [run_row(pages=2, run_id=run_id)])
    storage.write_bytes_atomic(layout.publish_marker(run_id), marker)


def test_a_publish_marker_an_earlier_medvlm_left_is_rolled_forward_with_its_audit(tmp_path):
    storage, layout = Storage(), OutputLayout.of(str(tmp_path / "out"))
    stage_run(storage, layout, "r-old", unversioned(PublishMarker("r-old", "2026-11-30", {"shards": 2, "failed_shards": [1]})))
    assert publish.recover_interrupted_publishes(storage, layout) == ["r-old"]
    commit = json.loads((tmp_path / "out" / "_commits" / "r-old.json").read_bytes())
    assert (commit["kind"], commit["version"], commit["shards"], commit["failed_shards"]) == ("commit", 1, 2, [1])
    completions = pq.read_table(commit["tables"]["completions"])
    assert sorted(completions["document_id"].to_pylist()) == ["doc-1", "doc-2"]
    assert "run_date=2026-11-30" in commit["tables"]["completions"]
    assert CommitRecord.from_bytes(json.dumps(commit).encode()).audit == {"shards": 2, "failed_shards": [1]}
    assert not (tmp_path / "out" / "_staging" / "r-old").exists()


def test_a_publish_marker_of_a_newer_medvlm_stops_recovery_naming_it_and_publishes_nothing(tmp_path):
    storage, layout = Storage(), OutputLayout.of(str(tmp_path / "out"))
    stage_run(storage, layout, "r-new", with_version(PublishMarker("r-new", "2026-12-06"), 2))
    with pytest.raises(RunError) as info:
        publish.recover_interrupted_publishes(storage, layout)
    assert str(info.value).startswith(layout.publish_marker("r-new") + ":") and "upgrade medvlm" in str(info.value)
    assert not (tmp_path / "out" / "_commits").exists() and not (tmp_path / "out" / "completions").exists()
    assert (tmp_path / "out" / "_staging" / "r-new" / "_publish.json").exists()  # left for a newer medvlm to finish


def test_a_lease_record_an_earlier_medvlm_wrote_still_holds_the_output(tmp_path):
    storage, layout = Storage(), OutputLayout.of(str(tmp_path / "out"))
    held = LeaseRecord(epoch=0, run_id="r-old", token="t", host="worker-elsewhere", pid=1,
                       acquired_at="2026-12-06T00:00:00+00:00", expires_at="2999-01-01T00:00:00+00:00")
    storage.write_bytes_atomic(layout.lease_epoch(0), unversioned(held))
    assert OutputLease(storage, layout, "observer").current() == held
    with pytest.raises(RunError, match=r"busy: run r-old \(host worker-elsewhere, pid 1\)"):
        OutputLease(storage, layout, "r-new", poll_s=0.01).acquire("fail")


def test_a_lease_record_of_a_newer_medvlm_is_refused_not_taken_over(tmp_path):
    storage, layout = Storage(), OutputLayout.of(str(tmp_path / "out"))
    storage.write_bytes_atomic(layout.lease_epoch(0), with_version(RECORDS["lease"], 2))
    with pytest.raises(RunError, match="upgrade medvlm"):
        OutputLease(storage, layout, "r-new", poll_s=0.01).acquire("fail")
    assert storage.list_files(layout.lease(), ".json") == [layout.lease_epoch(0)]  # nothing written over it


def test_a_lease_record_of_a_newer_medvlm_is_refused_naming_the_file(tmp_path):
    storage, layout = Storage(), OutputLayout.of(str(tmp_path / "out"))
    storage.write_bytes_atomic(layout.lease_epoch(0), with_version(RECORDS["lease"], 2))
    with pytest.raises(RunError, match="lease-000000000000.json"):
        OutputLease(storage, layout, "r-new", poll_s=0.01).acquire("fail")
