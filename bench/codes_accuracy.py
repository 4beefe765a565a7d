"""Accuracy and speed of the code linking (medvlm_core.codes) on labelled lists of how clinicians write.

    python -m bench.codes_accuracy [--diagnoses CSV] [--drugs CSV] [--repeat 3] [--misses] [--out FILE.json]

The lists (``bench/data/``) were written for this benchmark from clinical usage (problem lists, discharge
summaries, prescriptions), not from the code set's descriptions:

* ``codes_diagnoses.csv``: ``text`` (a diagnosis as written: abbreviations, synonyms, lay and eponym forms,
  misspellings, word order, with/without qualifiers), ``category`` (the expected ICD-10-CM category, the first
  three characters; ``A|B`` where coding rules allow either) and ``kind``;
* ``codes_drugs.csv``: ``text`` (a medication as written: brands, salts, abbreviations, misspellings, with
  strength), ``generic`` (the expected generic name; ``a|b`` for equivalent names) and ``kind``;
* ``codes_holdout.csv``: phrasings written after the search and the abbreviation list were tuned on the two lists
  above, scored apart: what the tuning did not see.

Measured: the ICD-10-CM category of the first candidate (top-1) and of any of the first five (top-5); the generic
name (after normalisation) for drugs; each list per kind; and the time per 1,000 items of the linking itself
(the search and the billable choice for a diagnosis, the lookup for a drug), the code set loaded beforehand
(its load is timed apart), best of ``--repeat`` passes with the per-process caches cleared before each.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _share(hits: int, total: int) -> float:
    return round(hits / total, 4) if total else 0.0


def score_diagnoses(rows: list[dict[str, str]], top: int = 5) -> dict:
    """Top-1 and top-5 category accuracy over a labelled list, overall and per kind.

    Args:
        rows: ``text``, ``category`` (``A|B`` alternatives), ``kind``.
        top: candidates considered.

    Returns:
        ``{"n", "top1", "top5", "by_kind": {...}, "misses": [...]}``.
    """
    from medvlm_core.codes.icd10cm import code_set

    codes = code_set()
    kinds: dict[str, list[int]] = {}
    hits1 = hits5 = 0
    misses = []
    for row in rows:
        expected = {c.strip().upper() for c in row["category"].split("|")}
        found = codes.search(row["text"], top)
        categories = [c.category for c in found]
        one = bool(categories) and categories[0] in expected
        five = any(c in expected for c in categories)
        hits1 += one
        hits5 += five
        counts = kinds.setdefault(row.get("kind") or "", [0, 0, 0])
        counts[0] += 1
        counts[1] += one
        counts[2] += five
        if not one:
            misses.append({"text": row["text"], "expected": row["category"],
                           "got": [f"{c.code} {c.description[:40]} {c.score}" for c in found[:3]], "top5": five})
    return {"n": len(rows), "top1": _share(hits1, len(rows)), "top5": _share(hits5, len(rows)),
            "by_kind": {k: {"n": n, "top1": _share(a, n), "top5": _share(b, n)}
                        for k, (n, a, b) in sorted(kinds.items())},
            "misses": misses}


def score_drugs(rows: list[dict[str, str]]) -> dict:
    """Generic-name accuracy over a labelled list, overall and per kind.

    Args:
        rows: ``text``, ``generic`` (``a|b`` alternatives), ``kind``.

    Returns:
        ``{"n", "accuracy", "by_kind": {...}, "misses": [...]}``.
    """
    from medvlm_core.codes.drugs import drug_dictionary, normalize

    drugs = drug_dictionary()
    kinds: dict[str, list[int]] = {}
    hits = 0
    misses = []
    for row in rows:
        expected = {normalize(g) for g in row["generic"].split("|")}
        found = drugs.lookup(row["text"])
        right = found is not None and normalize(found.generic_name) in expected
        hits += right
        counts = kinds.setdefault(row.get("kind") or "", [0, 0])
        counts[0] += 1
        counts[1] += right
        if not right:
            misses.append({"text": row["text"], "expected": row["generic"],
                           "got": None if found is None else f"{found.generic_name} ({found.match} {found.score})"})
    return {"n": len(rows), "accuracy": _share(hits, len(rows)),
            "by_kind": {k: {"n": n, "accuracy": _share(a, n)} for k, (n, a) in sorted(kinds.items())},
            "misses": misses}


def time_linking(diagnoses: list[str], drugs: list[str], repeat: int) -> dict:
    """Milliseconds per item of the linking, best of ``repeat`` passes, per-process caches cleared before each.

    Args:
        diagnoses: diagnosis texts.
        drugs: medication names.
        repeat: passes.

    Returns:
        ``{"diagnosis_ms", "drug_ms", "item_ms"}`` (``item_ms``: over both lists together).
    """
    from medvlm_core.codes import text
    from medvlm_core.codes.drugs import drug_dictionary
    from medvlm_core.codes.icd10cm import code_set

    codes, dictionary = code_set(), drug_dictionary()
    best_d = best_m = float("inf")
    for _ in range(repeat):
        codes._nearest_word.cache_clear()
        text.stem.cache_clear()
        dictionary.lookup.cache_clear()
        start = time.perf_counter()
        for item in diagnoses:
            found = codes.search(item, 5)
            if found:
                codes.billable_choice(found[0], item)
        middle = time.perf_counter()
        for item in drugs:
            dictionary.lookup(item)
        end = time.perf_counter()
        best_d = min(best_d, (middle - start) / max(1, len(diagnoses)))
        best_m = min(best_m, (end - middle) / max(1, len(drugs)))
    total = best_d * len(diagnoses) + best_m * len(drugs)
    return {"diagnosis_ms": round(best_d * 1000, 3), "drug_ms": round(best_m * 1000, 3),
            "item_ms": round(total / max(1, len(diagnoses) + len(drugs)) * 1000, 3)}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print (and with --out write) its results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diagnoses", default=str(DATA / "codes_diagnoses.csv"))
    parser.add_argument("--drugs", default=str(DATA / "codes_drugs.csv"))
    parser.add_argument("--holdout", default=str(DATA / "codes_holdout.csv"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--misses", action="store_true", help="print every miss")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    from medvlm_core.codes.icd10cm import code_set

    codes = code_set()
    icd_load = time.perf_counter() - start
    start = time.perf_counter()
    from medvlm_core.codes.drugs import drug_dictionary

    dictionary = drug_dictionary()
    drug_load = time.perf_counter() - start

    diagnosis_rows = _read(Path(args.diagnoses))
    drug_rows = _read(Path(args.drugs))
    holdout_rows = _read(Path(args.holdout)) if Path(args.holdout).exists() else []
    result = {
        "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
        "code_set": codes.release, "drug_dictionary": dictionary.release,
        "load_seconds": {"icd10cm": round(icd_load, 2), "drugs": round(drug_load, 2)},
        "diagnoses": score_diagnoses(diagnosis_rows),
        "drugs": score_drugs(drug_rows),
    }
    if holdout_rows:
        result["holdout"] = score_diagnoses([r for r in holdout_rows if r.get("category")])
        held_drugs = [r for r in holdout_rows if r.get("generic")]
        if held_drugs:
            result["holdout_drugs"] = score_drugs(held_drugs)
    result["timing"] = time_linking([r["text"] for r in diagnosis_rows + holdout_rows if r.get("category")],
                                    [r["text"] for r in drug_rows], args.repeat)

    d, m, t = result["diagnoses"], result["drugs"], result["timing"]
    print(f"{result['code_set']}; {result['drug_dictionary']}")
    print(f"load: ICD-10-CM {result['load_seconds']['icd10cm']} s, drugs {result['load_seconds']['drugs']} s")
    print(f"diagnoses ({d['n']}): category top-1 {d['top1']:.1%}, top-5 {d['top5']:.1%}")
    for kind, k in d["by_kind"].items():
        print(f"  {kind:<13} {k['n']:>4}  top-1 {k['top1']:.1%}  top-5 {k['top5']:.1%}")
    if "holdout" in result:
        h = result["holdout"]
        print(f"holdout ({h['n']}): category top-1 {h['top1']:.1%}, top-5 {h['top5']:.1%}")
    if "holdout_drugs" in result:
        print(f"holdout drugs ({result['holdout_drugs']['n']}): {result['holdout_drugs']['accuracy']:.1%}")
    print(f"drugs ({m['n']}): generic name {m['accuracy']:.1%}")
    for kind, k in m["by_kind"].items():
        print(f"  {kind:<13} {k['n']:>4}  {k['accuracy']:.1%}")
    print(f"time: {t['diagnosis_ms']} ms per diagnosis, {t['drug_ms']} ms per drug, {t['item_ms']} ms per item "
          f"({t['item_ms'] * 1000:.0f} ms per 1,000 items)")
    if args.misses:
        for section in ("diagnoses", "holdout", "drugs", "holdout_drugs"):
            for miss in result.get(section, {}).get("misses", []):
                print(f"  miss [{section}] {json.dumps(miss)}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
