"""The ``medvlm-eval`` flow: score an output's answers against a gold file (``medvlm eval`` runs it in-process).

It writes ``<output>/evals/`` (every score), ``<output>/review/`` (the items a person should check) and the HTML
report ``<output>/reports/eval/eval-<eval_id>.html``, and shows the headline table as a markdown artifact
(scores only: no document text, item values or patient ids).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed

from medvlm.tasks.credentials import build_storage
from medvlm_core import storage as st
from medvlm_core.errors import RunError
from medvlm_core.evals import EvalOptions, evaluate, headline_markdown, write_evaluation
from medvlm_core.evals.report import render_report
from medvlm_core.run.options import RunOptions
from medvlm_core.settings import Settings


@flow(name="medvlm-eval", log_prints=False, validate_parameters=False)
def medvlm_eval(output: str, gold: str, run_ids: list[str] | None = None, options: RunOptions | None = None,
                eval_options: EvalOptions | None = None) -> Any:
    """Score ``output``'s answers against the labelled items in ``gold`` and write the evaluation into ``output``.

    Args:
        output: the output folder or ``s3://`` prefix of medvlm runs.
        gold: the gold file (CSV, JSONL or Parquet; docs/accuracy.md).
        run_ids: the runs to score side by side, the first as the baseline; None: the output's current answers.
        options: run options; only the storage ones are used (credentials block, S3 endpoint).
        eval_options: matching thresholds, bootstrap, review target (``medvlm_core.evals.EvalOptions``).

    Returns:
        The evaluation's id, what it wrote, its headline rows and review counts; or a Failed state naming the
        problem (a bad gold row, an unknown run).
    """
    logger = get_run_logger()
    try:
        storage = build_storage(RunOptions.parse(options).storage, Settings())
        output = st.normalize(output)
        evaluation = evaluate(output, gold, storage, run_ids=list(run_ids or []) or None, options=eval_options)
        written = write_evaluation(evaluation, storage, render_report(evaluation))
    except RunError as exc:
        logger.error("eval failed: %s", exc)
        return Failed(message=str(exc))
    for note in evaluation.notes:
        logger.warning("eval: %s", note)
    logger.info("eval %s: %d runs scored on %d labelled pages; %d review rows; report at %s", evaluation.eval_id,
                len(evaluation.systems), len(evaluation.gold.pages), len(evaluation.review_rows), written["report"])
    try:
        create_markdown_artifact(markdown=headline_markdown(evaluation) + f"\n\nReport: `{written['report']}`",
                                 key="medvlm-eval", description=f"medvlm eval {evaluation.eval_id}")
    except Exception:  # an artifact is a convenience
        pass
    review: dict[str, int] = {}
    for row in evaluation.review_rows:
        review[row["system"]] = review.get(row["system"], 0) + 1
    return {"eval_id": evaluation.eval_id, "written": written, "headline": evaluation.headline(),
            "comparisons": evaluation.comparisons, "review_rows": review, "notes": evaluation.notes}
