"""Checking a polars frame against a pandera schema fast: ``passes``, every check in one polars query.

The manifest (``inputs/manifest_checks.py``) and the output tables (``output/tables.py``) are both checked with
pandera's polars backend. Each check first asks ``passes``: every check of the schema in one polars query
(pandera's own check functions). pandera itself runs only when that query finds a failure, to name it: pandera
runs one query per check (~50 for the completions table, ~0.3 ms each whatever the rows), 17 ms for a chunk of
64 completions against 2.4 ms in one query (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

import pandera.backends.polars.builtin_checks  # noqa: F401  (registers the polars built-in checks that passes() calls)
import pandera.polars as pa
import polars as pl
from pandera.api.polars.types import PolarsData
from pandera.backends.polars.checks import PolarsCheckBackend
from pandera.constants import CHECK_OUTPUT_KEY
from pandera.engines.polars_engine import Engine


def passes(model: type[pa.DataFrameModel] | pa.DataFrameSchema, frame: pl.DataFrame) -> bool:
    """Whether ``frame`` passes every check of ``model``, found in one polars query: the columns' presence and
    dtypes, nullability (NaN counted as null, as pandera does), uniqueness, and each column and dataframe check
    through pandera's own check function. False says only "let pandera decide": also for a model using what
    this does not evaluate (coercion, strictness, regex column names, schema-level uniqueness) or any error.

    Args:
        model: the pandera model or schema.
        frame: the rows.

    Returns:
        True if every check passes.
    """
    schema = model.to_schema() if isinstance(model, type) else model
    if schema.coerce or schema.strict or schema.unique:
        return False
    try:
        columns: list[pl.Expr] = []
        checks: list[tuple[Any, Any]] = []
        lazy = frame.lazy()
        for name, column in schema.columns.items():
            if column.regex or column.coerce:
                return False
            if name not in frame.schema:
                if column.required:
                    return False
                continue
            dtype = frame.schema[name]
            if column.dtype is not None and not column.dtype.check(Engine.dtype(dtype)):
                return False
            if not column.nullable:
                present = pl.col(name).is_not_null()
                if dtype.is_float():
                    present = present & pl.col(name).is_not_nan()
                columns.append(present.all().alias(f"{name}:not_nullable"))
            if column.unique:
                columns.append(pl.col(name).is_duplicated().not_().all().alias(f"{name}:unique"))
            checks += [(check, PolarsData(lazy, name)) for check in column.checks]
        checks += [(check, PolarsData(lazy, "*")) for check in schema.checks]
        parts = [lazy.select(columns)] if columns else []
        for n, (check, data) in enumerate(checks):
            out = PolarsCheckBackend(check).apply(data)
            if isinstance(out, bool):
                if not out:
                    return False
                continue
            result = pl.col(CHECK_OUTPUT_KEY)
            result = (result | result.is_null()) if check.ignore_na else result.fill_null(False)
            parts.append(out.select(result.all().alias(f"check {n}")))
        if not parts:
            return True
        return all(pl.concat(parts, how="horizontal").collect().row(0))
    except Exception:  # anything this cannot evaluate is pandera's to judge
        return False
