"""The output lease: one run at a time decides what is done in an output and publishes into it.

Unit level on a local folder and on a real S3 server (SeaweedFS): a second run fails at once naming the holder
(or waits a bounded time), racing takers get exactly one winner, a stale lease (expired, or its process gone)
is taken over, a run only gives back its own lease and notices when it lost it. Then real runs (real Prefect,
real llama.cpp): two ``medvlm run`` started together into one output (local and S3) publish exactly one ok row
per key and both reconcile; ``--on-busy fail`` exits 2 naming the holder; a run takes over a dead run's lease
and still rolls the dead run's interrupted publish forward.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from conftest import batch, write_manifest
from medvlm_core.errors import RunError
from medvlm_core.output.lease import LeaseRecord, OutputLease, machine_id, process_start
from medvlm_core.output.paths import OutputLayout
from medvlm_core.storage import Storage, s3_options

MEDVLM = str(Path(sys.executable).with_name("medvlm"))
BUCKET = "medvlm-lease"


# ---------------------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """``(storage, layout)`` of a fresh output: a local folder, or a prefix on the session's S3 server."""
    if request.param == "local":
        return Storage(), OutputLayout.of(str(tmp_path / "out"))
    server = request.getfixturevalue("s3_server")
    request.getfixturevalue("s3")  # credentials in the environment
    server.create_bucket(BUCKET)
    return (Storage({"s3": s3_options(endpoint_url=server.endpoint_url)}),
            OutputLayout.of(f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}/out"))


def lease(output, run_id: str, ttl_s: float = 30.0) -> OutputLease:
    storage, layout = output
    return OutputLease(storage, layout, run_id, ttl_s=ttl_s, poll_s=0.05)


def plant(output, run_id: str, expires_in: float, **fields) -> LeaseRecord:
    """Write the next lease record as if another run held the output (e.g. one that died)."""
    storage, layout = output
    current = lease(output, "observer").current()
    now = time.time()
    record = LeaseRecord(
        epoch=0 if current is None else current.epoch + 1, run_id=run_id, token=uuid.uuid4().hex,
        host=fields.pop("host", "worker-elsewhere"), pid=fields.pop("pid", 4242),
        acquired_at=_iso(now - 60), expires_at=_iso(now + expires_in), **fields,
    )
    assert storage.put_if_absent(layout.lease_epoch(record.epoch), record.to_bytes())
    return record


def _iso(seconds: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()


# ---------------------------------------------------------------------------------------------------------
# Unit level, local and S3


def test_second_run_fails_at_once_or_waits_a_bounded_time(output):
    first = lease(output, "run-first")
    held = first.acquire("fail")
    assert held.epoch == 0 and held.run_id == "run-first" and held.pid == os.getpid() and not held.released
    second = lease(output, "run-second")
    t0 = time.monotonic()
    with pytest.raises(RunError, match=r"is busy: run run-first \(host .*, pid \d+\) holds its lease") as busy:
        second.acquire("fail")
    assert "--on-busy wait" in str(busy.value) and time.monotonic() - t0 < 5
    t0 = time.monotonic()
    with pytest.raises(RunError, match=r"run run-first .* still busy after waiting 1 s"):
        second.acquire("wait", wait_s=0.6)
    assert 0.5 < time.monotonic() - t0 < 10

    # given back while the second one waits: it takes the lease (the next epoch) and the old record is tidied
    threading.Timer(0.5, first.release).start()
    taken = second.acquire("wait", wait_s=30)
    assert taken.epoch == 1 and taken.run_id == "run-second"
    storage, layout = output
    assert [u.rsplit("/", 1)[-1] for u in storage.list_files(layout.lease(), ".json")] == ["lease-000000000001.json"]
    assert first.release() is False  # released already: nothing happens to the second run's lease
    assert second.current().token == taken.token and not second.current().released
    assert second.release() is True and second.current().released


def test_a_lease_handed_over_between_processes_stays_held_until_taken_back(output):
    """An Airflow fan-out: its planning task hands the lease over, its publishing task (another process) takes it
    back with the token; meanwhile no other run gets the output, and a dead planner's pid does not free it."""
    planner = lease(output, "run-fanout")
    planner.acquire("fail")
    token = planner.hand_over(ttl_s=30)
    handed = planner.current()
    assert handed.token == token and handed.pid == 0 and handed.machine is None and not handed.released
    assert not handed.gone() and not handed.free()
    with pytest.raises(RunError, match="is busy: run run-fanout"):
        lease(output, "run-other").acquire("fail")

    with pytest.raises(RunError, match="lost its lease while its steps ran"):
        lease(output, "run-fanout").take_back("not-the-token")
    publisher = lease(output, "run-fanout")
    assert publisher.take_back(token).epoch == handed.epoch
    publisher.ensure_held()  # renews: the publisher holds it like any holder
    assert publisher.release() is True
    assert lease(output, "run-other").acquire("fail").run_id == "run-other"


def test_a_handed_over_lease_that_expired_is_lost(output):
    planner = lease(output, "run-fanout")
    planner.acquire("fail")
    token = planner.hand_over(ttl_s=0.2)
    time.sleep(0.4)
    assert lease(output, "run-next").acquire("fail").run_id == "run-next"  # expired: the output is free again
    with pytest.raises(RunError, match=r"lost its lease while its steps ran .*; run run-next \(host"):
        lease(output, "run-fanout").take_back(token)


def test_racing_runs_get_exactly_one_winner(output):
    def race(prefix: str, n: int = 5) -> list[str]:
        barrier = threading.Barrier(n)
        winners: list[str] = []

        def take(i: int) -> None:
            contender = lease(output, f"{prefix}-{i}")
            barrier.wait()
            try:
                contender.acquire("fail")
                winners.append(contender.run_id)
            except RunError:
                pass

        threads = [threading.Thread(target=take, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return winners

    assert len(race("fresh")) == 1  # nobody held it yet
    plant(output, "run-died", expires_in=-5)  # the holder died: expired
    winners = race("taker")
    assert len(winners) == 1
    assert lease(output, "observer").current().run_id == winners[0]


def test_stale_lease_is_taken_over_and_the_old_holder_notices(output, caplog):
    # no renewal: as if its process froze. The ttl leaves room for the S3 calls of a loaded machine between the
    # two acquires (at 0.5 s the lease once expired before the second acquire looked at it).
    old = lease(output, "run-stalled", ttl_s=3.0)
    held = old.acquire("fail")
    new = lease(output, "run-new")
    with pytest.raises(RunError):
        new.acquire("fail")
    time.sleep(max(0.0, held.expires - time.time()) + 0.2)  # until the record it wrote has expired
    with caplog.at_level(logging.WARNING, logger="medvlm_core.output.lease"):
        taken = new.acquire("fail")
    assert "took over the lease of run run-stalled" in caplog.text and "which expired at" in caplog.text
    assert taken.epoch == 1
    # the stalled run comes back: renewal says it lost the lease, it may not publish, and release leaves the
    # new holder's lease alone
    assert old.renew() is False and old.lost and old.lost_to.run_id == "run-new"
    with pytest.raises(RunError, match="run run-stalled lost its lease to run run-new"):
        old.ensure_held()
    assert old.release() is False
    assert new.current().token == taken.token and not new.current().released
    new.release()


def test_renewal_keeps_a_working_run_s_lease(output):
    holder = lease(output, "run-working", ttl_s=0.6)
    holder.acquire("fail")
    holder.start_renewing()
    try:
        time.sleep(1.5)  # well past one ttl: only renewals keep it
        with pytest.raises(RunError, match="run run-working"):
            lease(output, "run-second").acquire("fail")
        holder.ensure_held()
    finally:
        assert holder.release() is True
    assert lease(output, "run-second").acquire("fail").epoch == 1


def test_dead_process_on_this_machine_is_taken_over_at_once(tmp_path):
    out = (Storage(), OutputLayout.of(str(tmp_path / "out")))
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    import socket

    # A lease of a live process here (this one), not expired: busy.
    plant(out, "run-alive", expires_in=600, host=socket.gethostname(), pid=os.getpid(), machine=machine_id(),
          process_started=process_start(os.getpid()))
    with pytest.raises(RunError, match="run run-alive"):
        lease(out, "run-next").acquire("fail")
    # The same, from a process that has exited: taken over without waiting for the expiry.
    plant(out, "run-killed", expires_in=600, host=socket.gethostname(), pid=finished.pid, machine=machine_id(),
          process_started="1")
    assert lease(out, "run-next").acquire("fail").epoch == 2
    # Another machine's holder cannot be checked from here: only its expiry counts.
    plant(out, "run-remote", expires_in=600, pid=finished.pid)
    with pytest.raises(RunError, match=r"run run-remote \(host worker-elsewhere"):
        lease(out, "run-other").acquire("fail")


def test_an_unreadable_record_does_not_block_the_output(tmp_path):
    storage, layout = out = (Storage(), OutputLayout.of(str(tmp_path / "out")))
    storage.write_bytes_atomic(layout.lease_epoch(3), b"{not json")
    assert lease(out, "run-a").acquire("fail").epoch == 4


# ---------------------------------------------------------------------------------------------------------
# Real runs: the medvlm command (subprocesses) and the batch flow


def medvlm_env(**extra: str) -> dict[str, str]:
    """The test environment, with the session's Prefect test server (no ephemeral server per command)."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), MEDVLM_LEASE_POLL_S="0.25")
    env.update(extra)
    return env


def run_args(manifest: Path, out: str, model, *more: str) -> list[str]:
    return [MEDVLM, "run", "--manifest", str(manifest), "--output", out, "--model", str(model.model_path),
            "--mmproj", str(model.mmproj_path), "--prompt-id", "transcribe", "--max-tokens", "8", "--n-ctx", "4096",
            "--temperature", "0", "--seed", "3", *more]


def many_docs(demo_docs: list[dict], copies: int = 4) -> list[dict]:
    return [dict(r, document_id=f"{r['document_id']}-{i}") for i in range(copies) for r in demo_docs]


def read_table(out: str, name: str, s3_fs=None):
    if out.startswith("s3://"):
        return ds.dataset(f"{out[5:]}/{name}", filesystem=s3_fs, format="parquet", partitioning="hive").to_table()
    return ds.dataset(f"{out}/{name}", format="parquet", partitioning="hive").to_table()


class Command:
    """A ``medvlm`` subprocess whose output is collected line by line while it runs."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def wait(self, timeout: float = 900) -> int:
        code = self.proc.wait(timeout=timeout)
        for reader in self.readers:
            reader.join(10)
        return code


@pytest.mark.e2e
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_concurrent_runs_process_every_page_once(where, request, tmp_path, tiny_llava, demo_docs):
    """Two ``medvlm run`` of one manifest into one output, started together. So that both are surely there at
    the same time (not one finished before the other got going), the test holds the output's lease itself
    until both wait for it, then gives it back: the two race for it, one wins and runs the pages, the other
    waits for the winner, then finds every page done."""
    fs, storage = None, Storage()
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        fs = request.getfixturevalue("s3")
        server.create_bucket(BUCKET)
        storage = Storage({"s3": s3_options(endpoint_url=server.endpoint_url)})
        out = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}/out"
    else:
        out = str(tmp_path / "out")
    manifest = write_manifest(tmp_path / "m.csv", many_docs(demo_docs))
    door = OutputLease(storage, OutputLayout.of(out), "20261201T000000Z-doorkeep", ttl_s=600)
    door.acquire("fail")
    try:
        runs = [Command(run_args(manifest, out, tiny_llava), medvlm_env()) for _ in range(2)]
        deadline = time.monotonic() + 600  # generous for a loaded machine: ends as soon as both wait
        while not all("waits for it" in c.stderr for c in runs):
            assert time.monotonic() < deadline and all(c.proc.poll() is None for c in runs), \
                [c.stderr[-2000:] for c in runs]
            time.sleep(0.05)
    finally:
        door.release()
    for c in runs:
        assert c.wait() == 0, c.stderr[-3000:]
        assert "reconciled=True" in c.stdout and "Traceback" not in c.stdout + c.stderr
        assert "is busy: run 20261201T000000Z-doorkeep (host " in c.stderr
    run_ids = [re.search(r"^run (\S+): 12 manifest rows", c.stdout, re.M).group(1) for c in runs]

    # The loser waited for the winner (its log names the winner as the holder), then found every page done.
    losers = [i for i, c in enumerate(runs) if f"is busy: run {run_ids[1 - i]} (host " in c.stderr]
    assert len(losers) == 1, [c.stderr[-2000:] for c in runs]
    second = losers[0]
    first = 1 - second
    log = runs[second].stderr
    assert f"run {run_ids[second]} waits for it" in log
    assert f"run {run_ids[second]} took the lease after waiting" in log and f"given back by run {run_ids[first]}" in log
    assert "12 ok pages" in runs[first].stdout
    assert "0 ok pages" in runs[second].stdout and "12 skipped (12 pages already done)" in runs[second].stdout

    completions = read_table(out, "completions", fs).to_pylist()
    ok = Counter(r["result_key"] for r in completions if r["status"] == "ok")
    assert len(ok) == 12 and set(ok.values()) == {1}  # exactly one ok row per key across the output
    assert {r["run_id"] for r in completions} == {run_ids[first]}
    published = {r["run_id"]: r for r in read_table(out, "runs", fs).to_pylist()}
    assert set(published) == set(run_ids) and all(r["reconciled"] for r in published.values())
    assert (published[run_ids[first]]["pages_ok"], published[run_ids[second]]["skipped_pages"]) == (12, 12)
    final = OutputLease(storage, OutputLayout.of(out), "observer").current()  # both gave it back
    assert final.run_id == run_ids[second] and final.released and final.epoch == 2


@pytest.mark.e2e
def test_on_busy_fail_exits_2_naming_the_holder(tmp_path, tiny_llava, demo_docs):
    manifest = write_manifest(tmp_path / "m.csv", demo_docs)
    out = str(tmp_path / "out")
    holder = OutputLease(Storage(), OutputLayout.of(out), "20261201T000000Z-holding1", ttl_s=600)
    holder.acquire("fail")
    try:
        proc = subprocess.run(run_args(manifest, out, tiny_llava, "--on-busy", "fail"), capture_output=True,
                              text=True, env=medvlm_env(), timeout=900)
    finally:
        holder.release()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(r"medvlm: error: output \S+ is busy: run 20261201T000000Z-holding1 \(host \S+, pid "
                     rf"{os.getpid()}\) holds its lease until ", proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out" / "completions").exists()


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_dead_run_s_lease_is_taken_over_and_its_publish_rolled_forward(tmp_path, tiny_llava, demo_docs, monkeypatch):
    """A run dies while publishing (its staged marker is there, nothing committed) and leaves its lease behind
    (held by another machine, expired): the next run takes the lease over, finishes the dead run's publish,
    and then finds every page done."""
    import medvlm_core.output.publish as publish

    manifest = write_manifest(tmp_path / "m.csv", demo_docs)
    out = tmp_path / "out"
    params = dict(manifest=str(manifest), output=str(out), model=str(tiny_llava.model_path),
                  mmproj=str(tiny_llava.mmproj_path), prompt_id="transcribe", max_tokens=4, n_ctx=4096)

    def died(storage, layout, run_id):
        raise RuntimeError("killed while publishing")

    monkeypatch.setattr(publish, "publish_staged", died)
    state = batch(return_state=True, **params)
    monkeypatch.undo()
    assert state.is_failed()
    staged = [p.name for p in (out / "_staging").iterdir()]
    assert len(staged) == 1 and (out / "_staging" / staged[0] / "_publish.json").exists()
    dead_run = staged[0]
    assert not (out / "completions").exists()
    # the dead run's lease, as a worker on another machine that died would leave it: not released, expired
    out_lease = (Storage(), OutputLayout.of(str(out)))
    plant(out_lease, dead_run, expires_in=-1, host="gpu-worker-7", pid=31337)

    lines = _Lines()
    logger = logging.getLogger("prefect.flow_runs")
    logger.addHandler(lines)
    try:
        state = batch(return_state=True, on_busy="fail", **params)
    finally:
        logger.removeHandler(lines)
    assert state.is_completed(), state.message
    summary = state.result()
    assert (summary["pages_ok"], summary["skipped_pages"], summary["reconciled"]) == (0, 3, True)
    text = "\n".join(lines.lines)
    assert f"took over the lease of run {dead_run} (host gpu-worker-7, pid 31337), which expired at" in text
    assert f"finished publishing run {dead_run}" in text
    assert text.index("took over the lease") < text.index(f"finished publishing run {dead_run}")
    completions = read_table(str(out), "completions").to_pylist()
    assert Counter(r["result_key"] for r in completions if r["status"] == "ok").most_common(1)[0][1] == 1
    assert {r["run_id"] for r in completions} == {dead_run} and len(completions) == 3
    record = json.loads(sorted((out / "_lease").glob("*.json"))[-1].read_bytes())
    assert record["run_id"] == summary["run_id"] and record["released"] is True
