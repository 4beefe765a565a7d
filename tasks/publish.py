"""The publishing task: a run's staged files become its published tables (``medvlm_core.output.publish``)."""

from __future__ import annotations

from typing import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE

from medvlm_core.output import publish
from medvlm_core.output.paths import OutputLayout
from medvlm_core.storage import Storage


@task(name="publish-run", cache_policy=NO_CACHE)
def publish_run(
    storage: Storage,
    layout: OutputLayout,
    run_id: str,
    run_date: str,
    quarantine_rows: list[dict],
    run_row: dict,
    audit: dict | None = None,
    on_tables: Callable[[dict[str, str]], None] | None = None,
) -> dict[str, str]:
    """Publish a run: its tables, then its runs row, then its commit record (see ``medvlm_core.output.publish``).

    Args:
        storage: where the output is.
        layout: the output's layout.
        run_id: the run.
        run_date: its ``run_date`` partition.
        quarantine_rows: the manifest rows refused before processing.
        run_row: the run's row of the runs table.
        audit: how the run ran, for the commit record.
        on_tables: called with the published file URL by table once every table is visible, before the done
            index and the commit record are written.

    Returns:
        The published file URL by table.
    """
    return publish.publish_run(storage, layout, run_id, run_date, quarantine_rows, run_row, audit, on_tables)
