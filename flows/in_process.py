"""Running a flow in this process, as the ``medvlm`` command does, and printing what it returns.

Without PREFECT_API_URL, Prefect starts a temporary server for the flow run and stops it when the process
exits, logging "Stopping temporary server" as it does; ``errors_last`` stops it before the command prints its
own error, so that the error is the last line a user reads.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator

EXIT_OK, EXIT_UNRECONCILED, EXIT_CANNOT_RUN = 0, 1, 2


def prefect_defaults() -> None:
    """Settings that make the first run work offline; set before Prefect is imported, never overriding."""
    # A fresh ephemeral server needs more than Prefect's 20 s default to migrate its database.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _temporary_server_running() -> bool:
    """Whether this process runs Prefect's temporary server (the instance of no fixed port) now."""
    if "prefect.server.api.server" not in sys.modules:  # no flow ran here: nothing was started
        return False
    from prefect.server.api.server import SubprocessASGIServer

    return SubprocessASGIServer().server_process is not None


# The errors of the command running in ``errors_last``, printed when it ends.
_ERRORS: ContextVar[list[str] | None] = ContextVar("medvlm_cli_errors", default=None)


@contextmanager
def errors_last() -> Iterator[None]:
    """Run a command so that its errors (``fail``) are the last lines it prints: a temporary Prefect server the
    command started is stopped first (Prefect would stop it at exit, logging after the error). A server that
    was already running (a test harness, a server in the same process) is left alone."""
    running_before = _temporary_server_running()
    errors: list[str] = []
    token = _ERRORS.set(errors)
    try:
        yield
    finally:
        _ERRORS.reset(token)
        if errors and not running_before and _temporary_server_running():
            from prefect.server.api.server import SubprocessASGIServer

            SubprocessASGIServer().stop()
        for message in errors:
            print(f"medvlm: error: {message}", file=sys.stderr)


def fail(message: str, code: int = EXIT_CANNOT_RUN) -> int:
    """A command's error: printed at once, or, inside ``errors_last``, as the command's last line.

    Args:
        message: what went wrong (no document data).
        code: the exit status to return.

    Returns:
        ``code``.
    """
    errors = _ERRORS.get()
    if errors is None:
        print(f"medvlm: error: {message}", file=sys.stderr)
    else:
        errors.append(message)
    return code


def run_flow(manifest: str, output: str, model: str, mmproj: str | None, options: dict[str, Any]) -> tuple[int, dict | None, str | None]:
    """Run the batch flow in-process.

    Args:
        manifest: the manifest URI.
        output: the output URI.
        model: the model URI.
        mmproj: the mmproj URI.
        options: run options by their (flat) names.

    Returns:
        ``(exit status, summary or None, error message or None)``.
    """
    prefect_defaults()
    from medvlm.flows.batch import medvlm_batch

    state = medvlm_batch(manifest=manifest, output=output, model=model, mmproj=mmproj, options=options, return_state=True)
    if not state.is_completed():
        return EXIT_CANNOT_RUN, None, state.message or "the run failed"
    summary = state.result()
    return (EXIT_OK if summary["reconciled"] else EXIT_UNRECONCILED), summary, None


def print_summary(summary: dict, out=sys.stdout) -> None:
    """Counts and locations of a finished run (no document data)."""
    print(f"run {summary['run_id']}: {summary['manifest_rows']} manifest rows -> "
          f"{summary['pages_ok']} ok pages, {summary['pages_error']} error pages, "
          f"{summary['quarantined_rows']} quarantined, {summary['skipped_rows']} skipped "
          f"({summary['skipped_pages']} pages already done); "
          f"reconciled={summary['reconciled']}", file=out)
    if summary.get("scope") == "document":
        print(f"documents: {summary['documents_ok']} answered, {summary['documents_error']} error", file=out)
    if summary["error_types"]:
        print("errors by type: " + ", ".join(f"{k}={v}" for k, v in summary["error_types"].items()), file=out)
    print(f"throughput: {summary['pages_per_second']:.2f} pages/s, "
          f"{summary['completion_tokens_per_second']:.1f} completion tokens/s over {summary['wall_seconds']:.1f} s", file=out)
    for table, url in summary["published"].items():
        print(f"  {table}: {url}", file=out)


def run_eval(output: str, gold: str, run_ids: list[str] | None, eval_options: dict[str, Any],
             s3_endpoint: str | None = None) -> tuple[int, dict | None, str | None]:
    """Run the eval flow in-process.

    Args:
        output: the output URI.
        gold: the gold file's URI.
        run_ids: the runs to score (None: the current answers).
        eval_options: evaluation options by name.
        s3_endpoint: endpoint of an S3-compatible store.

    Returns:
        ``(exit status, the flow's result or None, error message or None)``.
    """
    prefect_defaults()
    from medvlm.flows.eval import medvlm_eval

    options = {"s3_endpoint": s3_endpoint} if s3_endpoint else None
    state = medvlm_eval(output=output, gold=gold, run_ids=run_ids, options=options, eval_options=eval_options,
                        return_state=True)
    if not state.is_completed():
        return EXIT_CANNOT_RUN, None, state.message or "the evaluation failed"
    return EXIT_OK, state.result(), None


def print_eval(result: dict, out=None) -> None:
    """The headline scores of an evaluation and where its tables and report are (no document data).

    Args:
        result: what the ``medvlm-eval`` flow returned.
        out: where to print (default: standard output).
    """
    out = out or sys.stdout

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    width = max([len("run")] + [len(r["system"]) for r in result["headline"]])
    print(f"eval {result['eval_id']}", file=out)
    print(f"{'run':<{width}} {'table':<13} {'precision':>9} {'recall':>7} {'F1':>6} {'95% CI':>13} {'gold':>5} "
          f"{'no answer':>9}", file=out)
    for r in result["headline"]:
        ci = "-" if r["ci_low"] is None else f"{r['ci_low']:.2f} to {r['ci_high']:.2f}"
        print(f"{r['system']:<{width}} {r['table'][:13]:<13} {fmt(r['precision']):>9} {fmt(r['recall']):>7} "
              f"{fmt(r['f1']):>6} {ci:>13} {r['gold_items']:>5} {r['pages_without_answer']:>9}", file=out)
    for c in result["comparisons"]:
        if c["table"] == "all":
            diff = "-" if c["difference"] is None else f"{c['difference']:+.3f}"
            ci = "" if c["ci_low"] is None else f" (95% CI {c['ci_low']:+.3f} to {c['ci_high']:+.3f})"
            print(f"{c['system']} vs {c['baseline']}: {c['metric']} {diff}{ci}", file=out)
    for label, n in result["review_rows"].items():
        print(f"{label}: {n} rows to review", file=out)
    for note in result["notes"]:
        print(f"note: {note}", file=out)
    for name, url in result["written"].items():
        print(f"  {name}: {url}", file=out)
