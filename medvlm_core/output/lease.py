"""An output's lease: at most one run at a time decides what is done in an output and publishes into it.

Two runs into one output that both load the done keys before either publishes would both process every
page. So a run (batch, fan-out parent, each nightly run) takes the output's lease before it finishes
interrupted publishes and loads the done keys, keeps it renewed while it works, and gives it back after
it published. Fan-out shards work under their parent's lease and never take it.

The lease is a sequence of small JSON records, one per holder, under ``<output>/_lease/``
(``lease-<epoch>.json``, epochs counting up); the newest epoch is the lease. A record says who holds it
(run id, host, pid, a random token), since when and until when (``expires_at``), and whether it was given
back (``released``). Every change of holder is a create-if-absent of the next epoch (``Storage.put_if_absent``:
a hard link locally, a conditional PUT with ``If-None-Match`` on S3), so when several runs find the lease
free, expired or released at once, exactly one of them creates the next record and holds it; the others
see it and wait (or fail). No conditional overwrite or delete is needed, and a record is never replaced by
another holder's, only by its own holder's renewals. Records are marked released rather than deleted, so
epochs only ever go up (a deleted newest record would let a late taker and a fresh starter both win).

A holder whose process died stops renewing: its record expires ``ttl_s`` after the last renewal and is then
taken over. On the same machine (same host name, boot and process namespace, Linux) a dead holder is seen
at once (its pid is gone or belongs to a newer process), so re-running after a crash does not wait.
Expiry compares the holder's clock (it wrote ``expires_at``) with the reader's: machines sharing an output
must keep their clocks in step (NTP) to well within ``ttl_s``.

A holder that was paused for longer than ``ttl_s`` (a frozen VM) may find its lease taken: its renewal
notices, and ``ensure_held`` (called before publishing) refuses to publish, so the run that took over is the
only one that publishes those pages.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar, Literal

from medvlm_core.errors import DocumentError, RunError
from medvlm_core.output.paths import OutputLayout
from medvlm_core.output.records import JsonRecord
from medvlm_core.storage import Storage

OnBusy = Literal["wait", "fail"]
_EPOCH_FILE = re.compile(r"lease-(\d+)\.json$")
_log = logging.getLogger(__name__)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, Linux), None when unknown."""
    stat = _read_text(f"/proc/{pid}/stat")
    if not stat or ")" not in stat:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 else None  # field 22 of proc(5); fields[0] is field 3


def machine_id() -> str | None:
    """Where a pid means one process: the boot and the pid namespace (Linux), None elsewhere."""
    boot = _read_text("/proc/sys/kernel/random/boot_id")
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{boot}/{namespace}" if boot else None


def process_gone(host: str, machine: str | None, pid: int, started: str | None) -> bool:
    """True when the process a lease record names is known to be gone (only decidable on its own machine).

    Args:
        host: the holder's host name.
        machine: the holder's boot and pid namespace (``None``: unknown, never decided).
        pid: the holder's process id.
        started: the holder process's start time as it recorded it.

    Returns:
        True if the holder ran here and its pid no longer exists or now belongs to a newer process; False if
        it is alive or cannot be checked from here.
    """
    if host != socket.gethostname() or machine is None or machine != machine_id():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by another user
        pass
    now_started = process_start(pid)
    return started is not None and now_started is not None and now_started != started


@dataclass(frozen=True)
class LeaseRecord(JsonRecord):
    """One holder's record of an output's lease (``<output>/_lease/lease-<epoch>.json``)."""

    KIND: ClassVar[str] = "lease"

    epoch: int
    run_id: str
    token: str  # this acquisition's random id: a run's identity in the lease
    host: str
    pid: int
    acquired_at: str
    expires_at: str
    machine: str | None = None
    process_started: str | None = None
    released: bool = False

    @property
    def expires(self) -> float:
        """``expires_at`` in seconds since the epoch."""
        return _seconds(self.expires_at)

    def gone(self) -> bool:
        """True when the holder's process is known to be dead (see ``process_gone``).

        Returns:
            Whether the holder died.
        """
        return process_gone(self.host, self.machine, self.pid, self.process_started)

    def free(self, now: float | None = None) -> bool:
        """True when another run may take the lease: released, expired, or its holder died.

        Args:
            now: the time to judge expiry at (seconds since the epoch; default now).

        Returns:
            Whether the lease is free.
        """
        return self.released or (time.time() if now is None else now) >= self.expires or self.gone()

    def describe(self) -> str:
        """Who holds it, for messages (no document data).

        Returns:
            ``run R (host H, pid P)``.
        """
        return f"run {self.run_id} (host {self.host}, pid {self.pid})"


class OutputLease:
    """One run's lease on one output: ``acquire``, ``start_renewing``, ``ensure_held``, ``release``.

    Args:
        storage: the run's storage.
        layout: the output.
        run_id: the run taking the lease.
        ttl_s: how long a record stays valid without renewal (renewed every ``ttl_s / 4``).
        poll_s: how often a waiting run looks at the lease again.
        logger: where waiting, take-overs and renewal problems are logged (``.info``/``.warning``).
    """

    def __init__(self, storage: Storage, layout: OutputLayout, run_id: str, ttl_s: float = 120.0, poll_s: float = 2.0,
                 logger: Any = None):
        self.storage = storage
        self.layout = layout
        self.run_id = run_id
        self.ttl_s = float(ttl_s)
        self.poll_s = float(poll_s)
        self.logger = logger or _log
        self.held: LeaseRecord | None = None
        self.lost_to: LeaseRecord | None = None  # who took it while we held it
        self.lost = False
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading -----------------------------------------------------------------------------------
    def _epochs(self) -> list[tuple[int, str]]:
        found = []
        for url in self.storage.list_files(self.layout.lease(), ".json"):
            match = _EPOCH_FILE.search(url.rsplit("/", 1)[-1])
            if match:
                found.append((int(match.group(1)), url))
        return sorted(found)

    def current(self) -> LeaseRecord | None:
        """The lease as it stands: the newest epoch's record.

        Returns:
            The record, or None when the output has never been leased.
        """
        for _ in range(5):
            epochs = self._epochs()
            if not epochs:
                return None
            epoch, url = epochs[-1]
            try:
                return LeaseRecord.from_bytes(self.storage.read_bytes(url), url)
            except DocumentError:  # removed meanwhile (an older epoch being cleaned up): look again
                continue
            except ValueError:  # an unreadable record cannot hold the output: treat it as released
                return LeaseRecord(epoch, "unknown", "", "unknown", 0, _iso(0), _iso(0), released=True)
        raise RunError(f"output {self.layout.root}: its lease keeps changing; try again")

    # -- taking ------------------------------------------------------------------------------------
    def _record(self, epoch: int) -> LeaseRecord:
        now = time.time()
        return LeaseRecord(
            epoch=epoch, run_id=self.run_id, token=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(),
            acquired_at=_iso(now), expires_at=_iso(now + self.ttl_s), machine=machine_id(),
            process_started=process_start(os.getpid()),
        )

    def _busy_message(self, holder: LeaseRecord) -> str:
        return (f"output {self.layout.root} is busy: {holder.describe()} holds its lease until "
                f"{holder.expires_at}")

    def acquire(self, on_busy: OnBusy = "wait", wait_s: float = 3600.0) -> LeaseRecord:
        """Take the lease: at once if it is free, after the holder gives it back (``wait``), or not at all (``fail``).

        A lease that expired or whose holder died is taken over (logged). While waiting, the holder is logged
        once (and again if another run takes it meanwhile).

        Args:
            on_busy: ``"wait"`` (up to ``wait_s``) or ``"fail"`` (at once) when another run holds it.
            wait_s: the longest wait, in seconds.

        Returns:
            This run's record.

        Raises:
            RunError: the lease is held by another run (``fail``) or still held after ``wait_s`` (``wait``);
            the message names the run holding it.
        """
        deadline = time.monotonic() + max(0.0, wait_s)
        announced: str | None = None
        waited_since = time.monotonic()
        while True:
            current = self.current()
            if current is None or current.free():
                mine = self._record(0 if current is None else current.epoch + 1)
                if self.storage.put_if_absent(self.layout.lease_epoch(mine.epoch), mine.to_bytes()):
                    newest = self.current()
                    if newest is not None and newest.token == mine.token:
                        with self._lock:
                            self.held, self.lost, self.lost_to = mine, False, None
                        self._announce(current, announced is not None, time.monotonic() - waited_since)
                        self._clean_older(mine.epoch)
                        return mine
                continue  # another run took this epoch first: look again
            if on_busy == "fail":
                raise RunError(self._busy_message(current) + "; run again later, or with --on-busy wait (option on_busy) to wait for it")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RunError(self._busy_message(current) + f"; still busy after waiting {wait_s:.0f} s "
                               "(busy_wait_seconds)")
            if announced != current.token:
                announced = current.token
                self.logger.warning("%s; run %s waits for it (up to %.0f s more)", self._busy_message(current),
                                    self.run_id, remaining)
            until_expiry = current.expires - time.time()
            time.sleep(max(0.05, min(self.poll_s, remaining, until_expiry + 0.05)))

    def _announce(self, previous: LeaseRecord | None, waited: bool, waited_s: float) -> None:
        if previous is None or previous.run_id == "unknown":
            return
        after = f" after waiting {waited_s:.1f} s" if waited else ""
        if previous.released:
            if waited:
                self.logger.info("output %s: run %s took the lease%s, given back by %s", self.layout.root,
                                 self.run_id, after, previous.describe())
            return
        why = "whose process is gone" if previous.gone() else f"which expired at {previous.expires_at}"
        self.logger.warning("output %s: run %s took over the lease of %s, %s%s", self.layout.root, self.run_id,
                            previous.describe(), why, after)

    def _clean_older(self, epoch: int) -> None:
        """Remove the records before ours (the newest always stays, so epochs only go up)."""
        try:
            for older, url in self._epochs():
                if older < epoch:
                    self.storage.remove_tree(url)
        except (OSError, DocumentError) as exc:  # only tidiness: the next holder tries again
            self.logger.warning("output %s: could not remove old lease records (%s)", self.layout.root,
                                type(exc).__name__)

    # -- keeping -----------------------------------------------------------------------------------
    def _mark_lost(self, current: LeaseRecord | None) -> None:
        self.held, self.lost, self.lost_to = None, True, current
        self.logger.warning("output %s: run %s lost its lease%s; it will not publish", self.layout.root, self.run_id,
                            f" to {current.describe()}" if current is not None else " (the lease records are gone)")

    def renew(self) -> bool:
        """Push this run's expiry ``ttl_s`` into the future, if the lease is still ours.

        Returns:
            True if renewed; False if this run does not hold the lease (never did, released, or lost it:
            then ``lost`` is set and ``lost_to`` names the new holder).
        """
        with self._lock:
            held = self.held
            if held is None:
                return False
            current = self.current()
            if current is None or current.token != held.token:
                self._mark_lost(current)
                return False
            renewed = dataclasses.replace(held, expires_at=_iso(time.time() + self.ttl_s))
            self.storage.write_bytes_atomic(self.layout.lease_epoch(held.epoch), renewed.to_bytes())
            self.held = renewed
            return True

    def start_renewing(self) -> None:
        """Renew every ``ttl_s / 4`` in a daemon thread until ``release`` (or until the lease is lost)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name=f"medvlm-lease-{self.run_id}", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        interval = self.ttl_s / 4
        while not self._stop.wait(interval):
            try:
                if not self.renew():
                    return
            except Exception as exc:  # a storage problem: try again soon, the record is valid for a while
                self.logger.warning("output %s: could not renew the lease of run %s (%s); trying again",
                                    self.layout.root, self.run_id, type(exc).__name__)

    def _stop_renewing(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)

    def ensure_held(self) -> None:
        """Check (and renew) the lease right before publishing.

        Raises:
            RunError: this run no longer holds the lease; the message names who took it.
        """
        if not self.renew():
            who = f" to {self.lost_to.describe()}" if self.lost_to is not None else ""
            raise RunError(f"output {self.layout.root}: run {self.run_id} lost its lease{who} (no renewal for "
                           f"{self.ttl_s:.0f} s?); nothing was published, the run holding the lease does these pages")

    # -- handing over between processes -------------------------------------------------------------
    def hand_over(self, ttl_s: float) -> str:
        """Keep the lease for this run after this process ends, for a later step of the run to take back
        (``take_back``): an orchestrator whose planning, shards and publishing are separate processes (Airflow).

        Renewal stops; the record no longer names a process (so it is never seen as a dead holder's) and expires
        ``ttl_s`` from now unless the run takes it back and renews it.

        Args:
            ttl_s: how long the lease stays held without a renewal (the run's longest expected gap).

        Returns:
            The lease's token, which ``take_back`` needs (not a secret: it only names this holding).

        Raises:
            RunError: this run no longer holds the lease.
        """
        self._stop_renewing()
        with self._lock:
            held = self.held
            current = self.current() if held is not None else None
            if held is None or current is None or current.token != held.token:
                if held is not None:
                    self._mark_lost(current)
                raise RunError(f"output {self.layout.root}: run {self.run_id} does not hold its lease")
            detached = dataclasses.replace(held, pid=0, machine=None, process_started=None,
                                           expires_at=_iso(time.time() + ttl_s))
            self.storage.write_bytes_atomic(self.layout.lease_epoch(held.epoch), detached.to_bytes())
            self.held = None
            return held.token

    def take_back(self, token: str) -> LeaseRecord:
        """Hold again the lease an earlier step of this run handed over (``hand_over``); renew, check and release
        it as usual afterwards.

        Args:
            token: the token ``hand_over`` returned.

        Returns:
            The record.

        Raises:
            RunError: the lease was released, expired or taken by another run meanwhile (the message names who
                holds it).
        """
        current = self.current()
        if current is None or current.token != token or current.released or current.expires <= time.time():
            who = f"; {current.describe()} holds it" if current is not None and not current.free() else ""
            raise RunError(f"output {self.layout.root}: run {self.run_id} lost its lease while its steps ran (it was "
                           f"released, or expired after its hand-over time){who}; nothing was published")
        with self._lock:
            self.held, self.lost, self.lost_to = current, False, None
        return current

    # -- giving back -------------------------------------------------------------------------------
    def release(self) -> bool:
        """Give the lease back (mark our record released) if it is still ours; stop renewing.

        Storage errors are logged, not raised (this runs on failure paths): the record then expires.

        Returns:
            True if this call released it.
        """
        self._stop_renewing()
        with self._lock:
            held, self.held = self.held, None
            if held is None:
                return False
            try:
                current = self.current()
                if current is None or current.token != held.token:
                    return False
                released = dataclasses.replace(held, released=True, expires_at=_iso(time.time()))
                self.storage.write_bytes_atomic(self.layout.lease_epoch(held.epoch), released.to_bytes())
                return True
            except Exception as exc:
                self.logger.warning("output %s: could not give back the lease of run %s (%s); it expires in %.0f s",
                                    self.layout.root, self.run_id, type(exc).__name__, self.ttl_s)
                return False

