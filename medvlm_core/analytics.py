"""DuckDB over the output tables: every table under an output folder or prefix becomes a view.

Works offline on local folders and on S3 (DuckDB reads through the s3fs filesystem registered with it, so
its httpfs extension, which would be downloaded at run time, is not needed).
"""

from __future__ import annotations

import re

import duckdb
import pyarrow as pa

from medvlm_core import storage as st
from medvlm_core.errors import RunError
from medvlm_core.storage import Storage

_IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]{0,62}$")

# The questions analysts ask first (also in the README; tests run them on real pipeline output).
EXAMPLE_QUERIES = {
    "medications_per_diagnosis": """
        select d.name as diagnosis, m.name as medication, count(*) as pages
        from diagnoses d join medications m using (result_key)
        group by all order by pages desc, diagnosis, medication limit 20""",
    "conditional_instructions": """
        select document_id, page, text, condition, follow_up_interval
        from instructions where conditional order by document_id, page, item_index""",
    "errors_by_type": """
        select error_type, count(distinct document_id) as documents, count(*) as pages
        from completions where status = 'error' group by error_type order by pages desc, error_type""",
    "throughput_per_run": """
        select run_id, pages_ok, pages_error, skipped_pages, round(wall_seconds, 2) as seconds,
               round(pages_per_second, 3) as pages_per_second,
               round(completion_tokens_per_second, 1) as tokens_per_second
        from runs order by started_at""",
}


def table_names(storage: Storage, output: str) -> list[str]:
    """The tables under ``output``: its folders that hold Parquet files (``_``-prefixed ones are internal)."""
    names = set()
    base = st.normalize(output).rstrip("/")
    for url in storage.list_files(base, ".parquet"):
        first = url[len(base) :].lstrip("/").split("/", 1)[0]
        if _IDENTIFIER.match(first):
            names.add(first)
    return sorted(names)


def connect(output: str, storage: Storage) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with one view per output table (completions, runs, quarantine, diagnoses, ...)."""
    output = st.normalize(output).rstrip("/")
    names = table_names(storage, output)
    if not names:
        raise RunError(f"output {output}: no tables found")
    con = duckdb.connect()
    if st.protocol_of(output) != st.LOCAL:
        fs, _ = storage.filesystem(output)
        con.register_filesystem(fs)
    for name in names:
        pattern = st.join(output, name, "*", "*.parquet")
        con.execute(
            f"create view {name} as select * from read_parquet('{pattern}', hive_partitioning = true, union_by_name = true)"
        )
    return con


def query(output: str, sql: str, storage: Storage) -> pa.Table:
    """Run ``sql`` over the output's views; RunError with DuckDB's message if the query is wrong."""
    con = connect(output, storage)
    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as exc:
        raise RunError(f"query failed: {str(exc).splitlines()[0]}") from None
    finally:
        con.close()
