"""The ``status`` values of a result row: the contract analysts filter on."""

OK = "ok"
ERROR = "error"
# Structured mode only: the JSON answer was cut off at max_tokens (kept in completions, no structured rows).
TRUNCATED = "truncated"
# Never written: a page whose result key already has an ok row, counted by the run and left alone.
SKIPPED = "skipped"

# What a completions row may hold.
WRITTEN = (OK, ERROR, TRUNCATED)
# Answered pages: a re-run would give the same answer (deterministic), so their keys are done.
ANSWERED = (OK, TRUNCATED)
