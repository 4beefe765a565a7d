"""The output tables, each defined once (``medvlm_core.output.tables``): the Arrow and pandera schemas come
from the definition, a row with a key that is not a column is refused, the checks refuse rows that would break
downstream queries, and the one-query check that runs before pandera agrees with it."""

from __future__ import annotations

import pandera.polars as pa
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst
from pandera.errors import SchemaError, SchemaErrors

from conftest import HEX64, completion_row, run_row
from medvlm_core.inputs.manifest_checks import ROW, ManifestModel
from medvlm_core.output import results, tables
from medvlm_core.output.tables import COMPLETIONS, EVAL_TABLES, RUN_TABLES, RUNS, UnknownColumnError
from medvlm_core.output.tables import validate_table as validate_output
from medvlm_core.storage import Storage
from medvlm_core.validation import passes

CompletionsModel = COMPLETIONS.pandera_schema()
RunsModel = RUNS.pandera_schema()


@pytest.mark.parametrize("table", [*RUN_TABLES.values(), *EVAL_TABLES.values()], ids=lambda t: t.name)
def test_each_table_is_one_definition(table):
    arrow = table.arrow_schema()
    checks = table.pandera_schema()
    assert arrow.names == list(table.column_names) == list(checks.columns)
    assert len(set(arrow.names)) == len(arrow.names)
    for column in table.columns:
        assert column.description.strip(), f"{table.name}.{column.name} has no description"
        assert checks.columns[column.name].nullable == column.nullable
        assert pl.from_arrow(pa_array_of(column.type)).dtype == checks.columns[column.name].dtype.type
    if table.name in RUN_TABLES:
        assert results.TABLES[table.name].equals(arrow)  # the writers use the derived schema
    doc = table.markdown()
    assert all(f"`{name}`" in doc for name in table.column_names)


def pa_array_of(arrow_type):
    import pyarrow

    return pyarrow.array([], arrow_type)


def test_a_row_with_a_key_that_is_not_a_column_is_refused(tmp_path):
    row = completion_row()
    row["compleiton"] = row.pop("completion")  # misspelt: would have been written as a null completion
    with pytest.raises(UnknownColumnError, match=r"row 1 for the completions table .*\['compleiton'\]"):
        results.write_rows(Storage(), str(tmp_path / "c.parquet"), "completions", [row])
    assert not (tmp_path / "c.parquet").exists()
    with pytest.raises(UnknownColumnError, match="runs"):
        RUNS.rows_to_arrow([run_row(), dict(run_row(), pages_okay=1)])
    # a column a row leaves out is null, as before
    table = results.to_table([{"run_id": "r"}], results.RUNS_SCHEMA, "runs")
    assert table.column("pages_ok").to_pylist() == [None]


def test_structured_tables_lead_with_the_defined_keys():
    from medvlm_core.output.structured import CLINICAL_SCHEMA, tables_for

    for _, schema in tables_for("clinical_extraction", CLINICAL_SCHEMA).values():
        assert schema.names[:len(tables.STRUCTURED_KEYS)] == [c.name for c in tables.STRUCTURED_KEYS]


def completion(**change):
    return results.to_table([completion_row(**change)], results.COMPLETIONS_SCHEMA)


def test_valid_rows_pass():
    validate_output("completions", completion())
    validate_output("completions", completion(status="error", completion=None, error_type="not_found", error_message="x: file not found"))


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"status": "done"}, "status:isin"),
        ({"error_type": "not_found"}, "status_matches_error_fields"),
        ({"status": "error", "completion": None}, "status_matches_error_fields"),
        ({"status": "error", "error_type": "gremlins", "error_message": "m", "completion": None}, "error_type:isin"),
        ({"page": 0}, "page:greater_than_or_equal_to"),
        ({"image_sha256": "nothex"}, "image_sha256:str_matches"),
    ],
)
def test_invalid_rows_are_refused(change, problem):
    with pytest.raises(RuntimeError, match="refusing to write an invalid completions table") as info:
        validate_output("completions", completion(**change))
    assert problem in str(info.value)


def test_runs_and_quarantine_models():
    run = run_row()
    validate_output("runs", results.to_table([run], results.RUNS_SCHEMA))
    with pytest.raises(RuntimeError, match="pages_ok"):
        validate_output("runs", results.to_table([dict(run, pages_ok=-1)], results.RUNS_SCHEMA))
    with pytest.raises(RuntimeError, match="row_json"):
        validate_output("quarantine", results.to_table([{"run_id": "r", "row_number": 2, "reason": "x"}], results.QUARANTINE_SCHEMA))


# -- the one-query check (validation.passes) agrees with pandera ---------------------------------------

# Per column, values that keep a completions row valid and values that break it (alone or together).
COMPLETION_CHANGES = [
    {}, {"page": None}, {"page": 0}, {"page": 7}, {"manifest_row": 0}, {"image_sha256": None}, {"image_sha256": "nothex"},
    {"prompt_sha256": HEX64.upper()}, {"status": "done"}, {"status": "truncated"}, {"error_type": "not_found"},
    {"status": "error", "completion": None, "error_type": "not_found", "error_message": "m"},
    {"status": "error", "completion": None, "error_type": "gremlins", "error_message": "m"},
    {"status": "error", "completion": None}, {"completion_tokens": -1}, {"completion_tokens": None},
    {"document_id": None}, {"run_id": None}, {"result_key": "x" * 64},
]
RUN_CHANGES = [{}, {"pages_ok": -1}, {"run_id": "r2"}, {"run_id": None}, {"storage_retries": None},
               {"storage_retries": -2}, {"manifest_rows": 0}]
MANIFEST_VALUES = {
    "document_id": ["d1", " d2 ", "", "   ", None, "x" * 257],
    "image_uri": ["docs/a.png", "s3://b/k.png", "FILE:///a.tif", "http://x/y.png", "a\x01b.png", "", None],
    "page": [None, "1", " 2 ", "3.0", "0", "-1", "x", "1234567"],
    "prompt_id": [None, "medications", "no-such-prompt"],
    "sha256": [None, HEX64, HEX64.upper() + " ", "abc"],
}


def pandera_accepts(model, frame) -> bool:
    try:
        model.validate(frame, lazy=True)
        return True
    except (SchemaError, SchemaErrors):
        return False


def table_frame(rows: list[dict], schema) -> pl.DataFrame:
    return pl.from_arrow(results.to_table(rows, schema))


@settings(max_examples=40, deadline=None)
@given(hst.lists(hst.sampled_from(range(len(COMPLETION_CHANGES))), min_size=1, max_size=4))
def test_passes_agrees_with_pandera_on_completions(picks):
    frame = table_frame([completion_row(**COMPLETION_CHANGES[i]) for i in picks], results.COMPLETIONS_SCHEMA)
    assert passes(CompletionsModel, frame) == pandera_accepts(CompletionsModel, frame)


@settings(max_examples=20, deadline=None)
@given(hst.lists(hst.sampled_from(range(len(RUN_CHANGES))), min_size=1, max_size=3))
def test_passes_agrees_with_pandera_on_runs(picks):
    frame = table_frame([run_row(**RUN_CHANGES[i]) for i in picks], results.RUNS_SCHEMA)  # repeats: run_id unique
    assert passes(RunsModel, frame) == pandera_accepts(RunsModel, frame)


@settings(max_examples=40, deadline=None)
@given(hst.lists(hst.fixed_dictionaries({k: hst.sampled_from(v) for k, v in MANIFEST_VALUES.items()}),
                 min_size=1, max_size=4))
def test_passes_agrees_with_pandera_on_manifests(rows):
    frame = pl.DataFrame(rows, schema={k: pl.String for k in MANIFEST_VALUES}).with_row_index(ROW, offset=1)
    assert passes(ManifestModel, frame) == pandera_accepts(ManifestModel, frame)


def test_passes_checks_dtypes_columns_and_nan():
    frame = table_frame([completion_row()], results.COMPLETIONS_SCHEMA)
    assert passes(CompletionsModel, frame)
    assert not passes(CompletionsModel, frame.with_columns(pl.col("page").cast(pl.Int64)))  # Int32 in the model
    assert not passes(CompletionsModel, frame.drop("status"))  # a required column
    assert not pandera_accepts(CompletionsModel, frame.drop("status"))

    class Scores(pa.DataFrameModel):
        score: float = pa.Field(nullable=False)

    assert passes(Scores, pl.DataFrame({"score": [0.5]}))
    assert not passes(Scores, pl.DataFrame({"score": [float("nan")]}))  # pandera counts NaN as null
    assert not pandera_accepts(Scores, pl.DataFrame({"score": [float("nan")]}))


def test_passes_leaves_what_it_does_not_evaluate_to_pandera():
    class Coerced(pa.DataFrameModel):
        n: int = pa.Field(ge=0)

        class Config:
            coerce = True

    frame = pl.DataFrame({"n": ["1"]})
    assert not passes(Coerced, frame)  # pandera would coerce first: not this query's to judge
    assert pandera_accepts(Coerced, frame)
