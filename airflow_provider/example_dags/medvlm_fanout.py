"""``medvlm_fanout``: a manifest spread over GPU workers as mapped shard tasks, published as one run.

``plan_shards`` (any worker) validates the manifest into shards of ``shard_size`` rows and hands the output's
lease on; ``shard`` is mapped over them (on the GPU pool; a failed shard is retried by Airflow, its partial
results removed first); ``publish`` runs when every shard is done and publishes them as one run (a shard that
failed for good becomes error rows, and ``publish`` fails naming it).
"""

from __future__ import annotations

from airflow.sdk import DAG

from medvlm.airflow.example_dags.common import SHARD_SIZE, fan_out, run_params

with DAG(
    dag_id="medvlm_fanout",
    schedule=None,
    params={**run_params(), "shard_size": SHARD_SIZE},
    render_template_as_native_obj=True,  # options stay a dict, shard_size an int
    max_active_runs=1,
    tags=["medvlm"],
    doc_md=__doc__,
):
    fan_out("{{ params.manifest }}")
