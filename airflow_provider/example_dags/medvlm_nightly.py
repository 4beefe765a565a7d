"""``medvlm_nightly``: every night at 02:00 UTC, a fan-out over that night's manifest.

The manifest is ``<manifest_prefix>/<date>/manifest.csv`` for the run's logical date (``ds``). A night run again
(cleared, or after a failure) skips the pages it already answered, so it completes the rest, exactly once.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param

from medvlm.airflow.example_dags.common import SHARD_SIZE, fan_out, run_params

with DAG(
    dag_id="medvlm_nightly",
    schedule="0 2 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    params={**run_params(), "shard_size": SHARD_SIZE,
            "manifest_prefix": Param("", type="string",
                                     description="Where each night's manifest lies: <prefix>/<YYYY-MM-DD>/manifest.csv")},
    render_template_as_native_obj=True,
    max_active_runs=1,
    tags=["medvlm"],
    doc_md=__doc__,
):
    fan_out("{{ params.manifest_prefix }}/{{ ds }}/manifest.csv")
