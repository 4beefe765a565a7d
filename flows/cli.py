"""The ``medvlm`` command line: ``run``, ``demo``, ``validate``, ``query``, ``eval``, ``review`` and ``make-tiny-model``.

``medvlm run`` executes the ``medvlm-batch`` Prefect flow in this process (an ephemeral Prefect server
when PREFECT_API_URL is not set). Exit status: 0 when every manifest row is accounted for, 1 when the
run finished but the counts do not reconcile, 2 when the run cannot start (the message says why).
"""

from __future__ import annotations

import argparse
import io
import sys
import types
import typing
from typing import Any, Sequence

from medvlm.flows.codes_cli import add_codes_parser, cmd_codes
from medvlm.flows.demo import cmd_demo, cmd_make_tiny_model
from medvlm.flows.in_process import (
    EXIT_CANNOT_RUN,
    EXIT_OK,
    EXIT_UNRECONCILED,
    errors_last,
    fail,
    print_eval,
    print_summary,
    run_eval,
    run_flow,
)
from medvlm.flows.review_cli import add_review_parser, cmd_review

# Names of the example queries (medvlm_core.analytics.EXAMPLE_QUERIES), listed without importing DuckDB.
EXAMPLES = ("medications_per_diagnosis", "conditional_instructions", "errors_by_type", "still_failing", "document_status",
            "throughput_per_run", "patients_by_icd10cm_chapter", "patients_by_icd10cm_category",
            "medications_by_generic_name")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """One flag per run option, derived from ``RunOptions`` (name, type, default and help come from there).

    Defaults are left to ``RunOptions`` (argparse.SUPPRESS): only the flags given reach the run.
    """
    from medvlm_core.run.options import option_fields

    for field in option_fields():
        extra = field.info.json_schema_extra or {}
        flag = extra.get("cli", "--" + field.name.replace("_", "-"))
        if flag is None:  # not a command-line option (e.g. s3fs options: deployments only)
            continue
        default = field.info.get_default(call_default_factory=True)
        kinds = _flag_kinds(field.annotation)
        help_text = field.info.description or ""
        if bool in kinds:
            if default:
                p.add_argument(f"--no-{flag[2:]}", dest=field.name, action="store_false", default=argparse.SUPPRESS,
                               help=f"turn off: {help_text}")
            else:
                p.add_argument(flag, dest=field.name, action="store_true", default=argparse.SUPPRESS, help=help_text)
            continue
        shown = f" (default: {default})" if default not in (None, (), []) else ""
        kwargs: dict[str, Any] = dict(dest=field.name, default=argparse.SUPPRESS, help=help_text + shown)
        if list in kinds or tuple in kinds:
            kwargs["action"] = "append"
        elif kinds[0] in (int, float):
            kwargs["type"] = kinds[0]
        if "literal" in kinds:
            kwargs["choices"] = list(typing.get_args(_without_none(field.annotation)))
        p.add_argument(flag, **kwargs)
    # A shortcut, not an option of its own: structured mode is the clinical_extraction prompt.
    p.add_argument("--mode", choices=["text", "structured"], default="text",
                   help="structured: schema-constrained JSON into diagnoses/medications/instructions tables")


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    """One flag per evaluation option, derived from ``EvalOptions`` (``key_fields`` has its own ``--key``)."""
    from medvlm_core.evals.options import EvalOptions

    for name, info in EvalOptions.__pydantic_fields__.items():
        if name == "key_fields":
            continue
        kind = _flag_kinds(info.annotation)[0]
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=argparse.SUPPRESS,
                       help=info.description + ("" if info.default is None else f" (default: {info.default})"))


def _without_none(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1 else annotation


def _flag_kinds(annotation: Any) -> list[Any]:
    """The Python kinds an option's annotation stands for: [int], [bool], [list], ['literal'], [str], ..."""
    inner = _without_none(annotation)
    origin = typing.get_origin(inner)
    if origin is typing.Literal:
        return [str, "literal"]
    if origin in (list, tuple, dict):
        return [origin]
    return [inner]


def flow_options(args: argparse.Namespace) -> dict[str, Any]:
    """The run options given on the command line (flat names), with ``--mode structured`` applied."""
    from medvlm_core.run.options import option_fields

    values = {f.name: getattr(args, f.name) for f in option_fields() if hasattr(args, f.name)}
    if args.mode == "structured" and not values.get("prompt_id") and not values.get("extraction"):
        values["prompt_id"] = "clinical_extraction"
    return values


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``medvlm`` command."""
    # allow_abbrev=False everywhere: a prefix must not pass for another flag (--mode is not --model).
    parser = argparse.ArgumentParser(prog="medvlm", description="Clinical document images -> VLM -> Parquet tables.",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, allow_abbrev=False, **kwargs)

    run = add("run", help="run the batch flow over a manifest")
    run.add_argument("--manifest", required=True, help="manifest URI (.csv, .jsonl or .parquet)")
    run.add_argument("--output", required=True, help="output folder URI for the Parquet tables")
    run.add_argument("--model", required=True, help="text model GGUF, or a .zip holding model and mmproj (path or s3://)")
    run.add_argument("--mmproj", help="vision projector (mmproj) GGUF (path or s3://)")
    _add_run_options(run)

    demo = add("demo", help="render synthetic documents and run the whole flow on them")
    demo.add_argument("--workdir", default="./medvlm-demo")
    demo.add_argument("--model", help="text model GGUF (default: generate the tiny random model)")
    demo.add_argument("--mmproj", help="vision projector GGUF (with --model)")
    demo.add_argument("--family", default="llava", help="tiny model family when generating (docs: Models, model families)")
    demo.add_argument("--max-tokens", type=int, default=None,
                      help="tokens per page (default: 48; 256 with --mode structured, room for the JSON to close)")
    demo.add_argument("--mode", choices=["text", "structured"], default="text",
                      help="structured: schema-constrained JSON into diagnoses/medications/instructions tables")
    demo.add_argument("--s3", action="store_true",
                      help="start a local S3 server (SeaweedFS) and run from s3:// to s3://")

    validate = add("validate", help="check a manifest (no model is loaded); non-zero if rows would be quarantined")
    validate.add_argument("manifest", help="manifest URI (.csv, .jsonl or .parquet)")
    validate.add_argument("--s3-endpoint", help="endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL_S3)")
    validate.add_argument("--examples", type=int, default=3, help="problems shown per check")

    q = add("query", help="run SQL (DuckDB) over the output tables")
    q.add_argument("sql", help="SQL over the views completions, runs, quarantine, diagnoses, medications, "
                              "instructions, ...; or an example name: " + ", ".join(EXAMPLES))
    q.add_argument("--output", required=True, help="the output folder or s3:// prefix of medvlm runs")
    q.add_argument("--format", choices=["table", "csv", "parquet"], default="table")
    q.add_argument("--out", help="file to write (csv, parquet); default: standard output for table/csv")
    q.add_argument("--s3-endpoint", help="endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL_S3)")

    ev = add("eval", help="score runs against labelled pages (a gold file): precision, recall, F1, review list")
    ev.add_argument("--output", required=True, help="the output folder or s3:// prefix of medvlm runs")
    ev.add_argument("--gold", required=True, help="gold file (.csv, .jsonl or .parquet): labelled items per page")
    ev.add_argument("--run", dest="run_ids", action="append", metavar="RUN_ID",
                    help="a run to score (repeatable; the first is the baseline of the comparison); "
                         "default: the output's current answers")
    _add_eval_options(ev)
    ev.add_argument("--key", dest="key_fields", action="append", metavar="TABLE=FIELD",
                    help="field a user extraction table's items are matched on (repeatable)")
    ev.add_argument("--s3-endpoint", help="endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL_S3)")

    add_review_parser(add)
    add_codes_parser(add)

    tiny = add("make-tiny-model", help="write a tiny random-weight VLM (text GGUF + mmproj) for tests")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--family", default="llava", help="llava, qwen2vl, qwen3vl, gemma3, internvl, minicpmv, ... "
                      "(docs: Models, model families)")
    tiny.add_argument("--reasoning", action="store_true", help="a Qwen3-style template that opens a thinking block")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def _storage(endpoint: str | None):
    """Storage for the commands that read without a run (validate, query): the endpoint flag, else the settings'."""
    from medvlm_core.settings import Settings
    from medvlm_core.storage import Storage, s3_options

    settings = Settings()
    return Storage({"s3": s3_options(endpoint_url=endpoint or settings.s3_endpoint)}, retry=settings.retry_policy())


def cmd_run(args: argparse.Namespace) -> int:
    """``medvlm run``: the batch flow over a manifest, in this process."""
    code, summary, error = run_flow(args.manifest, args.output, args.model, args.mmproj, flow_options(args))
    if error is not None:
        return fail(error, code)
    print_summary(summary)
    if code == EXIT_UNRECONCILED:
        return fail("the run's counts do not reconcile; see the runs table", code)
    return code


def cmd_validate(args: argparse.Namespace) -> int:
    """``medvlm validate``: check a manifest without loading a model."""
    from medvlm_core.errors import RunError
    from medvlm_core.inputs.manifest import read_manifest

    try:
        plan = read_manifest(args.manifest, _storage(args.s3_endpoint))
    except RunError as exc:
        return fail(str(exc))
    print(f"{args.manifest}: {plan.total_rows} rows, {plan.valid_rows} valid, {len(plan.quarantined)} would be quarantined")
    by_check: dict[str, list[dict]] = {}
    for record in plan.quarantined:
        by_check.setdefault(f"{record['column']}: {record['check']}", []).append(record)
    for check, records in sorted(by_check.items()):
        print(f"  {check} ({len(records)} rows)")
        for record in records[: args.examples]:
            print(f"    {record['reason']}")  # reasons carry row numbers, never values
    return EXIT_OK if not plan.quarantined else EXIT_UNRECONCILED


def cmd_query(args: argparse.Namespace) -> int:
    """``medvlm query``: SQL (or a built-in query) over an output's tables."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from medvlm_core.analytics import EXAMPLE_QUERIES, query
    from medvlm_core.errors import RunError

    sql = EXAMPLE_QUERIES.get(args.sql, args.sql)
    try:
        table = query(args.output, sql, _storage(args.s3_endpoint))
    except RunError as exc:
        return fail(str(exc))
    if args.format == "parquet":
        if not args.out:
            return fail("--format parquet needs --out FILE")
        pq.write_table(table, args.out)
    elif args.format == "csv":
        if args.out:
            pacsv.write_csv(table, args.out)
        else:
            sink = io.BytesIO()
            pacsv.write_csv(table, sink)
            sys.stdout.write(sink.getvalue().decode("utf-8"))
    else:
        _print_table(table)
    return EXIT_OK


def _print_table(table, limit: int = 50) -> None:
    rows = table.slice(0, limit).to_pylist()
    names = table.column_names
    cells = [[("" if r[n] is None else str(r[n]))[:40] for n in names] for r in rows]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    print("  ".join(n.ljust(w) for n, w in zip(names, widths)))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))
    print(f"({table.num_rows} rows{', first ' + str(limit) + ' shown' if table.num_rows > limit else ''})")


def cmd_eval(args: argparse.Namespace) -> int:
    """``medvlm eval``: score runs against a gold file, in this process.

    Args:
        args: the parsed command line.

    Returns:
        The exit status: 0 when the evaluation was written, 2 when it could not run (the message says why).
    """
    from medvlm_core.evals.options import EvalOptions

    options = {f: getattr(args, f) for f in EvalOptions.__pydantic_fields__ if f != "key_fields" and hasattr(args, f)}
    if args.key_fields:
        pairs = [k.split("=", 1) for k in args.key_fields]
        if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
            return fail("--key takes TABLE=FIELD")
        options["key_fields"] = dict(pairs)
    code, result, error = run_eval(args.output, args.gold, args.run_ids, options, args.s3_endpoint)
    if error is not None:
        return fail(error, code)
    print_eval(result)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medvlm`` console script."""
    args = build_parser().parse_args(argv)
    handlers = {
        "run": cmd_run, "demo": cmd_demo, "validate": cmd_validate, "query": cmd_query,
        "make-tiny-model": cmd_make_tiny_model, "eval": cmd_eval, "review": cmd_review,
        "codes": cmd_codes,
    }
    try:
        with errors_last():
            return handlers[args.command](args)
    except ModuleNotFoundError as exc:  # an environment with the core only, or Airflow's (no Prefect)
        if not (exc.name or "").split(".")[0].startswith("prefect"):
            raise
        print(f"medvlm {args.command}: needs Prefect, which this environment lacks: pip install 'medvlm[prefect]' "
              "(under Airflow, run medvlm with the medvlm.airflow operators instead)", file=sys.stderr)
        return EXIT_CANNOT_RUN


if __name__ == "__main__":
    sys.exit(main())
