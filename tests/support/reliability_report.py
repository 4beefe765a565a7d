"""What the reliability suite tried and what the pipeline survived, printed at the end of a test run.

Each check records the faults it injected, the inputs it tried and the rows it lost (the tests assert
that this is 0; the summary shows it so that a reader of the CI log sees the claim and its size).

Records go to a JSON-lines file (``MEDVLM_RELIABILITY_REPORT``, set once by tests/conftest.py in the process
that starts the run) so that the checks of every pytest-xdist worker reach the summary printed by the first.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPORT_ENV = "MEDVLM_RELIABILITY_REPORT"


@dataclass
class Entry:
    """Totals of one check over all its test cases."""

    faults: Counter = field(default_factory=Counter)
    inputs: int = 0
    rows_lost: int = 0


def record(check: str, *, inputs: int = 0, faults: dict[str, int] | None = None, rows_lost: int = 0) -> None:
    """Add what one test case of ``check`` tried: inputs, faults by kind, rows lost."""
    line = json.dumps({"check": check, "inputs": inputs, "faults": faults or {}, "rows_lost": rows_lost})
    with open(os.environ[REPORT_ENV], "a") as f:  # one short append per record: whole lines, whichever worker
        f.write(line + "\n")


def totals(path: Path) -> dict[str, Entry]:
    """The recorded checks, totalled by check."""
    report: dict[str, Entry] = {}
    if not path.exists():
        return report
    for line in path.read_text().splitlines():
        row = json.loads(line)
        entry = report.setdefault(row["check"], Entry())
        entry.inputs += row["inputs"]
        entry.faults.update(row["faults"])
        entry.rows_lost += row["rows_lost"]
    return report


def lines(path: Path) -> list[str]:
    """The summary table as text lines (empty when no reliability check ran)."""
    report = totals(path)
    if not report:
        return []
    out = [f"{'check':<52} {'inputs':>7} {'faults':>7} {'rows lost':>9}  fault kinds"]
    for check, e in sorted(report.items()):
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(e.faults.items()))
        out.append(f"{check:<52} {e.inputs:>7} {sum(e.faults.values()):>7} {e.rows_lost:>9}  {kinds}")
    total = report.values()
    out.append(f"{'total':<52} {sum(e.inputs for e in total):>7} {sum(sum(e.faults.values()) for e in total):>7} "
               f"{sum(e.rows_lost for e in total):>9}")
    return out
