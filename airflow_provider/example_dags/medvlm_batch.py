"""``medvlm_batch``: a whole run in one task (for manifests one worker gets through in an acceptable time).

Trigger it with a conf: ``airflow dags test medvlm_batch -c '{"manifest": ..., "output": ..., "model": ...,
"mmproj": ..., "options": {"max_tokens": 256}}'``. Put the task on a GPU worker with ``queue``/``pool``.
"""

from __future__ import annotations

from airflow.sdk import DAG

from medvlm.airflow.example_dags.common import MEDVLM_RESULTS, RUN_ARGS, run_params
from medvlm.airflow.operators import MedvlmBatchOperator

with DAG(
    dag_id="medvlm_batch",
    schedule=None,
    params=run_params(),
    render_template_as_native_obj=True,  # options stay a dict
    max_active_runs=1,
    tags=["medvlm"],
    doc_md=__doc__,
):
    MedvlmBatchOperator(task_id="batch", manifest="{{ params.manifest }}", outlets=[MEDVLM_RESULTS], **RUN_ARGS)
