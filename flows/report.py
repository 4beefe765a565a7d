"""The ``medvlm-report`` flow: what comes after a run publishes. One of ``medvlm query``'s built-in queries over
the output, written as a small report table and shown as a table artifact.

prefect.yaml's ``medvlm-report`` deployment is triggered by every ``medvlm.run.published`` event (emitted by
``flows.finish``), with the event's output and run id as parameters: an example of downstream work started by
an event rather than by a schedule.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed

from medvlm.tasks.credentials import build_storage
from medvlm_core import storage as st
from medvlm_core.analytics import EXAMPLE_QUERIES, query
from medvlm_core.errors import RunError
from medvlm_core.output import results
from medvlm_core.run.options import RunOptions
from medvlm_core.settings import Settings

# The built-in queries whose rows hold no document data (ids, text, names): only these are shown as a table
# artifact; the others' rows stay in the report file.
ARTIFACT_QUERIES = ("throughput_per_run", "errors_by_type")


@flow(name="medvlm-report", log_prints=False, validate_parameters=False)
def medvlm_report(output: str, run_id: str | None = None, query_name: str = "throughput_per_run",
                  options: RunOptions | None = None) -> Any:
    """Run a built-in query over ``output`` and write it to ``<output>/reports/<query_name>/report-<run_id>.parquet``.

    Args:
        output: the output the run published to.
        run_id: the run that triggered the report (names the report file).
        query_name: one of ``medvlm_core.analytics.EXAMPLE_QUERIES``.
        options: run options; only the storage ones are used (credentials block, S3 endpoint).

    Returns:
        The report's location and row count, or a Failed state naming the problem.
    """
    logger = get_run_logger()
    try:
        if query_name not in EXAMPLE_QUERIES:
            raise RunError(f"unknown query {query_name!r}; built-in ones: {', '.join(sorted(EXAMPLE_QUERIES))}")
        storage = build_storage(RunOptions.parse(options).storage, Settings())
        output = st.normalize(output)
        table = query(output, EXAMPLE_QUERIES[query_name], storage)
        url = st.join(output, "reports", query_name, f"report-{run_id or 'latest'}.parquet")
        results.write_parquet(storage, url, table)
    except RunError as exc:
        logger.error("report failed: %s", exc)
        return Failed(message=str(exc))
    logger.info("report %s: %d rows at %s", query_name, table.num_rows, url)
    try:
        key = f"medvlm-report-{query_name.replace('_', '-')}"
        if query_name in ARTIFACT_QUERIES:
            create_table_artifact(table=table.slice(0, 100).to_pylist(), key=key,
                                  description=f"medvlm report {query_name} after run {run_id}")
        else:  # rows with document ids or text stay in the output's storage, out of Prefect
            create_markdown_artifact(markdown=f"medvlm report `{query_name}`: {table.num_rows} rows at `{url}`", key=key)
    except Exception:  # an artifact is a convenience
        pass
    return {"report": url, "rows": table.num_rows}
