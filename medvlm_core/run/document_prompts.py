"""What a whole document is asked, and its result key (document scope, ``run/documents.py``).

* ``document_prompt``: the run's prompt for all of a document's pages at once (single_prompt). Structured
  prompts also ask for each item's evidence pages (``structured.with_page_evidence``).
* ``reduce_prompt``: the text-only consolidation of page answers (map_reduce), and of partial consolidations
  when a long document's page answers do not fit one prompt (a reduce tree).
* ``document_key``: the document answer's ``result_key``: its file's sha256 (so every page's pixels), the
  pages asked, the model, the prompt, the parameters, the scope and what decides the method. A changed page or
  prompt gives a new key; a rerun finds the key done and skips the document.
"""

from __future__ import annotations

import json

from medvlm_core.inputs.manifest import ManifestRow
from medvlm_core.inputs.prompts import Prompt
from medvlm_core.output.results import result_key
from medvlm_core.output.structured import with_page_evidence
from medvlm_core.run.spec import RunSpec

_PAGES_IN_ORDER = "The images are the pages of one clinical document, in page order (page 1 first).\n\n"
_EVIDENCE = ("\n\nFor every item, give in `pages` the page numbers (1 = the first page) where its evidence is; "
             "list an item once even when several pages mention it.")


def document_prompt(prompt: Prompt) -> Prompt:
    """The prompt that asks a document's pages, all in one prompt.

    Args:
        prompt: the run's (or the row's) prompt for a page.

    Returns:
        The same question about the whole document (its schema with each item's evidence pages).
    """
    if prompt.schema is None:
        return Prompt(prompt.prompt_id, _PAGES_IN_ORDER + prompt.text, None, prompt.system)
    return Prompt(prompt.prompt_id, _PAGES_IN_ORDER + prompt.text + _EVIDENCE, with_page_evidence(prompt.schema),
                  prompt.system)


def reduce_prompt(prompt: Prompt, parts: list[tuple[str, str]], pages: int) -> Prompt:
    """The text-only prompt that consolidates answers about parts of a document into one.

    Args:
        prompt: the question each page was asked.
        parts: (label such as ``Page 3`` or ``Pages 1-6``, its answer), in page order.
        pages: the pages of the whole document.

    Returns:
        The consolidation prompt (structured prompts: the same schema, with each item's evidence pages).
    """
    answers = "\n\n".join(f"{label}:\n{text.strip()}" for label, text in parts)
    text = (
        f"Below are answers about the parts of one clinical document of {pages} pages. Each answered this request "
        f"about its part alone:\n\"\"\"\n{prompt.text}\n\"\"\"\n\n{answers}\n\n"
        "Answer the request for the whole document in one answer: merge what repeats across the parts, keep what "
        "each part says, and reason across them (what one page says may explain another)."
    )
    if prompt.schema is None:
        return Prompt(prompt.prompt_id, text, None, prompt.system)
    return Prompt(prompt.prompt_id, text + _EVIDENCE, with_page_evidence(prompt.schema), prompt.system)


def document_key(spec: RunSpec, row: ManifestRow, prompt: Prompt, file_sha256: str, pages: list[int] | None) -> str:
    """The result key of a document answer.

    Args:
        spec: the run.
        row: the document's (first) manifest row.
        prompt: the question asked of each page (the run's or the row's).
        file_sha256: the document file's sha256.
        pages: the pages the manifest rows name, or None for every page.

    Returns:
        The key.
    """
    scoped = json.dumps({
        "scope": "document", "pages": pages, "method": spec.documents.document_method,
        "max_document_pages": spec.documents.max_document_pages, "n_ctx": spec.engine.n_ctx,
        "image_min_tokens": spec.engine.image_min_tokens,
    }, sort_keys=True, separators=(",", ":"))
    return result_key(row.document_id, file_sha256, None, spec.model.model_sha256, spec.model.mmproj_sha256,
                      prompt.sha256, spec.params_json + "\x1e" + scoped)
