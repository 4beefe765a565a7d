"""The review list of a structured system: items below the review threshold or with unusable values, and pages
without an answer, over every page of the system (labelled or not)."""

from __future__ import annotations

import json
from typing import Any

import duckdb

from medvlm_core.evals.answers import ITEM_COLUMNS, iter_items, latest_rows_sql
from medvlm_core.evals.gold import GoldSet
from medvlm_core.evals.scores import SystemScores, item_validity


def review_rows(con: duckdb.DuckDBPyConnection, scores: SystemScores, gold: GoldSet, kinds: dict[str, dict[str, str]],
                eval_id: str) -> list[dict[str, Any]]:
    """The review list of a structured system over every page of it (labelled or not).

    An item goes to review when its confidence is below the threshold (``low_confidence``; every item when no
    threshold reaches the target: ``no_safe_threshold``; an item without a confidence: ``no_confidence``) or
    when a value is not usable (``invalid:<fields>``); without confidences (``validity`` mode) only the latter.
    A page without an answer goes to review as one row (``no_answer:<status>``).

    Args:
        con: a connection with the output's views.
        scores: the system's scores, calibrated.
        gold: the gold set (items on labelled pages get ``gold_status`` right or wrong, others ``unlabelled``).
        kinds: table -> field -> kind.
        eval_id: the evaluation's id.

    Returns:
        Rows of the ``review`` table.
    """
    system, review = scores.system, scores.review
    verdict: dict[tuple[str, str, str, int], str] = {}
    for result in scores.page_results:
        for table, match in result.tables.items():
            right = match.right_items()
            for pj, item in enumerate(match.predicted):
                verdict[(item["result_key"], item["run_id"], table, item["item_index"])] = (
                    "right" if pj in right else "wrong")
    base = {"eval_id": eval_id, "system": system.label}
    out = []
    labelled = {d for d, _ in gold.pages}
    sql, params = latest_rows_sql(system)
    answered: set[tuple[str, str]] = set()
    for row in con.sql(f"select document_id, page, status, result_key, run_id, patient_id, encounter_id from ({sql})",
                       params=params).to_arrow_table().to_pylist():
        if row["status"] == "ok":
            answered.add((row["result_key"], row["run_id"]))
            continue
        out.append(dict(base, run_id=row["run_id"], result_key=row["result_key"], document_id=row["document_id"],
                        page=row["page"], patient_id=row["patient_id"], encounter_id=row["encounter_id"],
                        table_name=None, item_index=None, confidence=None, reason=f"no_answer:{row['status']}",
                        gold_status="labelled" if row["document_id"] in labelled else "unlabelled",
                        page_status=row["status"], item_json=None))
    threshold = review["threshold"]
    for table in system.tables:
        key = gold.keys[table]
        for item in iter_items(con, system, table, gold_only=False):
            if (item["result_key"], item["run_id"]) not in answered:
                continue
            reasons = []
            confidence = item.get("confidence")
            if review["mode"] == "confidence":
                if confidence is None:
                    reasons.append("no_confidence")
                elif threshold is None:
                    reasons.append("no_safe_threshold")
                elif confidence < threshold:
                    reasons.append("low_confidence")
            bad = item_validity(item, key, kinds[table])
            if bad:
                reasons.append("invalid:" + ",".join(bad))
            if not reasons:
                continue
            values = {k: v for k, v in item.items() if k not in ITEM_COLUMNS}
            out.append(dict(base, run_id=item["run_id"], result_key=item["result_key"],
                            document_id=item["document_id"], page=item["page"], patient_id=item.get("patient_id"),
                            encounter_id=item.get("encounter_id"), table_name=table, item_index=item["item_index"],
                            confidence=confidence, reason=";".join(reasons),
                            gold_status=verdict.get((item["result_key"], item["run_id"], table, item["item_index"]),
                                                    "unlabelled"),
                            page_status="ok", item_json=json.dumps(values, sort_keys=True, default=str)))
    return out
