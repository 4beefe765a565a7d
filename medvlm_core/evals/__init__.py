"""Accuracy you can measure: score an output's answers against labelled pages (``medvlm eval``).

* ``gold``: the gold file (labelled items per document page and table), validated with pandera;
* ``matching``: field-aware normalisation, aliases, fuzzy matching (rapidfuzz) and one-to-one assignment;
* ``scoring``: precision, recall and F1 per table, field and document type, free-text mention recall, bootstrap
  intervals and comparisons, calibration of the confidences and the review list; the ``evals`` and ``review``
  tables;
* ``report``: the self-contained HTML report (matplotlib plots embedded as PNG).
"""

from medvlm_core.evals.options import EvalOptions
from medvlm_core.evals.scoring import Evaluation, evaluate, headline_markdown, write_evaluation

__all__ = ["EvalOptions", "Evaluation", "evaluate", "headline_markdown", "write_evaluation"]
