"""The output tables' pandera models refuse rows that would break downstream queries."""

from __future__ import annotations

import pytest

from conftest import completion_row, run_row
from medvlm_core import results
from medvlm_core.validation import validate_output


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
