"""The end of a flow run: reconcile the counts, publish the run's tables, write the summary artifact."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from medvlm_core.accounting import ChunkSummary, RunFacts, merge_summaries, run_row, run_summary
from medvlm_core.manifest import ManifestPlan
from medvlm_core.models import ModelIdentity
from medvlm_core.publish import run_date_of
from medvlm_core.results import utc_now
from medvlm_core.run import RunContext, ensure_output_held, release_output
from tasks.publish import publish_run


def finish_run(
    logger: Any,
    ctx: RunContext,
    manifest: str,
    plan: ManifestPlan,
    summaries: list[ChunkSummary],
    identity: ModelIdentity,
    params: str,
    audit: dict[str, Any] | None = None,
    memory: dict | None = None,
) -> dict[str, Any]:
    """Reconcile the counts, publish the run's tables atomically, write the artifact.

    Args:
        logger: the flow run's logger.
        ctx: the run.
        manifest: the manifest URI (normalised).
        plan: the validated manifest.
        summaries: the chunks' (or shards') counts.
        identity: the model's identity.
        params: the run's ``params_json``.
        audit: how the run ran (shards, workers), for the commit record.
        memory: the engine's memory plan (default: this process's, when it planned one).

    Returns:
        The run's summary (``medvlm_core.accounting.run_summary``).

    Raises:
        RunError: the run lost the output's lease to another run (nothing is published); the lease is given
            back once the run is published.
    """
    total = merge_summaries(summaries)
    facts = RunFacts(
        run_id=ctx.run_id, flow_run_id=str(flow_run.id) if flow_run.id else None, manifest=manifest,
        output=ctx.output.root, started=ctx.started, finished=utc_now(), identity=identity, params_json=params,
        default_prompt=ctx.default_prompt, storage_retries=ctx.storage.retries,
        memory=memory or (ctx.memory.as_dict() if ctx.memory else None),
    )
    row = run_row(facts, plan, total)
    quarantine_rows = [dict(q, run_id=ctx.run_id, manifest_uri=manifest, created_at=facts.finished) for q in plan.quarantined]
    ensure_output_held(ctx)  # a run whose lease was taken over must not publish: the other run does these pages
    published = publish_run(ctx.storage, ctx.output, ctx.run_id, run_date_of(ctx.started), quarantine_rows, row, audit)
    release_output(ctx)  # published: the next run on this output may start deciding what is done
    summary = run_summary(row, total, published)
    publish_artifact(summary)
    logger.info(
        "run %s done: %d ok, %d error, %d skipped pages; %d quarantined rows; reconciled=%s",
        ctx.run_id, total.pages_ok, total.pages_error, total.pages_skipped, len(plan.quarantined), row["reconciled"],
    )
    return summary


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
