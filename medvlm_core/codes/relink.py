"""Re-coding an existing output (``medvlm codes link``): the current items linked again, append-only.

ICD-10-CM changes every April and October and the drug dictionary with its package; an output's codes are
brought up to date without re-running the model: every current diagnosis and medication (``*_current``) is
linked again with the code set installed now, and the result is added as a new linking, never by rewriting a
file:

* ``diagnosis_links``, ``medication_links``: one row per item with its code columns (the same columns the run
  wrote on the item), the linking's ``link_id`` and ``linked_at``, and the release on every row;
* ``diagnosis_codes``: the ranked candidates of each diagnosis, under the same ``link_id``.

The current views then show the latest linking of each item (``analytics/coded.py``). Items are read and written
``batch_rows`` at a time (one file per table per batch), so an output of millions of items never sits in memory;
a re-link stopped part way leaves the items it did not reach on their previous linking, and running it again
links them (and the rest once more).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import polars as pl

from medvlm_core import storage as st
from medvlm_core.analytics import CURRENT_SUFFIX, connect, table_names_of
from medvlm_core.codes.linking import link_diagnosis, link_medication
from medvlm_core.errors import RunError
from medvlm_core.output.code_tables import DIAGNOSIS_CODES, RELINK_TABLES
from medvlm_core.output.paths import OutputLayout
from medvlm_core.output.tables import Table
from medvlm_core.storage import Storage

_KEYS = ("run_id", "result_key", "document_id", "page", "patient_id", "encounter_id", "item_index")
# What the linking reads of each clinical table (the coded prompt's fields may be absent from older outputs).
_READ = {"diagnoses": ("name", "icd10cm_model_code"),
         "medications": ("name", "dose", "unit", "route", "frequency", "strength", "duration")}


@dataclass
class RelinkSummary:
    """What a re-link wrote."""

    link_id: str
    linked_at: datetime
    releases: dict[str, str]
    items: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def new_link_id(now: datetime) -> str:
    """A sortable, unique id for a re-link: ``link-YYYYMMDDTHHMMSSZ-xxxxxxxx``.

    Args:
        now: when it runs (UTC).

    Returns:
        The id.
    """
    return f"link-{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def _write(storage: Storage, layout: OutputLayout, table: Table, rows: list[dict[str, Any]], day: str,
           name: str) -> str:
    from medvlm_core.output.results import write_parquet
    from medvlm_core.validation import passes

    data = table.rows_to_arrow(rows)
    schema = table.pandera_schema()
    if not passes(schema, pl.from_arrow(data)):
        schema.validate(pl.from_arrow(data), lazy=True)  # names the failed checks
    url = st.join(layout.table(table.name), f"run_date={day}", name)
    write_parquet(storage, url, data)
    return url


def relink(output: str, storage: Storage, now: datetime | None = None, stale_only: bool = False,
           batch_rows: int = 50_000) -> RelinkSummary:
    """Link an output's current diagnoses and medications again and add the result as a new linking.

    Args:
        output: the output folder or ``s3://`` prefix.
        storage: reads and writes it.
        now: the linking's time (default: now).
        stale_only: link only the items whose current linking is of another release (or has none).
        batch_rows: items read, linked and written at a time.

    Returns:
        The link id, its time, the releases used, the items linked per table and the files written.

    Raises:
        RunError: the output has no diagnoses or medications table.
    """
    from medvlm_core.codes.drugs import drug_dictionary
    from medvlm_core.codes.icd10cm import code_set
    from medvlm_core.output.results import utc_now

    now = now or utc_now()
    layout = OutputLayout.of(output)
    link_id = new_link_id(now)
    day = f"{now:%Y-%m-%d}"
    con = connect(output, storage)
    try:
        present = [t for t in RELINK_TABLES if t + CURRENT_SUFFIX in table_names_of(con)]
        if not present:
            raise RunError(f"output {st.normalize(output)}: no diagnoses or medications to link (run with "
                           "--mode structured first)")
        releases = {}
        if "diagnoses" in present:
            releases["diagnoses"] = code_set().release
        if "medications" in present:
            releases["medications"] = drug_dictionary().release
        summary = RelinkSummary(link_id, now, releases)
        for table in present:
            view = table + CURRENT_SUFFIX
            columns = {r[0] for r in con.execute(f"select column_name from (describe {view})").fetchall()}
            wanted = [c for c in _KEYS + _READ[table] if c in columns]
            where, params = "", {}
            if stale_only and "code_set_release" in columns:
                where, params = " where code_set_release is distinct from $release", {"release": releases[table]}
            reader = con.sql(f"select {', '.join(wanted)} from {view}{where} order by document_id, result_key, "
                             "item_index", params=params).to_arrow_reader(batch_rows)
            count = 0
            for number, batch in enumerate(reader):
                links, candidates = [], []
                for item in batch.to_pylist():
                    keys = {k: item.get(k) for k in _KEYS}
                    stamp = dict(keys, link_id=link_id, linked_at=now)
                    if table == "diagnoses":
                        linked, found = link_diagnosis(item, item.get("icd10cm_model_code"))
                        candidates += [dict(stamp, code_set_release=linked["code_set_release"], **c) for c in found]
                    else:
                        linked = link_medication(item)
                    links.append(dict(stamp, **linked))
                name = f"part-{link_id}-{number:05d}.parquet"
                if links:
                    summary.files.append(_write(storage, layout, RELINK_TABLES[table], links, day, name))
                if candidates:
                    summary.files.append(_write(storage, layout, DIAGNOSIS_CODES, candidates, day, name))
                count += len(links)
            summary.items[table] = count
    finally:
        con.close()
    return summary
