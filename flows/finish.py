"""What a Prefect flow run reports when its run publishes: the summary, counts (and shards) and link artifacts,
and the ``medvlm.run.published`` event (the hooks ``flows.prepare.prefect_hooks`` plugs into the core's run API).
"""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.events import emit_event


class RunArtifacts:
    """A run's summary, counts (and shards) and link artifacts, written at once on threads of their own: each is
    an API round trip (~20-70 ms on a loaded machine) that the run's end would otherwise wait on in turn.

    The threads run in copies of the context this object was made in (the flow run's): Prefect finds the flow run
    the artifacts belong to there, also when ``start`` is called from inside the publishing task.

    """

    def __init__(self):
        self._context = contextvars.copy_context()
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list = []

    def start(self, summary: dict) -> None:
        """Start writing the artifacts of ``summary``.

        Args:
            summary: the run's summary (with a fan-out's ``shard_counts``).
        """
        writers = [lambda: publish_artifact(summary), lambda: publish_counts_artifact(summary, summary.get("shard_counts")),
                   lambda: publish_link_artifact(summary)]
        self._pool = ThreadPoolExecutor(len(writers), thread_name_prefix="medvlm-artifacts")
        self._futures = [self._pool.submit(self._context.copy().run, writer) for writer in writers]

    def wait(self) -> None:
        """Wait until the artifacts are written, if they were started (each writer swallows its own errors: never
        raises)."""
        if self._pool is None:
            return
        for future in self._futures:
            future.result()
        self._pool.shutdown()


def publish_artifact(summary: dict) -> None:
    """A markdown artifact with what a person checks first: counts, speed, slowest pages, locations.

    Args:
        summary: a run's summary.
    """
    lines = [
        f"# medvlm run {summary['run_id']}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| manifest rows | {summary['manifest_rows']} |",
        f"| pages ok | {summary['pages_ok']} |",
        f"| pages error | {summary['pages_error']} |",
        f"| pages skipped (already done) | {summary['skipped_pages']} |",
        f"| quarantined rows | {summary['quarantined_rows']} |",
        f"| reconciled | {summary['reconciled']} |",
        f"| storage retries | {summary.get('storage_retries', 0)} |",
        f"| pages/s | {summary['pages_per_second']:.3f} |",
        f"| completion tokens/s | {summary['completion_tokens_per_second']:.1f} |",
        "",
        "| error type | pages |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in summary["error_types"].items()],
        "",
        "| slowest pages (document id, page) | ms |",
        "|---|---|",
        *[f"| {doc} p{page or '-'} | {ms:.0f} |" for ms, doc, page in summary["slowest"]],
        "",
        "Tables: " + ", ".join(f"`{k}`: {v}" for k, v in summary["published"].items()),
    ]
    try:
        # _sync: this function is also called from the async fan-out flow, where Prefect would otherwise hand
        # back an un-awaited coroutine and no artifact would be written.
        create_markdown_artifact(
            markdown="\n".join(lines), key="medvlm-run-summary", description="medvlm run summary", _sync=True
        )
    except Exception:  # an artifact is a convenience: never fail a finished run over it
        pass


PUBLISHED_EVENT = "medvlm.run.published"


def counts_table(summary: dict) -> list[dict[str, Any]]:
    """A run's pages by status and error type (and its quarantined rows): the table artifact's rows.

    Args:
        summary: a run's summary.

    Returns:
        Rows of ``status``, ``error_type``, ``pages`` (no document data).
    """
    rows = [{"status": "ok", "error_type": "", "pages": summary["pages_ok"]}]
    if summary.get("pages_truncated"):
        rows.append({"status": "truncated", "error_type": "", "pages": summary["pages_truncated"]})
    rows += [{"status": "error", "error_type": k, "pages": v} for k, v in summary["error_types"].items()]
    rows.append({"status": "skipped (already done)", "error_type": "", "pages": summary["skipped_pages"]})
    rows.append({"status": "quarantined (rows)", "error_type": "", "pages": summary["quarantined_rows"]})
    return rows


def publish_counts_artifact(summary: dict, shard_counts: list[dict] | None = None) -> None:
    """Table artifacts of the counts by status and error type (and by shard for a fan-out), next to the
    markdown summary.

    Args:
        summary: a run's summary.
        shard_counts: a fan-out's counts per shard (rows of ``shard``, ``pages_ok``, ``pages_error``, ...).
    """
    try:
        create_table_artifact(table=counts_table(summary), key="medvlm-run-counts",
                              description=f"medvlm run {summary['run_id']}: pages by status and error type", _sync=True)
        if shard_counts:
            create_table_artifact(table=shard_counts, key="medvlm-run-shards",
                                  description=f"medvlm run {summary['run_id']}: pages by shard", _sync=True)
    except Exception:  # artifacts are a convenience: never fail a finished run over them
        pass


def publish_link_artifact(summary: dict) -> None:
    """A link artifact to the output's tables.

    Args:
        summary: a run's summary.
    """
    try:
        create_link_artifact(link=summary["output"], link_text=f"medvlm output ({len(summary['published'])} tables)",
                             key="medvlm-run-output", description=f"medvlm run {summary['run_id']}: the output tables",
                             _sync=True)
    except Exception:  # artifacts are a convenience: never fail a finished run over them
        pass


def emit_published(summary: dict) -> None:
    """Tell what comes after that a run has published: the ``medvlm.run.published`` event, the output as its
    resource, the run as a related resource, the counts as payload (no document data). A deployment trigger
    on it starts downstream work (prefect.yaml's ``medvlm-report``).

    Args:
        summary: a run's summary.
    """
    keys = ("manifest_rows", "quarantined_rows", "skipped_pages", "pages_ok", "pages_error", "pages_truncated", "reconciled")
    try:
        emit_event(
            event=PUBLISHED_EVENT,
            resource={"prefect.resource.id": f"medvlm.output.{summary['output']}", "prefect.resource.name": summary["output"]},
            related=[{"prefect.resource.id": f"medvlm.run.{summary['run_id']}", "prefect.resource.role": "medvlm-run"}],
            payload={"run_id": summary["run_id"], "output": summary["output"], **{k: summary.get(k) for k in keys}},
        )
    except Exception:  # an event is a convenience: never fail a finished run over it
        pass
