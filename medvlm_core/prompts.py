"""The prompt library: named prompts with stable ids, and the hash that identifies a prompt's text.

The default ``clinical_analysis`` follows the three steps of the MedicalVisionLLM model card: primary
diagnoses, prescribed medications with the clinical reasoning for each, and conditional instructions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from medvlm_core.errors import RunError

DEFAULT_PROMPT_ID = "clinical_analysis"
CUSTOM_PROMPT_ID = "custom"

PROMPTS: dict[str, str] = {
    "clinical_analysis": (
        "You are a clinical documentation specialist. Read this medical document image carefully and:\n"
        "1. Identify the primary diagnoses.\n"
        "2. List all prescribed medications (name, dose, route, frequency) and explain the clinical "
        "reasoning for each one for this patient.\n"
        "3. Note any conditional instructions (for example 'only if ...', 'if symptoms persist ...') "
        "and follow-up intervals.\n"
        "Answer only from what the document shows; write 'not stated' where information is missing."
    ),
    "transcribe": (
        "Transcribe all text in this medical document image exactly as written, preserving the reading "
        "order, headings, lists and tables (as markdown). Do not add anything that is not on the page."
    ),
    "medications": (
        "List every medication on this medical document as a markdown table with the columns: "
        "name, dose, unit, route, frequency, reason. Write 'not stated' for missing values."
    ),
    "document_type": (
        "Classify this medical document. Answer with exactly one of: discharge_summary, prescription, "
        "lab_report, referral, radiology_report, insurance_form, other."
    ),
}


@dataclass(frozen=True)
class Prompt:
    """A resolved prompt: its id (``custom`` for free text), its text and the sha256 of the text."""

    prompt_id: str
    text: str

    @property
    def sha256(self) -> str:
        """Hex sha256 of the UTF-8 prompt text: identifies the exact prompt in result rows."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def known_prompt_ids() -> list[str]:
    """Ids of the built-in prompts, sorted."""
    return sorted(PROMPTS)


def get_prompt(prompt_id: str | None = None, text: str | None = None) -> Prompt:
    """The prompt for an id, or free ``text`` (which wins, and keeps the id if one is given).

    Raises RunError naming the id if it is unknown.
    """
    if text is not None and text.strip():
        return Prompt(prompt_id or CUSTOM_PROMPT_ID, text)
    pid = prompt_id or DEFAULT_PROMPT_ID
    if pid not in PROMPTS:
        raise RunError(f"unknown prompt id {pid!r}; known ids: {', '.join(known_prompt_ids())}")
    return Prompt(pid, PROMPTS[pid])
