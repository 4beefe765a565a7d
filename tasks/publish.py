"""Publishing a run: staged chunk files -> one file per table, then the runs row, then the commit record.

Publishing is crash-consistent by rolling forward. Before any table is published, everything the publish
needs (the runs row, the quarantine rows, the run date and audit) is staged next to the chunk files, with
a ``_publish.json`` marker. A worker killed half-way leaves a run whose staging holds that marker and has
no commit record; the next run on the same output finishes that publish (``recover_interrupted_publishes``)
before it decides which pages are already done. Every step rewrites the same deterministic file, so
finishing twice changes nothing.
"""

from __future__ import annotations

import json
from datetime import datetime

from prefect import task
from prefect.cache_policies import NO_CACHE

from medvlm_core import results
from medvlm_core import storage as st
from medvlm_core.errors import DocumentError
from medvlm_core.storage import Storage

PUBLISH_MARKER = "_publish.json"


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
    quarantine_rows: list[dict],
    run_row: dict,
    storage: Storage,
    audit: dict | None = None,
) -> dict[str, str]:
    """Make a run visible: the result tables first, the runs row last, then the commit record.

    Each table gets exactly one file per run, written atomically, so a reader sees all of a run's rows in
    a table or none; publishing the same run again rewrites the same files (rows are never duplicated).
    ``audit`` (e.g. which worker ran which shard) goes into the commit record. Returns the published URLs
    by table.
    """
    if quarantine_rows:
        results.write_rows(storage, results.staging_url(output, run_id, "quarantine", "quarantine.parquet"),
                           "quarantine", quarantine_rows)
    results.write_rows(storage, results.staging_url(output, run_id, "runs", "run.parquet"), "runs", [run_row])
    marker = {"run_id": run_id, "run_date": run_date, "audit": audit or {}}
    storage.write_bytes_atomic(st.join(results.staging_root(output, run_id), PUBLISH_MARKER),
                               json.dumps(marker, sort_keys=True, default=str).encode())
    return publish_staged(storage, output, run_id)


def publish_staged(storage: Storage, output: str, run_id: str) -> dict[str, str]:
    """Publish what a run staged for publishing (its marker says so), then commit and clear its staging."""
    root = results.staging_root(output, run_id)
    marker = json.loads(storage.read_bytes(st.join(root, PUBLISH_MARKER)))
    staged = {t: urls for t, urls in staged_tables(storage, output, run_id).items() if t != "shards"}
    staged.setdefault("completions", [])  # every row quarantined: still one (empty) completions file
    published: dict[str, str] = {}
    # completions first, runs last: a reader who sees the runs row sees every table of the run
    for table in sorted(staged, key=lambda t: (t == "runs", t != "completions", t)):
        url = results.table_part_url(output, table, marker["run_date"], run_id)
        results.merge_parquet(storage, sorted(staged[table]), url, results.TABLES.get(table))
        published[table] = url
    storage.put_if_absent(results.commit_url(output, run_id), results.commit_record(run_id, published, marker["audit"]))
    storage.remove_tree(root)
    return published


def recover_interrupted_publishes(storage: Storage, output: str) -> list[str]:
    """Finish the publishing of runs killed half-way through it (staged marker, no commit record).

    Returns their run ids. A run whose staging disappears meanwhile (another worker finished it) is left
    alone; runs still doing inference (no marker yet) are never touched.
    """
    recovered = []
    base = st.join(output, "_staging")
    for url in storage.list_files(base, PUBLISH_MARKER):
        run_id = st.dirname(url).rstrip("/").rsplit("/", 1)[-1]
        if storage.exists(results.commit_url(output, run_id)):
            storage.remove_tree(results.staging_root(output, run_id))  # committed, killed while cleaning up
            continue
        try:
            publish_staged(storage, output, run_id)
        except DocumentError:  # a staged file vanished: someone else is finishing this run
            continue
        recovered.append(run_id)
    return recovered


def run_date_of(started_at: datetime) -> str:
    """The ``run_date`` partition value of a run (UTC date of its start)."""
    return started_at.strftime("%Y-%m-%d")
