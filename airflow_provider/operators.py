"""medvlm's Airflow operators: a batch run in one task, or a fan-out as plan -> mapped shards -> publish.

Every operator calls the core's run API (``medvlm_core.run.lifecycle``, ``medvlm_core.run.fanout``), so the rules of
a run are the Prefect flows' own. What Airflow adds: its retries (a failed shard is retried as a task; its earlier
attempt's staged rows are removed first), its pools and queues (put the shards on the GPU workers), connections
(``aws_conn_id``) and Assets (each operator's ``outlets`` get an event with the run's counts once it published).

Only small values go into XCom: the shard indexes, the run id and the lease's token (plan), the counts of a shard
and of the run. Document data, prompts and credentials never do. A problem with the run's inputs (options, a
missing model, a busy output) fails the task at once, without retries, with one clear message.

The core is imported when a task runs, not when a DAG file is parsed, so DAG parsing stays fast.
"""

from __future__ import annotations

import ast
import json
from datetime import datetime
from typing import Any, Sequence

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

# The XCom key under which the planning task leaves the run id, shard count and lease token for the others.
RUN_XCOM_KEY = "medvlm_run"
DEFAULT_LEASE_HAND_OVER_S = 6 * 3600.0


def parse_options(options: Any) -> Any:
    """A run's ``options`` as the core takes them: a dict, None, or a JSON (or Python literal) string, which is what
    a template renders to when the DAG does not render native objects.

    Args:
        options: the operator's rendered ``options``.

    Returns:
        A dict (or the value as given when it is not a string).

    Raises:
        AirflowFailException: a string that is neither JSON nor a literal dict.
    """
    if not isinstance(options, str):
        return options
    text = options.strip()
    if text in ("", "None", "null"):
        return None
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError):
            continue
    raise AirflowFailException("options: not a JSON object (give a dict, or a JSON string of one)")


def _templated(value: Any) -> bool:
    text = json.dumps(value, default=str)
    return "{{" in text or "{%" in text


def source_id(context: Any) -> str:
    """The task instance a run (or a step of it) runs in: ``airflow:DAG/RUN/TASK`` (``[N]`` for a mapped one), the
    runs row's ``flow_run_id``.

    Args:
        context: the task's context.

    Returns:
        The id.
    """
    ti = context["ti"]
    map_index = getattr(ti, "map_index", -1)
    suffix = f"[{map_index}]" if map_index is not None and map_index >= 0 else ""
    return f"airflow:{ti.dag_id}/{ti.run_id}/{ti.task_id}{suffix}"


class MedvlmOperator(BaseOperator):
    """What every medvlm operator shares: the model, the output, the options and the credentials.

    Args:
        output_uri: the output folder or ``s3://`` prefix (``output`` in the flows; an operator's ``output`` is its
            XCom result).
        model: the text GGUF (or a .zip bundle of both files).
        mmproj: the vision projector GGUF.
        options: the run's options (``medvlm_core.run.options.RunOptions``'s fields, flat or grouped), checked when
            the DAG is parsed (unless templated) and again before any work.
        aws_conn_id: an Airflow connection of type ``aws`` for S3 (login: access key id, password: secret key;
            extra: ``region_name``, ``endpoint_url``, ``aws_session_token``); empty: the AWS environment.
    """

    template_fields: Sequence[str] = ("output_uri", "model", "mmproj", "options", "aws_conn_id")
    template_fields_renderers = {"options": "json"}
    ui_color = "#d8ecf3"

    def __init__(self, *, output_uri: str, model: str, mmproj: str | None = None, options: Any = None,
                 aws_conn_id: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.output_uri, self.model, self.mmproj, self.options = output_uri, model, mmproj, options
        self.aws_conn_id = aws_conn_id
        if options is not None and not _templated(options):
            self._options()  # a bad option fails the DAG file's parsing, before any run

    # -- helpers for the subclasses ----------------------------------------------------------------
    def _options(self) -> Any:
        from medvlm_core.errors import RunError
        from medvlm_core.run.options import RunOptions

        options = parse_options(self.options)
        try:
            RunOptions.parse(options)
        except RunError as exc:
            raise AirflowFailException(f"{self.task_id}: {exc}") from None
        return options

    def hooks(self, context: Any) -> Any:
        """The core's run hooks for this task: everything runs in the task's process.

        Args:
            context: the task's context.

        Returns:
            ``medvlm_core.run.lifecycle.RunHooks`` naming this task instance as the run's source.
        """
        from medvlm_core.run.lifecycle import RunHooks

        return RunHooks(source_id=source_id(context))

    def start(self, context: Any, run_id: str | None = None) -> Any:
        """Open the run (``medvlm_core.run.lifecycle.start_run``) with this task's credentials.

        Args:
            context: the task's context.
            run_id: the run's id when a planning task made it.

        Returns:
            The run's context.
        """
        from medvlm.airflow.connections import connection_credentials
        from medvlm_core.run.lifecycle import start_run

        return start_run(self.output_uri, self.model, self.mmproj or None, self._options(),
                         credentials=connection_credentials(self.aws_conn_id or None), run_id=run_id,
                         source_id=source_id(context))

    def pull_run(self, context: Any, plan_task_id: str) -> dict[str, Any]:
        """What the planning task left in XCom (run id, shard count, lease token).

        Args:
            context: the task's context.
            plan_task_id: the planning task's id.

        Returns:
            The values.

        Raises:
            AirflowFailException: the planning task left none.
        """
        run = context["ti"].xcom_pull(task_ids=plan_task_id, key=RUN_XCOM_KEY)
        if not run:
            raise AirflowFailException(f"{self.task_id}: task {plan_task_id!r} left no medvlm run in XCom "
                                       f"(key {RUN_XCOM_KEY!r}); is it a MedvlmPlanShardsOperator that succeeded?")
        return run

    def report(self, context: Any, summary: dict[str, Any]) -> dict[str, Any]:
        """Log a published run's counts, attach them to this task's Asset events, and return them for XCom.

        Args:
            context: the task's context.
            summary: the run's summary.

        Returns:
            Its counts (``medvlm_core.run.lifecycle.counts_of``: no document data).
        """
        from medvlm_core.run.lifecycle import counts_of

        counts = counts_of(summary)
        self.log.info("medvlm run %s: %s", counts["run_id"],
                      json.dumps({k: v for k, v in counts.items() if k != "published"}, default=str))
        events = context.get("outlet_events")
        if events is not None and self.outlets:
            extra = {k: counts[k] for k in ("run_id", "output", "pages_ok", "pages_error", "quarantined_rows",
                                            "reconciled") if k in counts}
            for asset in self.outlets:
                events[asset].extra = extra
        return counts


class MedvlmBatchOperator(MedvlmOperator):
    """A whole run in this task: validate the manifest, process every page not done yet, publish.

    Args:
        manifest: the manifest URI (.csv, .jsonl or .parquet).
        **kwargs: ``MedvlmOperator``'s and ``BaseOperator``'s arguments.
    """

    template_fields: Sequence[str] = (*MedvlmOperator.template_fields, "manifest")

    def __init__(self, *, manifest: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.manifest = manifest

    def execute(self, context: Any) -> dict[str, Any]:
        """Run and publish.

        Args:
            context: the task's context.

        Returns:
            The run's counts.
        """
        from medvlm_core.errors import RunError
        from medvlm_core.run.lifecycle import run_batch

        try:
            summary = run_batch(self.log, self.start(context), self.manifest, self.hooks(context))
        except RunError as exc:
            raise AirflowFailException(f"run failed: {exc}") from None
        counts = self.report(context, summary)
        if not summary["reconciled"]:
            raise AirflowFailException(f"run {summary['run_id']} published, but its counts do not reconcile")
        return counts


class MedvlmPlanShardsOperator(MedvlmOperator):
    """A fan-out's first step: take the output's lease, validate the manifest into shard plans, hand the lease on.

    Returns the shard indexes, for ``MedvlmShardOperator.partial(...).expand(shard_index=plan.output)``, and leaves
    the run id, shard count and lease token in XCom (key ``medvlm_run``) for the shards and the publishing task.

    Args:
        manifest: the manifest URI.
        shard_size: manifest rows per shard (each shard loads the model once).
        lease_hand_over_s: how long the output stays leased to this run without a step holding it (the longest
            wait for a GPU slot plus a shard's run); the publishing task takes it back.
        **kwargs: ``MedvlmOperator``'s and ``BaseOperator``'s arguments.
    """

    template_fields: Sequence[str] = (*MedvlmOperator.template_fields, "manifest", "shard_size")

    def __init__(self, *, manifest: str, shard_size: int | str = 256,
                 lease_hand_over_s: float = DEFAULT_LEASE_HAND_OVER_S, **kwargs: Any):
        super().__init__(**kwargs)
        self.manifest, self.shard_size, self.lease_hand_over_s = manifest, shard_size, lease_hand_over_s

    def execute(self, context: Any) -> list[int]:
        """Plan the shards.

        Args:
            context: the task's context.

        Returns:
            The shard indexes.
        """
        from medvlm_core import storage as st
        from medvlm_core.errors import RunError
        from medvlm_core.run.context import hand_over_output, release_output
        from medvlm_core.run.fanout import plan_shards, save_fanout_plan
        from medvlm_core.run.lifecycle import guard_output

        try:
            ctx = self.start(context)
            manifest = st.normalize(self.manifest)
            try:
                guard_output(self.log, ctx)
                plan, count = plan_shards(self.log, ctx, manifest, int(self.shard_size))
                save_fanout_plan(ctx, manifest, plan, count)
                token = hand_over_output(ctx, float(self.lease_hand_over_s))
            finally:
                release_output(ctx)  # only on a failure: a handed-over lease is no longer this process's
        except RunError as exc:
            raise AirflowFailException(f"run failed: {exc}") from None
        context["ti"].xcom_push(key=RUN_XCOM_KEY, value={"run_id": ctx.run_id, "shards": count, "lease": token})
        return list(range(count))


class MedvlmShardOperator(MedvlmOperator):
    """One shard of a fan-out (map it over the planning task's output, on a GPU pool or queue).

    A retry removes what the failed try staged before it runs the shard again, so its rows are published once.

    Args:
        shard_index: the shard (mapped: ``.expand(shard_index=plan.output)``).
        plan_task_id: the planning task's id.
        **kwargs: ``MedvlmOperator``'s and ``BaseOperator``'s arguments.
    """

    template_fields: Sequence[str] = (*MedvlmOperator.template_fields, "shard_index")

    def __init__(self, *, shard_index: int | str, plan_task_id: str = "plan_shards", **kwargs: Any):
        super().__init__(**kwargs)
        self.shard_index, self.plan_task_id = shard_index, plan_task_id

    def execute(self, context: Any) -> dict[str, Any]:
        """Run the shard.

        Args:
            context: the task's context.

        Returns:
            The shard's counts.
        """
        from medvlm_core.errors import RunError
        from medvlm_core.run.accounting import ChunkSummary
        from medvlm_core.run.fanout import run_shard

        run = self.pull_run(context, self.plan_task_id)
        index = int(self.shard_index)
        retry = int(getattr(context["ti"], "try_number", 1) or 1) > 1
        try:
            record = run_shard(self.log, self.start(context, run_id=run["run_id"]), index, self.hooks(context),
                               retry=retry)
        except RunError as exc:
            raise AirflowFailException(f"shard {index} failed: {exc}") from None
        total = ChunkSummary.from_json(record.summary)
        return {"shard_index": index, "pages_ok": total.pages_ok, "pages_error": total.pages_error,
                "pages_skipped": total.pages_skipped}


class MedvlmPublishShardsOperator(MedvlmOperator):
    """A fan-out's last step: take the output's lease back and publish every shard as one run. Shards that failed
    for good become ``task_failed`` error rows (no row is lost), and the task then fails naming them.

    Runs when every shard is done, whether it succeeded or not (``trigger_rule="all_done"`` by default).

    Args:
        plan_task_id: the planning task's id.
        shard_task_id: the shard task's id (named in the error rows of failed shards).
        **kwargs: ``MedvlmOperator``'s and ``BaseOperator``'s arguments.
    """

    def __init__(self, *, plan_task_id: str = "plan_shards", shard_task_id: str = "shard", **kwargs: Any):
        kwargs.setdefault("trigger_rule", "all_done")
        super().__init__(**kwargs)
        self.plan_task_id, self.shard_task_id = plan_task_id, shard_task_id

    def execute(self, context: Any) -> dict[str, Any]:
        """Publish the run.

        Args:
            context: the task's context.

        Returns:
            The run's counts.
        """
        from medvlm_core.errors import RunError
        from medvlm_core.run.context import hand_over_output, take_back_output
        from medvlm_core.run.fanout import failed_message, load_fanout_plan, publish_shards

        run = self.pull_run(context, self.plan_task_id)
        try:
            ctx = self.start(context, run_id=run["run_id"])
            record, plan = load_fanout_plan(ctx)
            ctx.started = datetime.fromisoformat(record.started_at)
            take_back_output(ctx, run["lease"])
            try:
                summary = publish_shards(
                    self.log, ctx, record.manifest, plan, record.shards, {}, self.hooks(context),
                    audit={"orchestrator": "airflow"},
                    otherwise=f"without leaving its record (task {self.shard_task_id} failed; see its log)")
            except BaseException:
                if ctx.lease is not None:  # not published: keep the lease for this task's retry
                    hand_over_output(ctx, DEFAULT_LEASE_HAND_OVER_S)
                raise
        except RunError as exc:
            raise AirflowFailException(f"run {run['run_id']} failed: {exc}") from None
        counts = self.report(context, summary)
        message = failed_message(summary, {}, otherwise=f"its task {self.shard_task_id} failed")
        if message:
            raise AirflowFailException(message)
        if not summary["reconciled"]:
            raise AirflowFailException(f"run {summary['run_id']} published, but its counts do not reconcile")
        return counts
