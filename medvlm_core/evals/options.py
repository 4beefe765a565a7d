"""The knobs of an evaluation (``medvlm eval`` flags, the ``medvlm-eval`` flow's ``eval_options``), defined once."""

from __future__ import annotations

from typing import Any, Dict, Optional

from pydantic import Field, ValidationError
from pydantic.dataclasses import dataclass

from medvlm_core.errors import RunError
from medvlm_core.run.params import STRICT


@dataclass(frozen=True, kw_only=True, config=STRICT)
class EvalOptions:
    """How answers are matched to the gold items, how uncertainty is estimated and where review starts."""

    name_threshold: float = Field(85.0, ge=0, le=100, description="least rapidfuzz token_sort_ratio (0-100) for two "
                                  "names to match")
    text_threshold: float = Field(80.0, ge=0, le=100, description="least rapidfuzz token_set_ratio (0-100) for two "
                                  "free texts (instructions, conditions) to match")
    mention_threshold: float = Field(90.0, ge=0, le=100, description="least rapidfuzz partial_ratio (0-100) for a "
                                     "free-text answer to count as mentioning a gold name")
    target_precision: float = Field(0.95, gt=0, le=1, description="precision the accepted (not reviewed) items "
                                    "should reach: the suggested review threshold is the lowest that reaches it")
    review_threshold: Optional[float] = Field(None, ge=0, le=1, description="items with a confidence below this go "
                                              "to review (default: the suggested threshold)")
    bootstrap_samples: int = Field(1000, ge=0, le=100_000, description="bootstrap resamples of the documents for "
                                   "the confidence intervals (0: none)")
    seed: int = Field(0, description="seed of the bootstrap")
    confidence_bins: int = Field(10, ge=2, le=100, description="equal-width confidence bins of the calibration table")
    worst_pages: int = Field(10, ge=0, le=1000, description="pages shown per run in the report's worst pages")
    key_fields: Optional[Dict[str, str]] = Field(None, description="field a user extraction table's items are "
                                                 "matched on, by table (default: name, else text, else the first "
                                                 "labelled field)")

    @classmethod
    def parse(cls, value: "EvalOptions | dict[str, Any] | None") -> "EvalOptions":
        """Options from a flow parameter: an instance, a dict, or None for the defaults.

        Args:
            value: what the caller passed.

        Returns:
            The validated options.

        Raises:
            RunError: naming each bad option and why.
        """
        if isinstance(value, EvalOptions):
            return value
        if value is not None and not isinstance(value, dict):
            raise RunError(f"eval options must be an object, got {type(value).__name__}")
        try:
            return cls(**(value or {}))
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                where = ".".join(str(p) for p in error.get("loc", ())) or "eval options"
                problems.append(f"{where}: {error.get('msg', 'invalid')}")
            raise RunError("; ".join(problems)) from None
        except TypeError as exc:  # an unknown keyword
            raise RunError(f"unknown eval option ({exc})") from None
