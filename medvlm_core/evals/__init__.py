"""Accuracy you can measure: score an output's answers against labelled pages (``medvlm eval``).

* ``gold``: the gold file (labelled items per document page and table), validated with pandera;
* ``normalize``: value normalisation (NFKC, case, punctuation) and aliases of units, routes and frequencies;
* ``matching``: field-aware matching (rapidfuzz) and one-to-one assignment;
* ``answers``: the systems to score and their answers and extracted items, read from the output with DuckDB;
* ``scores``: precision, recall and F1 per table, field and document type, free-text mention recall;
* ``bootstrap``: bootstrap intervals and paired comparisons; ``calibration``: calibration of the confidences;
* ``review``: the review list; ``tables``: the ``evals`` and ``review`` tables and the headline markdown;
* ``scoring``: ``evaluate``, the whole evaluation;
* ``report``: the self-contained HTML report (matplotlib plots embedded as PNG).
"""

from medvlm_core.evals.options import EvalOptions
from medvlm_core.evals.scores import Evaluation
from medvlm_core.evals.scoring import evaluate
from medvlm_core.evals.tables import headline_markdown, write_evaluation

__all__ = ["EvalOptions", "Evaluation", "evaluate", "headline_markdown", "write_evaluation"]
