"""Publishing a run: staged chunk files -> one file per table, then the runs row, the done index, the commit record.

Publishing is crash-consistent by rolling forward. Before any table is published, everything the publish
needs (the runs row, the quarantine rows, the run date and audit) is staged next to the chunk files, with
a ``_publish.json`` marker. A worker killed half-way leaves a run whose staging holds that marker and has
no commit record; the next run on the same output finishes that publish (``recover_interrupted_publishes``)
before it decides which pages are already done. Every step rewrites the same deterministic file, so
finishing twice changes nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Callable

from medvlm_core.errors import DocumentError
from medvlm_core.output import done_index, results
from medvlm_core.output.paths import NOT_TABLES, PUBLISH_MARKER, OutputLayout
from medvlm_core.output.records import CommitRecord, PublishMarker
from medvlm_core.storage import Storage


def staged_tables(storage: Storage, layout: OutputLayout, run_id: str) -> dict[str, list[str]]:
    """The run's staged chunk files by table, for every table staged so far.

    Args:
        storage: where the output is.
        layout: the output's layout.
        run_id: the run.

    Returns:
        Table name -> staged file URLs.
    """
    tables: dict[str, list[str]] = {}
    for url in storage.list_files(layout.run_staging(run_id), ".parquet"):
        tables.setdefault(layout.table_of_staged(url), []).append(url)
    return tables


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
    """Make a run visible: the result tables first, the runs row last, then the commit record.

    Each table gets exactly one file per run, written atomically, so a reader sees all of a run's rows in
    a table or none; publishing the same run again rewrites the same files (rows are never duplicated).

    Args:
        storage: where the output is.
        layout: the output's layout.
        run_id: the run.
        run_date: its ``run_date`` partition (``run_date_of`` its start).
        quarantine_rows: the manifest rows refused before processing.
        run_row: the run's row of the runs table.
        audit: how the run ran (e.g. which worker ran which shard), for the commit record.
        on_tables: called with the published file URL by table once every table is visible, before the
            bookkeeping that follows (done index, commit record): what only reports on the tables can start then.

    Returns:
        The published file URL by table.
    """
    if quarantine_rows:
        results.write_rows(storage, layout.staged(run_id, "quarantine", "quarantine.parquet"), "quarantine", quarantine_rows)
    results.write_rows(storage, layout.staged(run_id, "runs", "run.parquet"), "runs", [run_row])
    marker = PublishMarker(run_id, run_date, audit or {})
    storage.write_bytes_atomic(layout.publish_marker(run_id), marker.to_bytes())
    return publish_staged(storage, layout, run_id, on_tables)


def publish_staged(storage: Storage, layout: OutputLayout, run_id: str,
                   on_tables: Callable[[dict[str, str]], None] | None = None) -> dict[str, str]:
    """Publish what a run staged for publishing (its marker says so), then commit and clear its staging.

    Args:
        storage: where the output is.
        layout: the output's layout.
        run_id: a run whose publish marker is staged.
        on_tables: called with the published file URL by table once every table is visible (``publish_run``).

    Returns:
        The published file URL by table.
    """
    marker_url = layout.publish_marker(run_id)
    marker = PublishMarker.from_bytes(storage.read_bytes(marker_url), marker_url)
    staged = {t: urls for t, urls in staged_tables(storage, layout, run_id).items() if t not in NOT_TABLES}
    staged.setdefault("completions", [])  # every row quarantined: still one (empty) completions file
    published: dict[str, str] = {}
    # completions first, runs last: a reader who sees the runs row sees every table of the run
    for table in sorted(staged, key=lambda t: (t == "runs", t != "completions", t)):
        url = layout.table_part(table, marker.run_date, run_id)
        results.merge_parquet(storage, sorted(staged[table]), url, results.TABLES.get(table))
        published[table] = url
    if on_tables is not None:
        on_tables(dict(published))
    done_index.add_runs(storage, layout, {run_id: published["completions"]})  # before the commit: see done_index
    commit = CommitRecord(run_id, results.utc_now().isoformat(), published, marker.audit)
    storage.put_if_absent(layout.commit(run_id), commit.to_bytes())
    storage.remove_tree(layout.run_staging(run_id))
    return published


def recover_interrupted_publishes(storage: Storage, layout: OutputLayout) -> list[str]:
    """Finish the publishing of runs killed half-way through it (staged marker, no commit record).

    A run whose staging disappears meanwhile (another worker finished it) is left alone; runs still doing
    inference (no marker yet) are never touched.

    Args:
        storage: where the output is.
        layout: the output's layout.

    Returns:
        The run ids whose publish was finished here.
    """
    recovered = []
    for url in storage.list_files(layout.staging(), PUBLISH_MARKER):
        run_id = layout.run_id_of_marker(url)
        if storage.exists(layout.commit(run_id)):
            storage.remove_tree(layout.run_staging(run_id))  # committed, killed while cleaning up
            continue
        try:
            publish_staged(storage, layout, run_id)
        except DocumentError:  # a staged file vanished: someone else is finishing this run
            continue
        recovered.append(run_id)
    return recovered


def run_date_of(started_at: datetime) -> str:
    """The ``run_date`` partition value of a run.

    Args:
        started_at: the run's start (UTC).

    Returns:
        ``YYYY-MM-DD``.
    """
    return started_at.strftime("%Y-%m-%d")
