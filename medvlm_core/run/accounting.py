"""Run accounting: counts of what chunks, shards and runs produced, the reconciliation, and the runs row.

Counts only, never document data: these feed progress logs, the runs table, shard records and artifacts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import medvlm_core
from medvlm_core.inputs.manifest import ManifestPlan
from medvlm_core.inputs.prompts import Prompt
from medvlm_core.model.files import ModelIdentity
from medvlm_core.output import status

# The key of a document-scope result row that lists the manifest rows it answers (several rows may name pages
# of one document): not a column (``result_rows.completion_columns`` drops it), counted here.
COVERED_ROWS = "covered_rows"


@dataclass
class ChunkSummary:
    """What a chunk (or a shard, or a whole run, once merged) produced."""

    chunk_index: int
    staged_url: str
    written_rows: set[int] = field(default_factory=set)  # manifest rows with at least one written row
    skipped_rows: set[int] = field(default_factory=set)  # manifest rows with at least one skipped page
    pages_ok: int = 0
    pages_error: int = 0
    pages_skipped: int = 0
    pages_truncated: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_types: dict[str, int] = field(default_factory=dict)
    slowest: list[tuple[float, str, int | None]] = field(default_factory=list)  # (latency_ms, document_id, page)
    storage_retries: int = 0  # object-store calls retried (set per shard; a flow adds its own Storage's count)
    documents_ok: int = 0  # document scope: documents answered (ok or truncated)
    documents_error: int = 0  # document scope: documents that ended in an error row
    documents_skipped: int = 0  # document scope: documents whose answer was already in the output

    def add(self, row: dict) -> None:
        """Count one result row.

        Args:
            row: a result row (any status, ``skipped`` included). A document-scope answer counts as a
                document, for every manifest row it covers (``COVERED_ROWS``).
        """
        if row.get("scope") == "document":
            self._add_document(row)
            return
        if row["status"] == status.SKIPPED:
            self.pages_skipped += 1
            self.skipped_rows.add(row["manifest_row"])
            return
        self.written_rows.add(row["manifest_row"])
        if row["status"] == status.TRUNCATED:
            self.pages_truncated += 1
        if row["status"] in status.ANSWERED:
            self.pages_ok += 1
            self.prompt_tokens += row.get("prompt_tokens") or 0
            self.completion_tokens += row.get("completion_tokens") or 0
            self.slowest.append((row.get("latency_ms") or 0.0, row["document_id"], row.get("page")))
            self.slowest = sorted(self.slowest, reverse=True)[:5]
        else:
            self.pages_error += 1
            self.error_types[row["error_type"]] = self.error_types.get(row["error_type"], 0) + 1

    def _add_document(self, row: dict) -> None:
        covered = row.get(COVERED_ROWS) or [row["manifest_row"]]
        if row["status"] == status.SKIPPED:
            self.documents_skipped += 1
            self.skipped_rows.update(covered)
            return
        self.written_rows.update(covered)
        if row["status"] in status.ANSWERED:
            self.documents_ok += 1
            self.prompt_tokens += row.get("prompt_tokens") or 0
            self.completion_tokens += row.get("completion_tokens") or 0
        else:
            self.documents_error += 1
            self.error_types[row["error_type"]] = self.error_types.get(row["error_type"], 0) + 1

    def merge(self, other: "ChunkSummary") -> None:
        """Add another summary's counts to this one (a shard's chunks, a run's shards).

        Args:
            other: the summary to add.
        """
        self.written_rows |= other.written_rows
        self.skipped_rows |= other.skipped_rows
        for name in ("pages_ok", "pages_error", "pages_skipped", "pages_truncated", "prompt_tokens", "completion_tokens",
                     "storage_retries", "documents_ok", "documents_error", "documents_skipped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for key, value in other.error_types.items():
            self.error_types[key] = self.error_types.get(key, 0) + value
        self.slowest = sorted(self.slowest + other.slowest, reverse=True)[:5]

    def to_json(self) -> str:
        """How a shard hands its counts to the parent run.

        Returns:
            JSON (sets as sorted lists).
        """
        data = asdict(self)
        data["written_rows"] = sorted(self.written_rows)
        data["skipped_rows"] = sorted(self.skipped_rows)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "ChunkSummary":
        """The inverse of ``to_json``.

        Args:
            text: a summary's JSON.

        Returns:
            The summary.
        """
        data = json.loads(text)
        data["written_rows"] = set(data["written_rows"])
        data["skipped_rows"] = set(data["skipped_rows"])
        data["slowest"] = [tuple(x) for x in data["slowest"]]
        return cls(**data)


def merge_summaries(summaries: list[ChunkSummary]) -> ChunkSummary:
    """One summary with the counts of all.

    Args:
        summaries: chunk or shard summaries.

    Returns:
        Their sum.
    """
    total = ChunkSummary(chunk_index=-1, staged_url="")
    for s in summaries:
        total.merge(s)
    return total


def reconciles(plan: ManifestPlan, total: ChunkSummary) -> tuple[bool, set[int]]:
    """Whether every manifest row ended as exactly one of result, error, skipped or quarantine.

    Args:
        plan: the run's validated manifest.
        total: the run's merged counts.

    Returns:
        ``(reconciled, skipped_rows)``; skipped rows are those with no written page at all.
    """
    skipped = total.skipped_rows - total.written_rows
    expected = set(plan.row_numbers)
    ok = (total.written_rows | skipped) == expected and (
        len(plan.quarantined) + len(skipped) + len(total.written_rows) == plan.total_rows
    )
    return ok, skipped


@dataclass(frozen=True)
class RunFacts:
    """What a finished run's row is built from, besides its counts."""

    run_id: str
    flow_run_id: str | None
    manifest: str
    output: str
    started: datetime
    finished: datetime
    identity: ModelIdentity
    params_json: str
    default_prompt: Prompt
    storage_retries: int  # the run's own Storage's retries (shards report theirs in their summaries)
    memory: dict | None = None  # the engine's memory plan (``MemoryPlan.as_dict``), when one was made
    scope: str = "page"  # the run's scope (``DocumentOptions.scope``)


def run_row(facts: RunFacts, plan: ManifestPlan, total: ChunkSummary) -> dict[str, Any]:
    """The run's row of the runs table.

    Args:
        facts: the run's identity and timing.
        plan: its validated manifest.
        total: its merged counts.

    Returns:
        The row (``medvlm_core.output.results.RUNS_SCHEMA``).
    """
    wall = max((facts.finished - facts.started).total_seconds(), 1e-9)
    reconciled, skipped = reconciles(plan, total)
    return {
        "run_id": facts.run_id,
        "flow_run_id": facts.flow_run_id,
        "status": "completed",
        "started_at": facts.started,
        "finished_at": facts.finished,
        "wall_seconds": wall,
        "manifest_uri": facts.manifest,
        "output_uri": facts.output,
        "model_name": facts.identity.model_name,
        "model_sha256": facts.identity.model_sha256,
        "mmproj_sha256": facts.identity.mmproj_sha256,
        "chat_format": facts.identity.chat_format,
        "prompt_id": facts.default_prompt.prompt_id,
        "prompt_sha256": facts.default_prompt.sha256,
        "params_json": facts.params_json,
        "manifest_rows": plan.total_rows,
        "quarantined_rows": len(plan.quarantined),
        "skipped_rows": len(skipped),
        "skipped_pages": total.pages_skipped,
        "processed_rows": len(total.written_rows),
        "pages_ok": total.pages_ok,
        "pages_error": total.pages_error,
        "pages_truncated": total.pages_truncated,
        "reconciled": reconciled,
        "prompt_tokens": total.prompt_tokens,
        "completion_tokens": total.completion_tokens,
        "pages_per_second": total.pages_ok / wall,
        "completion_tokens_per_second": total.completion_tokens / wall,
        "storage_retries": total.storage_retries + facts.storage_retries,
        "n_parallel": (facts.memory or {}).get("n_parallel"),
        "memory_needed_mb": (facts.memory or {}).get("needed_mb"),
        "memory_budget_mb": (facts.memory or {}).get("budget_mb"),
        "medvlm_version": medvlm_core.__version__,
        "scope": facts.scope,
        "documents_ok": total.documents_ok if facts.scope == "document" else None,
        "documents_error": total.documents_error if facts.scope == "document" else None,
    }


def run_summary(row: dict[str, Any], total: ChunkSummary, published: dict[str, str]) -> dict[str, Any]:
    """What a finished run returns (and its artifact and log show): counts, speed, locations.

    Args:
        row: the run's row (``run_row``).
        total: its merged counts.
        published: the published file URL by table.

    Returns:
        The summary.
    """
    keys = ("run_id", "scope", "manifest_rows", "quarantined_rows", "skipped_rows", "skipped_pages", "pages_ok",
            "pages_error", "pages_truncated", "documents_ok", "documents_error", "reconciled", "storage_retries", "wall_seconds", "pages_per_second",
            "completion_tokens_per_second")
    return {
        **{k: row[k] for k in keys},
        "error_types": dict(sorted(total.error_types.items())),
        "slowest": total.slowest,
        "published": published,
        "output": row["output_uri"],
    }
