"""Result rows: the prompt a manifest row is asked, the result key of each page, and the row a page ends as (an
answer, an error, a truncated or skipped page), with the structured items it carries to the extraction tables.

``page_key`` is where a row gets its ``result_key`` (``output/results.result_key`` over the run's model, prompt
and parameters): the same document page through the same model, prompt and parameters always has the same key.
"""

from __future__ import annotations

import json
from typing import Any

from medvlm_core import errors
from medvlm_core.engine.types import Generation
from medvlm_core.errors import DocumentError, RunError
from medvlm_core.inputs.manifest import ManifestRow
from medvlm_core.inputs.prompts import Prompt, get_prompt
from medvlm_core.output import status as row_status
from medvlm_core.output.results import result_key, utc_now
from medvlm_core.output.structured import document_items, flatten, item_confidences
from medvlm_core.run.accounting import COVERED_ROWS
from medvlm_core.run.spec import PageWork, RunSpec


def row_prompt(row: ManifestRow, default: Prompt, system: str | None = None) -> Prompt:
    """The prompt for a row: its own text, else its prompt id, else the run's prompt.

    Args:
        row: the manifest row.
        default: the run's prompt.
        system: the run's system prompt, for a row prompt whose library entry brings none.

    Returns:
        The prompt.

    Raises:
        RunError: the row names an unknown prompt id.
    """
    if row.prompt or row.prompt_id:
        return get_prompt(row.prompt_id, row.prompt, system)
    return default


def page_key(spec: RunSpec, row: ManifestRow, prompt: Prompt, image_sha256: str | None, page: int | None) -> str:
    """The result key of one page of one row under this run's model and parameters."""
    return result_key(
        row.document_id, image_sha256, page, spec.model.model_sha256, spec.model.mmproj_sha256, prompt.sha256,
        spec.params_json,
    )


def base_row(work: PageWork, spec: RunSpec, prompt: Prompt) -> dict[str, Any]:
    """The columns every result row has, ok or error."""
    row = work.row
    image = work.image if work.image is not None and work.image.image is not None else None
    return {
        "run_id": spec.run_id,
        "result_key": page_key(spec, row, prompt, work.image_sha256, work.page),
        "document_id": row.document_id,
        "page": work.page,
        "page_count": work.page_count,
        "manifest_row": row.row_number,
        "image_uri": row.image_uri,
        "image_sha256": work.image_sha256,
        "image_format": image.source_format if image else None,
        "image_width": image.image.width if image else None,
        "image_height": image.image.height if image else None,
        "patient_id": row.patient_id,
        "encounter_id": row.encounter_id,
        "prompt_id": prompt.prompt_id,
        "prompt_sha256": prompt.sha256,
        "model_name": spec.model.model_name,
        "model_sha256": spec.model.model_sha256,
        "mmproj_sha256": spec.model.mmproj_sha256,
        "chat_format": spec.model.chat_format,
        "params_json": spec.params_json,
        "fetch_ms": work.fetch_ms,
        "preprocess_ms": work.preprocess_ms,
        "created_at": utc_now(),
        "scope": "page",
    }


def error_row(work: PageWork, spec: RunSpec, prompt: Prompt, error: DocumentError) -> dict[str, Any]:
    """A result row recording why this page (or document) produced no completion."""
    row = base_row(work, spec, prompt)
    row.update(status=row_status.ERROR, error_type=error.error_type, error_message=error.message)
    return row


def add_structured(out: dict[str, Any], prompt: Prompt, result: Generation,
                   pages: list[int] | None = None) -> None:
    """Parse a constrained answer into ``out[STRUCTURED_ROWS]`` (table -> rows), or mark it truncated/invalid.

    Args:
        out: the result row (its ``completion`` and keys).
        prompt: the prompt with its JSON schema.
        result: the engine's answer (for the items' confidences).
        pages: at document scope, the document's pages: each item's ``pages`` evidence is kept within them and
            items repeated across pages are kept once (``structured.document_items``).
    """
    if out["finish_reason"] == "length":
        # Cut off at max_tokens: the JSON is incomplete, so no partial rows reach the tables.
        out["status"] = row_status.TRUNCATED
        return
    try:
        answer = json.loads(out["completion"])
        if not isinstance(answer, dict):
            raise ValueError("not a JSON object")
        confidence = item_confidences(result.text, result.token_logprobs, result.token_offsets)
    except ValueError:
        out.update(status=row_status.ERROR, error_type=errors.INVALID_OUTPUT,
                   error_message=f"{out['image_uri']}: the model's answer is not the JSON the schema asks for")
        return
    keys = {k: out[k] for k in ("run_id", "result_key", "document_id", "page", "patient_id", "encounter_id")}
    if pages is not None:
        answer, confidence = document_items(answer, pages, confidence)
    out[STRUCTURED_ROWS] = flatten(prompt.prompt_id, prompt.schema, answer, keys, confidence)


# The key of a result row that carries its structured tables' rows (``add_structured``) to ``chunks``: not a
# column of the completions table, so it is taken out before the row is written (``completion_columns``).
STRUCTURED_ROWS = "structured"


def completion_columns(row: dict[str, Any]) -> dict[str, Any]:
    """A result row as the completions table's columns: without the structured rows it carries, nor the
    manifest rows a document-scope answer covers (``accounting.COVERED_ROWS``).

    Args:
        row: a result row.

    Returns:
        The row without ``STRUCTURED_ROWS`` and ``COVERED_ROWS``.
    """
    return {k: v for k, v in row.items() if k not in (STRUCTURED_ROWS, COVERED_ROWS)}


def safe_prompt(row: ManifestRow, default: Prompt) -> tuple[Prompt, DocumentError | None]:
    """``row_prompt``, or the run's prompt and the error a row's unknown prompt id is (its rows become errors)."""
    try:
        return row_prompt(row, default, default.system), None
    except RunError as exc:
        return default, DocumentError(errors.INVALID_ROW, str(exc))


def result_row(work: PageWork, spec: RunSpec, prompt: Prompt, result: Generation | DocumentError | None) -> dict[str, Any]:
    """The row for one page: skipped, error, or the engine's answer (``result``).

    Args:
        work: the page.
        spec: the run.
        prompt: the prompt it was asked.
        result: the engine's answer or error (None for a page that never reached the engine).

    Returns:
        The result row (the completions table's columns, plus ``STRUCTURED_ROWS`` in structured mode).
    """
    if work.skipped:
        out = base_row(work, spec, prompt)
        out.update(status=row_status.SKIPPED)
    elif work.error is not None:
        out = error_row(work, spec, prompt, work.error)
    elif isinstance(result, DocumentError):
        out = error_row(work, spec, prompt, result)
    else:
        out = base_row(work, spec, prompt)
        out.update(answer_columns(result))
        if prompt.schema is not None:
            add_structured(out, prompt, result)
    work.image = None  # free the pixels before the next page
    return out


def answer_columns(result: Generation) -> dict[str, Any]:
    """The columns an answer fills: ok status, the completion, its tokens, timing, reasoning and confidence.

    Args:
        result: the engine's answer.

    Returns:
        Column -> value.
    """
    return dict(
        status=row_status.OK,
        completion=result.text,
        finish_reason=result.finish_reason,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        latency_ms=result.latency_ms,
        reasoning=result.reasoning,
        reasoning_tokens=result.reasoning_tokens,
        reasoning_budget_hit=result.reasoning_budget_hit,
        mean_logprob=result.mean_logprob,
        min_logprob=result.min_logprob,
        top_logprobs=json.dumps(result.top_logprobs, separators=(",", ":")) if result.top_logprobs else None,
    )
