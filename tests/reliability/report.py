"""What the reliability suite tried and what the pipeline survived, printed at the end of a test run.

Each check records the faults it injected, the inputs it tried and the rows it lost (the tests assert
that this is 0; the summary shows it so that a reader of the CI log sees the claim and its size).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Entry:
    """Totals of one check over all its test cases."""

    faults: Counter = field(default_factory=Counter)
    inputs: int = 0
    rows_lost: int = 0


REPORT: dict[str, Entry] = {}


def record(check: str, *, inputs: int = 0, faults: dict[str, int] | None = None, rows_lost: int = 0) -> None:
    """Add what one test case of ``check`` tried: inputs, faults by kind, rows lost."""
    entry = REPORT.setdefault(check, Entry())
    entry.inputs += inputs
    entry.faults.update(faults or {})
    entry.rows_lost += rows_lost


def lines() -> list[str]:
    """The summary table as text lines (empty when no reliability check ran)."""
    if not REPORT:
        return []
    out = [f"{'check':<52} {'inputs':>7} {'faults':>7} {'rows lost':>9}  fault kinds"]
    for check, e in sorted(REPORT.items()):
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(e.faults.items()))
        out.append(f"{check:<52} {e.inputs:>7} {sum(e.faults.values()):>7} {e.rows_lost:>9}  {kinds}")
    total = REPORT.values()
    out.append(f"{'total':<52} {sum(e.inputs for e in total):>7} {sum(sum(e.faults.values()) for e in total):>7} "
               f"{sum(e.rows_lost for e in total):>9}")
    return out
