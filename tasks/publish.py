"""Publishing a run: staged chunk files -> one file per table, then the runs row, then the commit record."""

from __future__ import annotations

from datetime import datetime

from prefect import task
from prefect.cache_policies import NO_CACHE

from medvlm_core import results
from medvlm_core import storage as st
from medvlm_core.storage import Storage


def staged_tables(storage: Storage, output: str, run_id: str) -> dict[str, list[str]]:
    """Table name -> the run's staged chunk files, for every table staged so far."""
    root = results.staging_root(output, run_id)
    tables: dict[str, list[str]] = {}
    for url in storage.list_files(root, ".parquet"):
        table = st.dirname(url).rstrip("/").rsplit("/", 1)[-1]
        tables.setdefault(table, []).append(url)
    return tables


@task(name="publish-run", cache_policy=NO_CACHE)
def publish_run(
    output: str,
    run_id: str,
    run_date: str,
    staged: dict[str, list[str]],
    quarantine_rows: list[dict],
    run_row: dict,
    storage: Storage,
    audit: dict | None = None,
) -> dict[str, str]:
    """Make a run visible: the result tables first, the runs row last, then the commit record.

    ``staged`` maps each table (completions and any structured tables) to its chunk files. Each table gets
    exactly one file per run, written atomically, so a reader sees all of a run's rows in a table or none.
    Publishing the same run again rewrites the same files: rows are never duplicated. ``audit`` (e.g.
    which worker ran which shard) goes into the commit record. Returns the published URLs by table.
    """
    published: dict[str, str] = {}
    for table in sorted(staged, key=lambda t: (t != "completions", t)):
        url = results.table_part_url(output, table, run_date, run_id)
        schema = results.TABLES.get(table)
        results.merge_parquet(storage, sorted(staged[table]), url, schema)
        published[table] = url
    if "completions" not in published:  # every manifest row was quarantined: still one (empty) file
        url = results.table_part_url(output, "completions", run_date, run_id)
        results.write_rows(storage, url, "completions", [])
        published["completions"] = url
    if quarantine_rows:
        url = results.table_part_url(output, "quarantine", run_date, run_id)
        results.write_rows(storage, url, "quarantine", quarantine_rows)
        published["quarantine"] = url
    url = results.table_part_url(output, "runs", run_date, run_id)
    results.write_rows(storage, url, "runs", [run_row])
    published["runs"] = url
    storage.put_if_absent(results.commit_url(output, run_id), results.commit_record(run_id, published, audit))
    storage.remove_tree(results.staging_root(output, run_id))
    return published


def run_date_of(started_at: datetime) -> str:
    """The ``run_date`` partition value of a run (UTC date of its start)."""
    return started_at.strftime("%Y-%m-%d")
