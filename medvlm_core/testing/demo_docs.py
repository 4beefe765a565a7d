"""Synthetic clinical documents for the demo and the tests: rendered with Pillow, no real patient data.

Three kinds of document a hospital sends us every night: a discharge summary with a medication list, a
prescription with a conditional instruction, and a lab report table. All names and ids are invented.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PAGE_SIZE = (1000, 1300)  # ~ US letter at 118 dpi

DOCUMENTS: dict[str, dict] = {
    "discharge-0001": {
        "patient_id": "P-000101",
        "encounter_id": "E-9001",
        "title": "DISCHARGE SUMMARY",
        "lines": [
            "Patient: Jane Example    DOB: 1956-03-14    MRN: P-000101",
            "Admitted: 2026-11-20    Discharged: 2026-11-24",
            "",
            "Primary diagnoses:",
            "  1. Type 2 diabetes mellitus with diabetic foot ulcer (left heel)",
            "  2. Essential hypertension",
            "",
            "Discharge medications:",
            "  - Metformin 500 mg PO twice daily with meals (glycaemic control)",
            "  - Lisinopril 10 mg PO once daily (blood pressure, renal protection)",
            "  - Cephalexin 500 mg PO four times daily for 7 days (ulcer infection)",
            "  - Silver sulfadiazine cream topically daily ONLY IF the ulcer fails to heal",
            "",
            "Instructions:",
            "  Wound clinic follow-up in 2 weeks. Return if fever > 38.5 C or spreading redness.",
            "  Check blood glucose before breakfast and dinner.",
        ],
    },
    "rx-0002": {
        "patient_id": "P-000102",
        "encounter_id": "E-9002",
        "title": "PRESCRIPTION",
        "lines": [
            "Patient: John Sample    DOB: 1971-08-02    MRN: P-000102",
            "Date: 2026-11-25",
            "",
            "Rx: Amoxicillin 875 mg tablets",
            "Sig: 1 tablet by mouth every 12 hours for 10 days",
            "Dispense: 20 tablets    Refills: 0",
            "",
            "Rx: Ibuprofen 400 mg tablets",
            "Sig: 1 tablet by mouth every 8 hours as needed for pain,",
            "     only if pain persists after acetaminophen.",
            "",
            "Dr. A. Placeholder, MD    License 000000",
        ],
    },
    "lab-0003": {
        "patient_id": "P-000103",
        "encounter_id": "E-9003",
        "title": "LABORATORY REPORT",
        "lines": [
            "Patient: Ann Demo    DOB: 1988-12-30    MRN: P-000103",
            "Collected: 2026-11-26 07:45",
            "",
            "Test                 Result     Units      Reference",
            "Hemoglobin A1c       8.9        %          4.0 - 5.6   HIGH",
            "Glucose, fasting     162        mg/dL      70 - 99     HIGH",
            "Creatinine           1.1        mg/dL      0.6 - 1.2",
            "eGFR                 68         mL/min     > 60",
            "Potassium            4.6        mmol/L     3.5 - 5.1",
            "",
            "Comment: repeat HbA1c in 3 months.",
        ],
    },
}


# The demo's gold labels (medvlm_core.evals.gold's format): what a careful reader extracts from each document.
# "a|b" lists accepted alternatives; an empty field is not labelled (not scored).
GOLD: dict[str, dict] = {
    "discharge-0001": {
        "document_type": "discharge_summary",
        "items": [
            {"table": "diagnoses", "name": "Type 2 diabetes mellitus with diabetic foot ulcer|Type 2 diabetes mellitus"},
            {"table": "diagnoses", "name": "Essential hypertension|Hypertension"},
            {"table": "medications", "name": "Metformin", "dose": "500", "unit": "mg", "route": "PO",
             "frequency": "twice daily", "conditional": "false"},
            {"table": "medications", "name": "Lisinopril", "dose": "10", "unit": "mg", "route": "PO",
             "frequency": "once daily", "conditional": "false"},
            {"table": "medications", "name": "Cephalexin", "dose": "500", "unit": "mg", "route": "PO",
             "frequency": "four times daily", "conditional": "false"},
            {"table": "medications", "name": "Silver sulfadiazine", "route": "topical", "frequency": "daily",
             "conditional": "true"},
            {"table": "instructions", "text": "Wound clinic follow-up in 2 weeks", "conditional": "false"},
            {"table": "instructions", "text": "Return if fever > 38.5 C or spreading redness", "conditional": "true"},
            {"table": "instructions", "text": "Check blood glucose before breakfast and dinner", "conditional": "false"},
        ],
    },
    "rx-0002": {
        "document_type": "prescription",
        "items": [
            {"table": "medications", "name": "Amoxicillin", "dose": "875", "unit": "mg", "route": "by mouth",
             "frequency": "every 12 hours", "conditional": "false"},
            {"table": "medications", "name": "Ibuprofen", "dose": "400", "unit": "mg", "route": "by mouth",
             "frequency": "every 8 hours as needed", "conditional": "true"},
        ],
    },
    "lab-0003": {
        "document_type": "lab_report",
        "items": [
            {"table": "instructions", "text": "Repeat HbA1c in 3 months", "conditional": "false"},
        ],
    },
}
GOLD_COLUMNS = ["document_id", "page", "document_type", "table", "name", "dose", "unit", "route", "frequency",
                "conditional", "text"]


def gold_records() -> list[dict]:
    """The demo documents' gold labels as gold-file rows.

    Returns:
        One row per labelled item (page 1), every column of ``GOLD_COLUMNS`` (empty: not labelled).
    """
    return [dict({c: "" for c in GOLD_COLUMNS}, document_id=document_id, page="1",
                 document_type=doc["document_type"], **item)
            for document_id, doc in GOLD.items() for item in doc["items"]]


def write_demo_gold(path: str | Path) -> Path:
    """Write the demo's gold labels as a CSV gold file.

    Args:
        path: the file to write.

    Returns:
        Its path.
    """
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=GOLD_COLUMNS)
        writer.writeheader()
        writer.writerows(gold_records())
    return path


def render_document(title: str, lines: list[str], size: tuple[int, int] = PAGE_SIZE) -> Image.Image:
    """A white page with a title and lines of text, like a scanned form."""
    page = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(page)
    title_font = ImageFont.load_default(size=40)
    body_font = ImageFont.load_default(size=24)
    draw.text((60, 60), title, fill="black", font=title_font)
    draw.line((60, 120, size[0] - 60, 120), fill="black", width=3)
    y = 150
    for line in lines:
        draw.text((60, y), line, fill="black", font=body_font)
        y += 36
    return page


def write_demo_documents(folder: str | Path) -> list[dict]:
    """Render every demo document to ``folder/<document_id>.png``; returns manifest records."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for document_id, doc in DOCUMENTS.items():
        path = folder / f"{document_id}.png"
        render_document(doc["title"], doc["lines"]).save(path)
        records.append(
            {
                "document_id": document_id,
                "image_uri": f"{folder.name}/{path.name}",
                "patient_id": doc["patient_id"],
                "encounter_id": doc["encounter_id"],
            }
        )
    return records


# A discharge summary of three pages, whose answer needs all of them: the diagnoses on page 1 are why the
# medications on page 2 were prescribed, and the conditional instruction on page 3 is about a page-2 medication.
MULTIPAGE_ID = "discharge-0004"
MULTIPAGE: dict = {
    "patient_id": "P-000104",
    "encounter_id": "E-9004",
    "pages": [
        ("DISCHARGE SUMMARY (page 1 of 3)", [
            "Patient: P-000104   Admitted: 2026-11-20   Discharged: 2026-11-24",
            "Primary diagnoses:",
            "  1. Community-acquired pneumonia, right lower lobe",
            "  2. Type 2 diabetes mellitus with hyperglycemia",
            "  3. Atrial fibrillation, new onset",
        ]),
        ("DISCHARGE SUMMARY (page 2 of 3)", [
            "Discharge medications:",
            "  - Amoxicillin-clavulanate 875/125 mg PO BID x 5 days",
            "  - Metformin 1000 mg PO BID with meals",
            "  - Apixaban 5 mg PO BID",
            "  - Metoprolol succinate 25 mg PO daily",
        ]),
        ("DISCHARGE SUMMARY (page 3 of 3)", [
            "Instructions:",
            "  - Hold metformin if eGFR falls below 30 or before contrast imaging.",
            "  - If heart rate is below 55, skip the metoprolol dose and call the clinic.",
            "  - Return if fever above 38.5 C persists after 72 hours of antibiotics.",
            "Follow-up: primary care in 1 week; cardiology in 4 weeks.",
        ]),
    ],
}


def write_demo_multipage(folder: str | Path) -> dict:
    """Render the three-page discharge summary to ``folder/discharge-0004.pdf``; returns its manifest record."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pages = [render_document(title, lines) for title, lines in MULTIPAGE["pages"]]
    path = folder / f"{MULTIPAGE_ID}.pdf"
    pages[0].save(path, save_all=True, append_images=pages[1:], resolution=118)
    return {"document_id": MULTIPAGE_ID, "image_uri": f"{folder.name}/{path.name}",
            "patient_id": MULTIPAGE["patient_id"], "encounter_id": MULTIPAGE["encounter_id"]}
