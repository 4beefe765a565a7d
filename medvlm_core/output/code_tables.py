"""The tables of coded answers (medvlm_core.codes, docs/codes.md), defined like every output table in ``tables``.

They are output tables as any other: their Arrow and pandera schemas derive from these definitions
(``Table.arrow_schema``, ``Table.pandera_schema``). They live apart from ``tables`` only to keep each module short:

* ``DIAGNOSIS_CODE_COLUMNS`` and ``MEDICATION_CODE_COLUMNS``: the columns the linking stage appends to the
  ``diagnoses`` and ``medications`` tables (``structured.clinical_tables``);
* ``diagnosis_codes``: each diagnosis' ranked ICD-10-CM candidates, per linking (a run, or a re-link);
* ``diagnosis_links``, ``medication_links``: a re-link's code columns of each item (``medvlm codes link``).
"""

from __future__ import annotations

from medvlm_core.output.tables import BOOL, F64, I32, STRUCTURED_KEYS, TIMESTAMP, Check, Column, S, Table, _ge

# The linking stage appends these columns to the clinical extraction tables (structured.tables_for), and a re-link
# (``medvlm codes link``) writes them, for the same items, into diagnosis_links / medication_links.
_SCORE = (Check("ge", 0), Check("le", 1))
DIAGNOSIS_CODE_COLUMNS = (
    Column("icd10cm_code", S, "The ICD-10-CM code chosen: the model's own when it is in the code set, else the "
                              "search's best; always a code of the code set (null: no word of the diagnosis matched)."),
    Column("icd10cm_description", S, "The chosen code's description in the code set."),
    Column("icd10cm_score", F64, "How well the chosen code's texts match the diagnosis as written (0 to 1).",
           checks=_SCORE),
    Column("icd10cm_source", S, "model (the model's code, checked) or search.",
           checks=(Check("isin", ("model", "search")),)),
    Column("icd10cm_billable", BOOL, "Whether the chosen code is billable (a leaf of the code set)."),
    Column("icd10cm_category", S, "The chosen code's category (its first three characters)."),
    Column("icd10cm_chapter", S, "The chosen code's chapter: number, title and range."),
    Column("icd10cm_model_code", S, "The code the model wrote (clinical_extraction_coded), as written; null if none."),
    Column("icd10cm_model_code_valid", BOOL, "Whether the model's code is in the code set (false: invented or "
                                             "mistyped, never used as the chosen code)."),
    Column("code_set_release", S, "The code set release the row was linked with."),
)
MEDICATION_CODE_COLUMNS = (
    Column("generic_name", S, "The generic name from the offline drug dictionary (null: not found)."),
    Column("drugbank_id", S, "The drug's DrugBank id, when the dictionary has one."),
    Column("mesh_id", S, "The MeSH id the dictionary gives (often the drug's pharmacological class: see docs)."),
    Column("drug_score", F64, "How sure the name lookup is (1: the name as written is in the dictionary).",
           checks=_SCORE),
    Column("drug_match", S, "How the name was found: exact, abbreviation, stripped, salt, words, combination, fuzzy."),
    Column("dose_value", F64, "The dose as a number (the low end of a range)."),
    Column("dose_max", F64, "The high end of a dose range (1-2 tablets), else null."),
    Column("dose_unit", S, "The dose's unit, canonical (mg, mcg, g, mL, unit, tablet, puff, ...)."),
    Column("strength_value", F64, "The strength as a number (from the strength field, else from the name)."),
    Column("strength_unit", S, "The strength's unit, canonical (mg, mg/mL, mg/5 mL, ...)."),
    Column("frequency_per_day", F64, "Administrations per day (BID 2, q8h 3, weekly 1/7; the most a range allows).",
           checks=(Check("ge", 0),)),
    Column("prn", BOOL, "Taken as needed (PRN)."),
    Column("route_normalized", S, "The route, canonical (oral, intravenous, subcutaneous, inhalation, ...)."),
    Column("duration_days", F64, "The course's length in days, when written.", checks=(Check("ge", 0),)),
    Column("code_set_release", S, "The drug dictionary release the row was linked with."),
)
# An item's keys (the leading structured keys, without its confidence and evidence pages).
_ITEM_KEYS = tuple(c for c in STRUCTURED_KEYS if c.name in ("run_id", "result_key", "document_id", "page",
                                                             "patient_id", "encounter_id", "item_index"))
_LINK_KEYS = _ITEM_KEYS + (
    Column("link_id", S, "The linking that wrote the row: the run's id, or the id of a medvlm codes link.",
           nullable=False),
    Column("linked_at", TIMESTAMP, "When the linking ran (UTC): the latest linking of an item is current.",
           nullable=False),
)
_CANDIDATE_COLUMNS = (
    Column("code_set_release", S, "The ICD-10-CM release searched."),
    Column("query", S, "The diagnosis as written (the text searched)."),
    Column("rank", I32, "1 = the best candidate.", nullable=False, checks=_ge(1)),
    Column("code", S, "The candidate code.", nullable=False),
    Column("description", S, "Its description in the code set."),
    Column("score", F64, "How well its texts match the diagnosis (0 to 1).", checks=_SCORE),
    Column("billable", BOOL, "Whether the candidate is billable."),
    Column("chosen", BOOL, "Whether this candidate is the item's chosen code."),
)
DIAGNOSIS_CODES = Table("diagnosis_codes", "The ranked ICD-10-CM candidates of each diagnosis, per linking.",
                        _LINK_KEYS + _CANDIDATE_COLUMNS)
DIAGNOSIS_LINKS = Table("diagnosis_links", "A re-link's code columns for each diagnosis (medvlm codes link).",
                        _LINK_KEYS + DIAGNOSIS_CODE_COLUMNS)
MEDICATION_LINKS = Table("medication_links", "A re-link's drug columns for each medication (medvlm codes link).",
                         _LINK_KEYS + MEDICATION_CODE_COLUMNS)
CODE_TABLES = {t.name: t for t in (DIAGNOSIS_CODES, DIAGNOSIS_LINKS, MEDICATION_LINKS)}
# The clinical table -> its linked columns, and the table a re-link writes them into.
LINKED_COLUMNS = {"diagnoses": DIAGNOSIS_CODE_COLUMNS, "medications": MEDICATION_CODE_COLUMNS}
RELINK_TABLES = {"diagnoses": DIAGNOSIS_LINKS, "medications": MEDICATION_LINKS}
