"""Two test fan-outs. ``medvlm_fanout_dies_once``: shard 1's first try dies after staging its rows and before leaving
its record (as a worker lost mid-shard leaves it); Airflow's retry must publish it once.
``medvlm_fanout_shard_fails``: shard 1 dies on every try; its rows must become error rows and the run fail."""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG

from medvlm.airflow.example_dags.common import RUN_ARGS, SHARD_SIZE, run_params
from medvlm.airflow.operators import MedvlmPlanShardsOperator, MedvlmPublishShardsOperator, MedvlmShardOperator


class ShardDiesOnce(MedvlmShardOperator):
    """Shard 1's first try (every try: ``always``) raises once its chunks are staged, before its record is written."""

    always = False

    def hooks(self, context):
        hooks = super().hooks(context)
        if int(self.shard_index) != 1 or (context["ti"].try_number > 1 and not self.always):
            return hooks
        inner = hooks.map_chunks

        def dies(*args):
            yield from inner(*args)
            raise RuntimeError("shard 1 dies on every try" if self.always else "shard 1 dies on its first try")

        hooks.map_chunks = dies
        return hooks


class ShardAlwaysDies(ShardDiesOnce):
    """Shard 1 raises on every try."""

    always = True


for dag_id, shard_operator in (("medvlm_fanout_dies_once", ShardDiesOnce), ("medvlm_fanout_shard_fails", ShardAlwaysDies)):
    with DAG(dag_id=dag_id, schedule=None, params={**run_params(), "shard_size": SHARD_SIZE},
             render_template_as_native_obj=True):
        plan = MedvlmPlanShardsOperator(task_id="plan_shards", manifest="{{ params.manifest }}",
                                        shard_size="{{ params.shard_size }}", **RUN_ARGS)
        shards = shard_operator.partial(task_id="shard", retries=1, retry_delay=timedelta(seconds=1),
                                        **RUN_ARGS).expand(shard_index=plan.output)
        plan >> shards >> MedvlmPublishShardsOperator(task_id="publish", **RUN_ARGS)
