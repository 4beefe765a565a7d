"""``medvlm codes``: ICD-10-CM and drug lookups for people and tests, and re-coding an existing output.

* ``medvlm codes icd10cm TEXT... [--top N]``: the ranked ICD-10-CM candidates of each diagnosis as written;
* ``medvlm codes icd10cm --validate CODE...``: whether each code is in the code set, billable, and its description;
* ``medvlm codes drug TEXT...``: the generic name and identifiers of each medication name as written;
* ``medvlm codes link --output URI [--stale-only]``: link the output's current diagnoses and medications again with
  the code set installed now, append-only (``medvlm_core.codes.relink``).

Each lookup prints a table, or with ``--format json`` a JSON list: ``{"query", "candidates": [{"code",
"description", "score", "billable"}]}``, ``{"code", "valid", "billable", "description"}``, ``{"query",
"generic_name", "drugbank_id", "mesh_id", "medline_plus_id", "score", "match"}``. Everything is offline.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from medvlm.flows.in_process import EXIT_OK, fail


def add_codes_parser(add: Callable[..., argparse.ArgumentParser]) -> None:
    """The ``codes`` command and its ``icd10cm``, ``drug`` and ``link`` subcommands.

    Args:
        add: makes a subcommand parser of ``medvlm`` (``name, help=...``).
    """
    codes = add("codes", help="ICD-10-CM and drug lookups (offline); re-code an output with the installed code set")
    sub = codes.add_subparsers(dest="codes_command", required=True)

    icd = sub.add_parser("icd10cm", allow_abbrev=False, help="ranked ICD-10-CM candidates for diagnoses as written, "
                                                             "or --validate codes")
    icd.add_argument("texts", nargs="+", metavar="TEXT", help="a diagnosis as written (quote several words), or a "
                                                              "code with --validate")
    icd.add_argument("--validate", action="store_true", help="check codes instead: valid, billable, description")
    icd.add_argument("--top", type=int, default=5, help="candidates per diagnosis (default: 5)")
    icd.add_argument("--format", choices=["table", "json"], default="table")

    drug = sub.add_parser("drug", allow_abbrev=False, help="generic names and identifiers of medication names")
    drug.add_argument("texts", nargs="+", metavar="TEXT", help="a medication name as written (brand, salt, ...)")
    drug.add_argument("--format", choices=["table", "json"], default="table")

    link = sub.add_parser("link", allow_abbrev=False, help="link an output's current diagnoses and medications "
                                                           "again with the installed code set (append-only)")
    link.add_argument("--output", required=True, help="the output folder or s3:// prefix of medvlm runs")
    link.add_argument("--stale-only", action="store_true",
                      help="only items whose current linking is of another release (or has none)")
    link.add_argument("--s3-endpoint", help="endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL_S3)")


def icd10cm_results(texts: list[str], top: int) -> list[dict[str, Any]]:
    """The candidates of each diagnosis, as ``medvlm codes icd10cm --format json`` prints them.

    Args:
        texts: diagnoses as written.
        top: candidates per diagnosis.

    Returns:
        ``[{"query", "candidates": [{"code", "description", "score", "billable"}]}]``.
    """
    from medvlm_core.codes.icd10cm import code_set

    codes = code_set()
    return [{"query": text, "candidates": [{"code": c.code, "description": c.description, "score": c.score,
                                             "billable": c.billable} for c in codes.search(text, top)]}
            for text in texts]


def validation_results(codes_given: list[str]) -> list[dict[str, Any]]:
    """The check of each code, as ``medvlm codes icd10cm --validate --format json`` prints it.

    Args:
        codes_given: codes as written.

    Returns:
        ``[{"code", "normalized", "valid", "billable", "description"}]``.
    """
    from medvlm_core.codes.icd10cm import code_set

    codes = code_set()
    out = []
    for code in codes_given:
        check = codes.check(code)
        out.append({"code": code, "normalized": check.normalized, "valid": check.valid, "billable": check.billable,
                    "description": check.description})
    return out


def drug_results(texts: list[str]) -> list[dict[str, Any]]:
    """The drug of each name, as ``medvlm codes drug --format json`` prints it.

    Args:
        texts: medication names as written.

    Returns:
        ``[{"query", "generic_name", "drugbank_id", "mesh_id", "medline_plus_id", "score", "match"}]`` (null
        fields when the name is not found).
    """
    from medvlm_core.codes.drugs import drug_dictionary

    dictionary = drug_dictionary()
    out = []
    for text in texts:
        found = dictionary.lookup(text)
        out.append({"query": text, "generic_name": found.generic_name if found else None,
                    "drugbank_id": found.drugbank_id if found else None, "mesh_id": found.mesh_id if found else None,
                    "medline_plus_id": found.medline_plus_id if found else None,
                    "score": found.score if found else None, "match": found.match if found else None})
    return out


def _print(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [["" if r.get(c) is None else str(r.get(c))[:70] for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def cmd_codes(args: argparse.Namespace) -> int:
    """``medvlm codes``: run a lookup or a re-link.

    Args:
        args: the parsed command line.

    Returns:
        0 when done; 2 when it could not run (the message says why); 1 for ``--validate`` when a code is invalid.
    """
    if args.codes_command == "link":
        return _link(args)
    if args.codes_command == "drug":
        rows = drug_results(args.texts)
        if args.format == "json":
            print(json.dumps(rows, indent=2))
        else:
            _print(rows, ["query", "generic_name", "drugbank_id", "mesh_id", "score", "match"])
        return EXIT_OK
    if args.top < 1:
        return fail("--top must be at least 1")
    if args.validate:
        rows = validation_results(args.texts)
        if args.format == "json":
            print(json.dumps(rows, indent=2))
        else:
            _print(rows, ["code", "normalized", "valid", "billable", "description"])
        return EXIT_OK if all(r["valid"] for r in rows) else 1
    results = icd10cm_results(args.texts, args.top)
    if args.format == "json":
        print(json.dumps(results, indent=2))
        return EXIT_OK
    flat = [dict(query=r["query"] if i == 0 else "", rank=i + 1, **c) for r in results
            for i, c in enumerate(r["candidates"] or [{}])]
    _print(flat, ["query", "rank", "code", "score", "billable", "description"])
    return EXIT_OK


def _link(args: argparse.Namespace) -> int:
    from medvlm_core.codes.relink import relink
    from medvlm_core.errors import RunError
    from medvlm_core.settings import Settings
    from medvlm_core.storage import Storage, s3_options

    settings = Settings()
    storage = Storage({"s3": s3_options(endpoint_url=args.s3_endpoint or settings.s3_endpoint)},
                      retry=settings.retry_policy())
    try:
        summary = relink(args.output, storage, stale_only=args.stale_only)
    except RunError as exc:
        return fail(str(exc))
    print(f"link {summary.link_id}: " + ", ".join(f"{n} {t}" for t, n in summary.items.items())
          + f" linked; {len(summary.files)} files written")
    for table, release in summary.releases.items():
        print(f"  {table}: {release}")
    return EXIT_OK
