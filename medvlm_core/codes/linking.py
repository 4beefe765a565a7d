"""The linking stage: the rows of the ``diagnoses`` and ``medications`` tables get their codes.

A run links each chunk's structured rows before it stages them (``link_structured``, called by
``run.chunks.stage_structured``); ``medvlm codes link`` links an existing output's current rows again
(``relink``). Per diagnosis (``link_diagnosis``):

* the model's own code (``icd10cm_code`` in the answer, prompt ``clinical_extraction_coded``) is kept as written
  in ``icd10cm_model_code`` and checked: when it is in the code set it is the chosen code (``icd10cm_source =
  model``); otherwise ``icd10cm_model_code_valid`` is false and the search's best candidate is chosen instead. An
  invented code is never the chosen code;
* the search ranks candidates for the diagnosis' name (``icd10cm.CodeSet.search``); they go to the
  ``diagnosis_codes`` table, ranked, and the best one, made billable when it is a category with billable
  children (``billable_choice``), is the chosen code when the model gave none that exists.

Per medication (``link_medication``): the generic name and ids (``drugs``), the dose, strength, frequency, route and
duration as numbers and canonical words (``doses``). Every linked row records the release it was linked with.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from medvlm_core.codes import doses
from medvlm_core.output.code_tables import DIAGNOSIS_CODES, LINKED_COLUMNS

log = logging.getLogger("medvlm.codes")

TOP = 5
_EMPTY = frozenset({"", "not stated", "none", "n/a", "na", "unknown", "null", "not applicable"})
_KEYS = ("run_id", "result_key", "document_id", "page", "patient_id", "encounter_id", "item_index")


def _given(value: Any) -> str | None:
    text = "" if value is None else str(value).strip()
    return None if text.lower() in _EMPTY else text


def link_diagnosis(item: dict[str, Any], model_code: Any = None, top: int = TOP) -> tuple[dict[str, Any], list[dict]]:
    """The code columns of one diagnosis, and its ranked candidates.

    Args:
        item: the diagnosis row (its ``name`` is searched).
        model_code: the code the model wrote for it, if any.
        top: candidates kept.

    Returns:
        ``(columns, candidates)``: the ``DIAGNOSIS_CODE_COLUMNS`` values, and the candidates as dicts with rank,
        code, description, score, billable and chosen (keys of the item and of the linking not included).
    """
    from medvlm_core.codes.icd10cm import code_set

    codes = code_set()
    name = _given(item.get("name")) or ""
    found = codes.search(name, top) if name else []
    columns: dict[str, Any] = {"icd10cm_model_code": _given(model_code), "icd10cm_model_code_valid": None,
                               "code_set_release": codes.release}
    chosen = None
    if columns["icd10cm_model_code"]:
        check = codes.check(columns["icd10cm_model_code"])
        columns["icd10cm_model_code_valid"] = check.valid
        if check.valid:
            score = next((c.score for c in found if c.code == check.normalized), None)
            chosen = (check.normalized, check.description, codes.code_score(check.normalized, name) if score is None
                      else score, "model", check.billable)
    if chosen is None and found:
        best = codes.billable_choice(found[0], name)
        chosen = (best.code, best.description, best.score, "search", best.billable)
    if chosen is not None:
        code, description, score, source, billable = chosen
        columns.update(icd10cm_code=code, icd10cm_description=description, icd10cm_score=score,
                       icd10cm_source=source, icd10cm_billable=billable, icd10cm_category=code[:3],
                       icd10cm_chapter=codes.chapter(code))
    candidates = [{"query": name, "rank": rank, "code": c.code, "description": c.description, "score": c.score,
                   "billable": c.billable, "chosen": chosen is not None and c.code == chosen[0]}
                  for rank, c in enumerate(found, start=1)]
    return columns, candidates


def link_medication(item: dict[str, Any]) -> dict[str, Any]:
    """The drug columns of one medication.

    Args:
        item: the medication row (name, dose, unit, route, frequency; strength, form, duration when the prompt
            asked for them).

    Returns:
        The ``MEDICATION_CODE_COLUMNS`` values.
    """
    from medvlm_core.codes.drugs import drug_dictionary

    dictionary = drug_dictionary()
    name = _given(item.get("name"))
    match = dictionary.lookup(name) if name else None
    dose = doses.parse_amount(_given(item.get("dose")) or "", _given(item.get("unit")))
    strength = doses.parse_amount(_given(item.get("strength")) or "") or doses.parse_amount(name or "")
    frequency = doses.parse_frequency(_given(item.get("frequency")) or "")
    duration = doses.parse_duration(_given(item.get("duration")) or "")
    if duration is None:
        duration = doses.parse_duration(_given(item.get("frequency")) or "")
    return {
        "generic_name": match.generic_name if match else None,
        "drugbank_id": match.drugbank_id if match else None, "mesh_id": match.mesh_id if match else None,
        "drug_score": match.score if match else None, "drug_match": match.match if match else None,
        "dose_value": dose.value if dose else None, "dose_max": dose.value_max if dose else None,
        "dose_unit": dose.unit if dose else None,
        "strength_value": strength.value if strength and strength.unit else None,
        "strength_unit": strength.unit if strength and strength.unit else None,
        "frequency_per_day": frequency.per_day, "prn": frequency.prn,
        "route_normalized": doses.normalize_route(_given(item.get("route")) or ""),
        "duration_days": duration, "code_set_release": dictionary.release,
    }


def link_rows(table: str, rows: list[dict[str, Any]], link_id: str, linked_at: datetime) -> list[dict[str, Any]]:
    """Link a clinical table's rows in place (their code columns filled); the diagnoses' candidates as rows.

    Args:
        table: ``diagnoses`` or ``medications`` (any other table is left alone).
        rows: the table's rows (dicts with the item keys and fields); a diagnosis' ``icd10cm_code`` is read as the
            model's code and replaced by the chosen one.
        link_id: the linking's id (the run's id at run time).
        linked_at: when it ran.

    Returns:
        The ``diagnosis_codes`` rows (empty for medications).
    """
    candidates: list[dict[str, Any]] = []
    for row in rows:
        if table == "diagnoses":
            columns, found = link_diagnosis(row, row.get("icd10cm_code"))
            row.update({c.name: None for c in LINKED_COLUMNS[table]}, **columns)
            keys = {k: row.get(k) for k in _KEYS}
            candidates += [dict(keys, link_id=link_id, linked_at=linked_at,
                                code_set_release=columns["code_set_release"], **c) for c in found]
        elif table == "medications":
            row.update(link_medication(row))
    return candidates


def link_structured(tables: dict[str, tuple[list[dict], Any]], link_id: str, linked_at: datetime | None = None) -> None:
    """The run's linking stage: a chunk's clinical rows get their code columns, and ``diagnosis_codes`` is added.

    Linking never costs an answer: if it fails (a bug, a code set that will not load) the rows keep null code
    columns, a warning is logged, and ``medvlm codes link`` can link them later.

    Args:
        tables: table name -> (rows, Arrow schema), as ``run.chunks.structured_tables`` gives them; changed in place.
        link_id: the run's id.
        linked_at: when (default: now).
    """
    if "diagnoses" not in tables and "medications" not in tables:
        return
    from medvlm_core.output.results import utc_now

    linked_at = linked_at or utc_now()
    candidates: list[dict[str, Any]] = []
    for table in ("diagnoses", "medications"):
        rows = tables.get(table, ([], None))[0]
        try:
            candidates += link_rows(table, rows, link_id, linked_at)
        except Exception as exc:  # noqa: BLE001 - see the docstring: the answers are written unlinked
            log.warning("code linking of %s failed (%s); the rows are written without codes: "
                        "run `medvlm codes link` to link them", table, type(exc).__name__)
            for row in rows:
                model_code = row["icd10cm_model_code"] if "icd10cm_model_code" in row else row.get("icd10cm_code")
                row.update({c.name: None for c in LINKED_COLUMNS[table]})
                if table == "diagnoses":  # the model's unchecked code never passes for a checked one
                    row["icd10cm_model_code"] = _given(model_code)
    if candidates:  # (a chunk without diagnoses stages no diagnosis_codes file)
        tables[DIAGNOSIS_CODES.name] = (candidates, DIAGNOSIS_CODES.arrow_schema())
