"""A hand-built output for the review workbench's unit tests, written through the output tables' definitions.

Run ``r1`` (T0): ``d1`` asked the vitals extraction (two items, one sure, one doubtful), ``d2`` the clinical
extraction (a medication with a dose that is no number, a doubtful one, a sure diagnosis), ``d3`` a page whose answer
is an error, ``d4`` a document that could not be opened (no page), ``d5`` a vitals item without a confidence,
``d6`` one page asked both prompts. Every page's image is a real PNG.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from PIL import Image

from conftest import completion_row
from medvlm_core.analytics import connect
from medvlm_core.output import results
from medvlm_core.output.structured import CLINICAL_SCHEMA, tables_for
from medvlm_core.output.tables import RUNS
from medvlm_core.review.corrections import write_corrections
from medvlm_core.review.pages import load_page
from medvlm_core.review.submit import submission_rows
from medvlm_core.storage import Storage

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=timezone.utc)
VITALS_SCHEMA = {"type": "object", "properties": {"vitals": {"type": "array", "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "value": {"type": "string"}}}}}}
STORAGE = Storage()


def key(*parts) -> str:
    """A result key (sha256 hex) from any parts."""
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def _med(name, dose, unit="mg", route="PO", frequency="daily", conditional=False, confidence=None, reasoning=""):
    return dict(name=name, dose=dose, unit=unit, route=route, frequency=frequency, reasoning=reasoning,
                conditional=conditional, condition="", confidence=confidence)


PAGES = [  # document, prompt, status, items by table
    ("d1", "vitals", "ok", {"vitals": [dict(name="BP", value="120/80", confidence=0.95),
                                       dict(name="HR", value="72", confidence=0.2)]}),
    ("d2", "clinical_extraction", "ok", {
        "medications": [_med("Metformin", "abc", confidence=0.99, reasoning="the model's why"),
                        _med("Lisinopril", "10", confidence=0.4)],
        "diagnoses": [dict(name="Hypertension", evidence="BP high", confidence=0.97)]}),
    ("d3", "clinical_extraction", "error", {}),
    ("d4", "clinical_extraction", "error", {}),
    ("d5", "vitals", "ok", {"vitals": [dict(name="T", value="37.1", confidence=None)]}),
    ("d6", "clinical_extraction", "ok", {"diagnoses": [dict(name="Asthma", evidence="", confidence=0.99)]}),
    ("d6", "vitals", "ok", {"vitals": [dict(name="RR", value="16", confidence=0.99)]}),
]


def build_output(root: Path, run_id: str = "r1", at: datetime = T0, only: set[str] | None = None,
                 model: str = "m1") -> Path:
    """Publish run ``run_id`` into ``root / "out"`` (documents ``only``, default all) and its images and manifest.

    Returns:
        The output folder.
    """
    out = root / "out"
    docs = root / "documents"
    docs.mkdir(parents=True, exist_ok=True)
    manifest = root / "manifest.csv"
    manifest.write_text("document_id,image_uri,document_type\n" + "".join(
        f"{d},{docs / d}.png,{'lab_report' if d in ('d1', 'd3') else 'discharge_summary'}\n"
        for d in sorted({p[0] for p in PAGES})))
    day = f"{at:%Y-%m-%d}"
    completions, tables = [], {}
    schemas = dict(tables_for("clinical_extraction", CLINICAL_SCHEMA), **tables_for("vitals", VITALS_SCHEMA))
    for n, (document, prompt, status, items) in enumerate(PAGES, 1):
        if only is not None and document not in only:
            continue
        image = docs / f"{document}.png"
        if not image.exists():
            Image.new("RGB", (400, 520), (250, 250, 250)).save(image)
        page = None if document == "d4" else 1
        k = key(run_id, document, prompt, model)
        completions.append(completion_row(
            run_id=run_id, result_key=k, document_id=document, page=page, manifest_row=n, prompt_id=prompt,
            image_uri=str(image), patient_id=f"P-{document}", encounter_id="E-1", status=status,
            completion=None if status == "error" else json.dumps({}), model_name=model,
            error_type="read_failed" if status == "error" else None,
            error_message="failed" if status == "error" else None, created_at=at + timedelta(seconds=n)))
        for table in schemas if prompt == "clinical_extraction" else ["vitals"]:
            for index, item in enumerate(items.get(table, [])):
                tables.setdefault(table, []).append(dict(
                    item, run_id=run_id, result_key=k, document_id=document, page=page, patient_id=f"P-{document}",
                    encounter_id="E-1", item_index=index, **({"section": "vitals"} if table == "vitals" else {})))
    part = f"part-{run_id}.parquet"
    results.write_rows(STORAGE, str(out / "completions" / f"run_date={day}" / part), "completions", completions)
    results.write_parquet(STORAGE, str(out / "runs" / f"run_date={day}" / f"run-{run_id}.parquet"), RUNS.rows_to_arrow(
        [{"run_id": run_id, "manifest_uri": str(manifest), "started_at": at}]))
    for table, (_, schema) in schemas.items():
        results.write_rows(STORAGE, str(out / table / f"run_date={day}" / part), table, tables.get(table, []), schema)
    return out


def submit(out: Path, document: str, prompt: str, reviewer: str, actions: list[dict], minutes: float,
           run_id: str = "r1", model: str = "m1") -> list[dict]:
    """Submit as the app does: the page read now, the rows built, one file written; the rows."""
    con = connect(str(out), STORAGE, current=False)
    try:
        page = load_page(con, key(run_id, document, prompt, model))
    finally:
        con.close()
    now = T0 + timedelta(minutes=minutes)
    rows = submission_rows({"actions": actions}, page, reviewer, now, f"s{minutes:05.1f}-{reviewer}")
    if rows:
        write_corrections(STORAGE, str(out), rows, now)
    return rows
