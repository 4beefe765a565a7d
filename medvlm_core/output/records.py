"""The small JSON records medvlm keeps beside its tables, typed and versioned: what a run leaves on disk besides
Parquet is one of these (or the done index's state, versioned in ``done_index``).

* ``PublishMarker`` (``_staging/<run_id>/_publish.json``): a run has finished and may be published; a worker
  killed while publishing leaves it for the next run to roll forward.
* ``CommitRecord`` (``_commits/<run_id>.json``): a run's published files and how it ran, written once.
* ``ShardRecord`` (``run/shards.py``) and ``LeaseRecord`` (``output/lease.py``) use the same base.

Every record is written with its ``kind`` and ``version``. A record without a version is version 1 (what
medvlm wrote before records carried one). A record newer than this medvlm reads is a clear error, never a guess.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from medvlm_core.errors import RunError

R = TypeVar("R", bound="JsonRecord")


class JsonRecord:
    """Base of the on-disk JSON records (dataclasses): ``to_bytes`` and ``from_bytes`` with kind and version.

    Subclasses set ``KIND`` and, when their fields change in a way an older reader would get wrong, raise
    ``VERSION``.
    """

    KIND: ClassVar[str] = "record"
    VERSION: ClassVar[int] = 1

    def to_bytes(self) -> bytes:
        """The record as UTF-8 JSON, with its kind and version.

        Returns:
            The bytes.
        """
        body = dataclasses.asdict(self)  # type: ignore[call-overload]
        body.update(kind=self.KIND, version=self.VERSION)
        return json.dumps(body, sort_keys=True, default=str).encode()

    @classmethod
    def from_bytes(cls: type[R], data: bytes, where: str = "") -> R:
        """A record read back; keys this medvlm does not know are ignored (a later minor version's additions).

        Args:
            data: what ``to_bytes`` wrote (or an unversioned record of an earlier medvlm).
            where: the record's URL, for the errors.

        Returns:
            The record.

        Raises:
            ValueError: not such a record.
            RunError: a version newer than this medvlm reads.
        """
        raw = checked_json(cls, data, where)
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        try:
            return cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as exc:
            raise ValueError(f"{where or 'data'}: not a {cls.KIND} record ({exc})") from None


def checked_json(record: type[JsonRecord], data: bytes, where: str = "") -> dict[str, Any]:
    """A record's JSON object, once its version is one this medvlm reads.

    Args:
        record: the record's class (its ``KIND`` and ``VERSION``).
        data: the bytes read.
        where: the record's URL, for the errors.

    Returns:
        The JSON object.

    Raises:
        ValueError: not a JSON object, a record of another kind, or a version that is not a number.
        RunError: a version newer than ``record.VERSION``.
    """
    try:
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise TypeError("not an object")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where or 'data'}: not a {record.KIND} record ({type(exc).__name__})") from None
    kind = raw.get("kind", record.KIND)
    if kind != record.KIND:
        raise ValueError(f"{where or 'data'}: a {kind!r} record, not a {record.KIND} record")
    version = raw.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{where or 'data'}: {record.KIND} record version {version!r} is not a version number")
    if version > record.VERSION:
        raise RunError(f"{where or 'a ' + record.KIND + ' record'}: {record.KIND} record version {version} is "
                       f"newer than this medvlm reads ({record.VERSION}): upgrade medvlm")
    return raw


@dataclass(frozen=True)
class PublishMarker(JsonRecord):
    """A finished run's marker: its tables may be published into the partition ``run_date``.

    Attributes:
        run_id: the run.
        run_date: the partition its files go to.
        audit: how it ran (counts, shards; no document data), copied into the commit record.
    """

    KIND: ClassVar[str] = "publish-marker"

    run_id: str
    run_date: str
    audit: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CommitRecord(JsonRecord):
    """A published run's commit: its files by table and how it ran. Written once (create-if-absent).

    The audit's keys sit at the top level of the JSON (``shards``, ``failed_shards``, ... as users read them).

    Attributes:
        run_id: the run.
        committed_at: when (ISO 8601, UTC).
        tables: table -> the published file's URL.
        audit: how it ran (no document data).
    """

    KIND: ClassVar[str] = "commit"

    run_id: str
    committed_at: str
    tables: dict[str, str]
    audit: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """The record as UTF-8 JSON, the audit's keys at the top level.

        Returns:
            The bytes.
        """
        body = {**self.audit, "run_id": self.run_id, "committed_at": self.committed_at, "tables": self.tables,
                "kind": self.KIND, "version": self.VERSION}
        return json.dumps(body, sort_keys=True, default=str).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "") -> "CommitRecord":
        """A commit record read back: every key but its own fields is the audit.

        Args:
            data: what ``to_bytes`` wrote.
            where: the record's URL, for the errors.

        Returns:
            The record.
        """
        raw = checked_json(cls, data, where)
        missing = [k for k in ("run_id", "committed_at", "tables") if k not in raw]
        if missing:
            raise ValueError(f"{where or 'data'}: not a {cls.KIND} record (no {', '.join(missing)})")
        audit = {k: v for k, v in raw.items() if k not in ("run_id", "committed_at", "tables", "kind", "version")}
        return cls(raw["run_id"], raw["committed_at"], raw["tables"], audit)
