"""What the example DAGs share: a run's params (its locations and options, as in the Prefect flows), the Asset
they publish, and the tasks of a fan-out."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, Param

from medvlm.airflow.operators import MedvlmPlanShardsOperator, MedvlmPublishShardsOperator, MedvlmShardOperator

# The example DAGs' output, as an Asset downstream DAGs schedule on (``schedule=[MEDVLM_RESULTS]``); each event
# carries the run's id, output and counts. A DAG of your own names its output: Asset("s3://analytics/medvlm").
MEDVLM_RESULTS = Asset(name="medvlm_results", uri="medvlm://results")


def run_params(**defaults: Any) -> dict[str, Param]:
    """The DAG params of a run: ``manifest``, ``output``, ``model``, ``mmproj``, ``options``, ``aws_conn_id``.

    Args:
        **defaults: default values (a DAG triggered with a conf overrides them).

    Returns:
        The params.
    """
    return {
        "manifest": Param(defaults.get("manifest", ""), type="string",
                          description="The manifest URI (.csv, .jsonl or .parquet)."),
        "output": Param(defaults.get("output", ""), type="string", description="The output folder or s3:// prefix."),
        "model": Param(defaults.get("model", ""), type="string",
                       description="The text GGUF, or a .zip bundle of both files."),
        "mmproj": Param(defaults.get("mmproj"), type=["null", "string"], description="The vision projector GGUF."),
        "options": Param(defaults.get("options", {}), type="object",
                         description="The run's options (medvlm's RunOptions, flat or grouped)."),
        "aws_conn_id": Param(defaults.get("aws_conn_id", ""), type="string",
                             description="An aws connection for S3; empty: the AWS environment."),
    }


# The templated arguments every medvlm operator of the examples takes from the params.
RUN_ARGS = dict(output_uri="{{ params.output }}", model="{{ params.model }}", mmproj="{{ params.mmproj }}",
                options="{{ params.options }}", aws_conn_id="{{ params.aws_conn_id }}")

# Where the shards run. In a DAG of your own: a pool sized to the GPU workers' slots (``airflow pools set gpu 4
# "GPU slots"``, then ``pool="gpu"``), or a queue only GPU workers serve (Celery or Kubernetes executors:
# ``queue="gpu"``). The examples use the pool every Airflow has.
GPU_POOL = "default_pool"
SHARD_RETRIES = 2


def fan_out(manifest: str, shard_size: str | int = "{{ params.shard_size }}") -> Any:
    """A fan-out's tasks in the DAG being defined: ``plan_shards`` >> ``shard`` (mapped, on ``GPU_POOL``, retried)
    >> ``publish`` (when every shard is done; it publishes ``MEDVLM_RESULTS``).

    Args:
        manifest: the manifest URI (templated).
        shard_size: manifest rows per shard (templated).

    Returns:
        The publishing task.
    """
    plan = MedvlmPlanShardsOperator(task_id="plan_shards", manifest=manifest, shard_size=shard_size, **RUN_ARGS)
    shards = MedvlmShardOperator.partial(
        task_id="shard", plan_task_id="plan_shards", pool=GPU_POOL, retries=SHARD_RETRIES,
        retry_delay=timedelta(seconds=30), **RUN_ARGS,
    ).expand(shard_index=plan.output)
    publish = MedvlmPublishShardsOperator(task_id="publish", plan_task_id="plan_shards", shard_task_id="shard",
                                          outlets=[MEDVLM_RESULTS], **RUN_ARGS)
    plan >> shards >> publish
    return publish


SHARD_SIZE = Param(256, type="integer", minimum=1, description="Manifest rows per shard (each loads the model once).")
