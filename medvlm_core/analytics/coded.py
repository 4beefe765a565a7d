"""The current views of coded answers (docs/codes.md): the latest linking of each item is what is true now.

A run writes the code columns on its ``diagnoses`` and ``medications`` rows and the candidates in
``diagnosis_codes``; ``medvlm codes link`` adds, append-only, a newer linking of the same items in
``diagnosis_links``, ``medication_links`` and ``diagnosis_codes`` (keyed by ``link_id``, ordered by
``linked_at``). ``register_coded_views`` (called by ``views.register_views``) makes the current views follow the
latest linking:

* ``diagnoses_current`` / ``medications_current``: the current rows (``views``' rule, unchanged), their code
  columns taken from the item's latest re-link when it has one, else as the run wrote them;
* ``diagnosis_codes_current``, ``diagnosis_links_current``, ``medication_links_current``: the rows of each current
  item's latest linking only.

An output without re-links keeps the views exactly as they were.
"""

from __future__ import annotations

import duckdb

from medvlm_core.analytics.current_rule import CURRENT_SUFFIX, current_rows_sql
from medvlm_core.output.code_tables import CODE_TABLES, LINKED_COLUMNS, RELINK_TABLES

_ITEM = ("document_id", "result_key", "run_id", "item_index")


def latest_link_sql(table: str) -> str:
    """The rows of a link table's current items that belong to each item's latest linking.

    Args:
        table: ``diagnosis_codes``, ``diagnosis_links`` or ``medication_links``.

    Returns:
        SQL of a SELECT of the table's columns.
    """
    item = ", ".join(_ITEM)
    return f"""
select * from ({current_rows_sql(table)})
qualify link_id = first_value(link_id) over (partition by {item} order by linked_at desc, link_id desc)
"""


def overlay_sql(table: str, links: str, table_columns: set[str]) -> str:
    """The current rows of a clinical table with their code columns from the item's latest re-link, if any.

    Args:
        table: ``diagnoses`` or ``medications``.
        links: its re-link table.
        table_columns: the columns the table's history view has (older files may lack the code columns).

    Returns:
        SQL of a SELECT of the table's columns (and the code columns, when the history lacks them).
    """
    linked = [c.name for c in LINKED_COLUMNS[table]]
    replaced = [f"case when l.link_id is null then d.{c} else l.{c} end as {c}" for c in linked if c in table_columns]
    added = [f"l.{c} as {c}" for c in linked if c not in table_columns]
    star = "d.*" + (f" replace ({', '.join(replaced)})" if replaced else "")
    on = " and ".join(f"d.{k} = l.{k}" for k in _ITEM)
    return f"""
select {', '.join([star] + added)}
from ({current_rows_sql(table)}) d
left join ({latest_link_sql(links)}) l on {on}
"""


def register_coded_views(con: duckdb.DuckDBPyConnection, names: list[str], created: list[str]) -> None:
    """Make the current views of a connection follow the latest linking (module docstring).

    Args:
        con: a connection with the output's history views and the generic current views.
        names: the output's tables.
        created: the views made so far (the ones replaced here stay listed once).
    """
    for name in CODE_TABLES:
        if name in names and name + CURRENT_SUFFIX in created:
            con.execute(f"create or replace view {name}{CURRENT_SUFFIX} as {latest_link_sql(name)}")
    for table, links in RELINK_TABLES.items():
        if table in names and links.name in names and table + CURRENT_SUFFIX in created:
            columns = {row[0] for row in con.execute(f"select column_name from (describe {table})").fetchall()}
            con.execute(f"create or replace view {table}{CURRENT_SUFFIX} as {overlay_sql(table, links.name, columns)}")
