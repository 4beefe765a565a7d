"""The prompt library: named prompts with stable ids, and the hash that identifies a prompt's text.

The default ``clinical_analysis`` follows the three steps of the MedicalVisionLLM model card: primary
diagnoses, prescribed medications with the clinical reasoning for each, and conditional instructions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

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
    "clinical_extraction": (
        "You are a clinical documentation specialist. Read this medical document image and extract, as JSON: "
        "the primary diagnoses with the evidence for each from the document; every prescribed medication with "
        "its dose, unit, route, frequency and the clinical reasoning for this patient, marking conditional "
        "medications (for example 'only if the ulcer fails to heal') with their condition; and the critical "
        "instructions, marking conditional ones with their condition and giving follow-up intervals when "
        "stated. Use 'not stated' for missing values."
    ),
    # clinical_extraction with codes, traits and medication attributes (docs/codes.md); its own id, so that
    # clinical_extraction's text and schema, and so the result keys of its answers, stay as they were.
    "clinical_extraction_coded": (
        "You are a clinical documentation specialist. Read this medical document image and extract, as JSON: "
        "the primary diagnoses with the evidence for each from the document and, when you know it, its ICD-10-CM "
        "code; mark a diagnosis negated when the document rules it out, historical when it is a past condition, "
        "family_history when it is a relative's, and hypothetical when it is only a possibility to consider. "
        "Extract every prescribed medication with its dose, unit, route, frequency, strength, dosage form, "
        "duration and the clinical reasoning for this patient, marking conditional medications (for example "
        "'only if the ulcer fails to heal') with their condition; and the critical instructions, marking "
        "conditional ones with their condition and giving follow-up intervals when stated. Use 'not stated' for "
        "missing values."
    ),
    "document_type": (
        "Classify this medical document. Answer with exactly one of: discharge_summary, prescription, "
        "lab_report, referral, radiology_report, insurance_form, other."
    ),
}


# Prompts whose answers are JSON constrained by a schema (structured mode); see medvlm_core.output.structured.
SCHEMAS: dict[str, dict[str, Any]] = {}
# Library prompts that bring their own system prompt (a run's --system-prompt applies to the others).
SYSTEM_PROMPTS: dict[str, str] = {}


def _builtin_schemas() -> None:
    from medvlm_core.output.structured import CLINICAL_CODED_SCHEMA, CLINICAL_SCHEMA

    SCHEMAS["clinical_extraction"] = CLINICAL_SCHEMA
    SCHEMAS["clinical_extraction_coded"] = CLINICAL_CODED_SCHEMA


@dataclass(frozen=True)
class Prompt:
    """A resolved prompt: its id (``custom`` for free text), its text, its JSON schema if structured, and the
    system prompt it is sent with (None: the chat format's default)."""

    prompt_id: str
    text: str
    schema: dict[str, Any] | None = field(default=None, compare=False)
    system: str | None = None

    @property
    def sha256(self) -> str:
        """Hex sha256 of the prompt text (and schema, when structured; and system prompt, when set): identifies
        the exact request."""
        payload = self.text if self.schema is None else self.text + "\x1f" + json.dumps(self.schema, sort_keys=True)
        if self.system:
            payload += "\x1esystem\x1f" + self.system
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def known_prompt_ids() -> list[str]:
    """Ids of the library's prompts (built-in and registered extractions), sorted."""
    return sorted(PROMPTS)


def register_extraction(prompt_id: str, text: str, schema: dict[str, Any], system: str | None = None) -> None:
    """Add a user-defined structured prompt to the library for this process.

    Args:
        prompt_id: its id (also the name of its table).
        text: the prompt.
        schema: the JSON schema its answers follow.
        system: its own system prompt, if any.

    Raises:
        RunError: the id is a built-in prompt's.
    """
    if prompt_id in PROMPTS and SCHEMAS.get(prompt_id) != schema and prompt_id in _BUILTIN_IDS:
        raise RunError(f"prompt id {prompt_id!r} is built in; choose another id for the extraction")
    PROMPTS[prompt_id] = text
    SCHEMAS[prompt_id] = schema
    if system:
        SYSTEM_PROMPTS[prompt_id] = system


def get_prompt(prompt_id: str | None = None, text: str | None = None, system: str | None = None) -> Prompt:
    """The prompt for an id, or free ``text`` (which wins, and keeps the id if one is given).

    Args:
        prompt_id: a library id (default ``clinical_analysis``).
        text: free prompt text.
        system: the run's system prompt, for prompts whose library entry brings none.

    Returns:
        The prompt.

    Raises:
        RunError: naming the id if it is unknown.
    """
    system = SYSTEM_PROMPTS.get(prompt_id or "") or (system if system and system.strip() else None)
    if text is not None and text.strip():
        return Prompt(prompt_id or CUSTOM_PROMPT_ID, text, SCHEMAS.get(prompt_id or ""), system)
    pid = prompt_id or DEFAULT_PROMPT_ID
    if pid not in PROMPTS:
        raise RunError(f"unknown prompt id {pid!r}; known ids: {', '.join(known_prompt_ids())}")
    return Prompt(pid, PROMPTS[pid], SCHEMAS.get(pid), SYSTEM_PROMPTS.get(pid) or system)


_builtin_schemas()
_BUILTIN_IDS = frozenset(PROMPTS)
