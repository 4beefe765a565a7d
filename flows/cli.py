"""The ``medvlm`` command line: ``run``, ``demo``, ``validate``, ``query``, ``eval`` and ``make-tiny-model``.

``medvlm run`` executes the ``medvlm-batch`` Prefect flow in this process (an ephemeral Prefect server
when PREFECT_API_URL is not set). Exit status: 0 when every manifest row is accounted for, 1 when the
run finished but the counts do not reconcile, 2 when the run cannot start (the message says why).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence

EXIT_OK, EXIT_UNRECONCILED, EXIT_CANNOT_RUN = 0, 1, 2
# Names of the example queries (medvlm_core.analytics.EXAMPLE_QUERIES), listed without importing DuckDB.
EXAMPLES = ("medications_per_diagnosis", "conditional_instructions", "errors_by_type", "still_failing", "document_status",
            "throughput_per_run")


def _prefect_defaults() -> None:
    """Settings that make the first run work offline; set before Prefect is imported, never overriding."""
    # A fresh ephemeral server needs more than Prefect's 20 s default to migrate its database.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


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


def _flow_options(args: argparse.Namespace) -> dict[str, Any]:
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
    demo.add_argument("--family", default="llava", help="tiny model family when generating (see README: Model families)")
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

    tiny = add("make-tiny-model", help="write a tiny random-weight VLM (text GGUF + mmproj) for tests")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--family", default="llava", help="llava, qwen2vl, qwen3vl, gemma3, internvl, minicpmv, ... "
                      "(README: Model families)")
    tiny.add_argument("--reasoning", action="store_true", help="a Qwen3-style template that opens a thinking block")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def run_flow(manifest: str, output: str, model: str, mmproj: str | None, options: dict[str, Any]) -> tuple[int, dict | None, str | None]:
    """Run the batch flow in-process.

    Args:
        manifest: the manifest URI.
        output: the output URI.
        model: the model URI.
        mmproj: the mmproj URI.
        options: run options by their (flat) names.

    Returns:
        ``(exit status, summary or None, error message or None)``.
    """
    _prefect_defaults()
    from medvlm.flows.batch import medvlm_batch

    state = medvlm_batch(manifest=manifest, output=output, model=model, mmproj=mmproj, options=options, return_state=True)
    if not state.is_completed():
        return EXIT_CANNOT_RUN, None, state.message or "the run failed"
    summary = state.result()
    return (EXIT_OK if summary["reconciled"] else EXIT_UNRECONCILED), summary, None


def print_summary(summary: dict, out=sys.stdout) -> None:
    """Counts and locations of a finished run (no document data)."""
    print(f"run {summary['run_id']}: {summary['manifest_rows']} manifest rows -> "
          f"{summary['pages_ok']} ok pages, {summary['pages_error']} error pages, "
          f"{summary['quarantined_rows']} quarantined, {summary['skipped_rows']} skipped "
          f"({summary['skipped_pages']} pages already done); "
          f"reconciled={summary['reconciled']}", file=out)
    if summary["error_types"]:
        print("errors by type: " + ", ".join(f"{k}={v}" for k, v in summary["error_types"].items()), file=out)
    print(f"throughput: {summary['pages_per_second']:.2f} pages/s, "
          f"{summary['completion_tokens_per_second']:.1f} completion tokens/s over {summary['wall_seconds']:.1f} s", file=out)
    for table, url in summary["published"].items():
        print(f"  {table}: {url}", file=out)


def _storage(endpoint: str | None):
    """Storage for the commands that read without a run (validate, query): the endpoint flag, else the settings'."""
    from medvlm_core.settings import Settings
    from medvlm_core.storage import Storage, s3_options

    settings = Settings()
    return Storage({"s3": s3_options(endpoint_url=endpoint or settings.s3_endpoint)}, retry=settings.retry_policy())


def cmd_run(args: argparse.Namespace) -> int:
    """``medvlm run``: the batch flow over a manifest, in this process."""
    code, summary, error = run_flow(args.manifest, args.output, args.model, args.mmproj, _flow_options(args))
    if error is not None:
        print(f"medvlm: error: {error}", file=sys.stderr)
        return code
    print_summary(summary)
    if code == EXIT_UNRECONCILED:
        print("medvlm: error: the run's counts do not reconcile; see the runs table", file=sys.stderr)
    return code


def cmd_validate(args: argparse.Namespace) -> int:
    """``medvlm validate``: check a manifest without loading a model."""
    from medvlm_core.errors import RunError
    from medvlm_core.inputs.manifest import read_manifest

    try:
        plan = read_manifest(args.manifest, _storage(args.s3_endpoint))
    except RunError as exc:
        print(f"medvlm: error: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
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
        print(f"medvlm: error: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    if args.format == "parquet":
        if not args.out:
            print("medvlm: error: --format parquet needs --out FILE", file=sys.stderr)
            return EXIT_CANNOT_RUN
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


def run_eval(output: str, gold: str, run_ids: list[str] | None, eval_options: dict[str, Any],
             s3_endpoint: str | None = None) -> tuple[int, dict | None, str | None]:
    """Run the eval flow in-process.

    Args:
        output: the output URI.
        gold: the gold file's URI.
        run_ids: the runs to score (None: the current answers).
        eval_options: evaluation options by name.
        s3_endpoint: endpoint of an S3-compatible store.

    Returns:
        ``(exit status, the flow's result or None, error message or None)``.
    """
    _prefect_defaults()
    from medvlm.flows.eval import medvlm_eval

    options = {"s3_endpoint": s3_endpoint} if s3_endpoint else None
    state = medvlm_eval(output=output, gold=gold, run_ids=run_ids, options=options, eval_options=eval_options,
                        return_state=True)
    if not state.is_completed():
        return EXIT_CANNOT_RUN, None, state.message or "the evaluation failed"
    return EXIT_OK, state.result(), None


def print_eval(result: dict, out=None) -> None:
    """The headline scores of an evaluation and where its tables and report are (no document data).

    Args:
        result: what the ``medvlm-eval`` flow returned.
        out: where to print (default: standard output).
    """
    out = out or sys.stdout

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    width = max([len("run")] + [len(r["system"]) for r in result["headline"]])
    print(f"eval {result['eval_id']}", file=out)
    print(f"{'run':<{width}} {'table':<13} {'precision':>9} {'recall':>7} {'F1':>6} {'95% CI':>13} {'gold':>5} "
          f"{'no answer':>9}", file=out)
    for r in result["headline"]:
        ci = "-" if r["ci_low"] is None else f"{r['ci_low']:.2f} to {r['ci_high']:.2f}"
        print(f"{r['system']:<{width}} {r['table'][:13]:<13} {fmt(r['precision']):>9} {fmt(r['recall']):>7} "
              f"{fmt(r['f1']):>6} {ci:>13} {r['gold_items']:>5} {r['pages_without_answer']:>9}", file=out)
    for c in result["comparisons"]:
        if c["table"] == "all":
            diff = "-" if c["difference"] is None else f"{c['difference']:+.3f}"
            ci = "" if c["ci_low"] is None else f" (95% CI {c['ci_low']:+.3f} to {c['ci_high']:+.3f})"
            print(f"{c['system']} vs {c['baseline']}: {c['metric']} {diff}{ci}", file=out)
    for label, n in result["review_rows"].items():
        print(f"{label}: {n} rows to review", file=out)
    for note in result["notes"]:
        print(f"note: {note}", file=out)
    for name, url in result["written"].items():
        print(f"  {name}: {url}", file=out)


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
            print("medvlm: error: --key takes TABLE=FIELD", file=sys.stderr)
            return EXIT_CANNOT_RUN
        options["key_fields"] = dict(pairs)
    code, result, error = run_eval(args.output, args.gold, args.run_ids, options, args.s3_endpoint)
    if error is not None:
        print(f"medvlm: error: {error}", file=sys.stderr)
        return code
    print_eval(result)
    return code


def _have_demo_extra() -> bool:
    """Whether the development tools' dependencies are installed (else say how to get them)."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        print("medvlm: error: this command needs the demo extra: pip install 'medvlm[demo]'", file=sys.stderr)
        return False
    return True


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    """``medvlm make-tiny-model``: write a tiny random-weight VLM for tests."""
    if not _have_demo_extra():
        return EXIT_CANNOT_RUN
    from medvlm_core.testing.tiny_model import make_tiny_model

    try:
        model = make_tiny_model(args.out, family=args.family, seed=args.seed, reasoning=args.reasoning)
    except ValueError as exc:
        print(f"medvlm: error: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    print(f"model:  {model.model_path}\nmmproj: {model.mmproj_path}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """``medvlm demo``: synthetic documents through the whole flow (a generated tiny model by default)."""
    if not _have_demo_extra():
        return EXIT_CANNOT_RUN
    from medvlm_core.testing.demo_docs import write_demo_documents
    from medvlm_core.testing.tiny_model import make_tiny_model

    if args.model and not args.mmproj:
        print("medvlm: error: --model needs --mmproj", file=sys.stderr)
        return EXIT_CANNOT_RUN
    workdir = Path(args.workdir).resolve()
    records = write_demo_documents(workdir / "documents")
    manifest = workdir / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    tiny = args.model is None
    if tiny:
        made = make_tiny_model(workdir / "model", family=args.family)
        model, mmproj = str(made.model_path), str(made.mmproj_path)
    else:
        model, mmproj = args.model, args.mmproj
    print(f"demo: {len(records)} synthetic documents and a manifest in {workdir}")
    max_tokens = args.max_tokens or (256 if args.mode == "structured" else 48)
    options: dict[str, Any] = dict(max_tokens=max_tokens, n_ctx=4096, force=True)  # a re-run shows fresh rows
    if args.mode == "structured":
        options["prompt_id"] = "clinical_extraction"
    params = dict(manifest=str(manifest), output=str(workdir / "output"), model=model, mmproj=mmproj, options=options)
    if args.s3:
        code, summary, error = _demo_on_s3(workdir, params)
    else:
        code, summary, error = run_flow(**params)
        if summary:
            print()
            print_summary(summary)
            _print_demo_rows(summary["published"]["completions"])
    if error is not None:
        print(f"medvlm: error: {error}", file=sys.stderr)
        return code
    print()
    if tiny:
        print("Note: the model is a tiny random-weight model generated for this demo; its text is meaningless.")
        print("Point the demo at a real VLM to get real answers, for example:")
        print("  medvlm demo --model Qwen2.5-VL-7B-Instruct-Q4_K_M.gguf --mmproj mmproj-Qwen2.5-VL-7B-Instruct-f16.gguf")
    if args.mode == "structured" and not args.s3 and summary:
        code = max(code, _demo_eval(workdir, summary["run_id"], tiny))
    if not args.s3:
        print(f"Query the tables: medvlm query errors_by_type --output {workdir / 'output'}")
        print(f"  or any SQL:    medvlm query \"select status, count(*) from completions group by status\" "
              f"--output {workdir / 'output'}")
    return code


def _demo_eval(workdir: Path, run_id: str, tiny: bool) -> int:
    """Score the demo run against the demo documents' gold labels and say where the report is."""
    from medvlm_core.testing.demo_docs import write_demo_gold

    gold = write_demo_gold(workdir / "gold.csv")
    print()
    print(f"demo: scoring the run against the demo documents' gold labels ({gold})")
    code, result, error = run_eval(str(workdir / "output"), str(gold), [run_id], {})
    if error is not None:
        print(f"medvlm: error: {error}", file=sys.stderr)
        return code
    print_eval(result)
    if tiny:
        print("The scores are near zero, as they should be: the tiny random model extracts nothing meaningful. "
              "A real VLM scores here what it gets right.")
    print(f"Open the report in a browser: {result['written']['report']}")
    print(f"Score again or compare runs: medvlm eval --output {workdir / 'output'} --gold {gold} --run RUN_ID --run RUN_ID")
    return EXIT_OK


def _demo_on_s3(workdir: Path, params: dict) -> tuple[int, dict | None, str | None]:
    """Start SeaweedFS on loopback, upload documents, manifest and model, run s3:// -> s3://, stop it."""
    import s3fs

    from medvlm_core.testing.s3_server import LocalS3Server

    bucket = "medvlm-demo"
    with LocalS3Server(workdir / "s3") as server:
        print(f"demo: local S3 server (SeaweedFS) at {server.endpoint_url}, bucket {bucket}")
        server.create_bucket(bucket)
        os.environ.update(server.env())  # the standard AWS variables, as on a real deployment
        fs = s3fs.S3FileSystem(**server.storage_options())
        prefix = f"s3://{bucket}"
        fs.put(str(workdir / "documents"), f"{prefix}/incoming/documents", recursive=True)
        fs.put(params["manifest"], f"{prefix}/incoming/manifest.csv")
        fs.put(params["model"], f"{prefix}/models/{Path(params['model']).name}")
        fs.put(params["mmproj"], f"{prefix}/models/{Path(params['mmproj']).name}")
        params = dict(params, manifest=f"{prefix}/incoming/manifest.csv", output=f"{prefix}/output",
                      model=f"{prefix}/models/{Path(params['model']).name}",
                      mmproj=f"{prefix}/models/{Path(params['mmproj']).name}")
        code, summary, error = run_flow(**params)
        if summary:
            print()
            print_summary(summary)
            _print_demo_rows(summary["published"]["completions"], fs)
            print(f"\nThe S3 server stops when the demo ends; its data stays in {workdir / 's3'}.")
    return code, summary, error


def _print_demo_rows(completions_url: str, filesystem=None) -> None:
    import pyarrow.parquet as pq

    path = completions_url.replace("s3://", "") if filesystem is not None else completions_url
    table = pq.read_table(path, filesystem=filesystem).to_pylist()
    print()
    print(f"{'document_id':<16} {'page':>4} {'status':<6} {'tokens':>6} {'ms':>7}  completion (first 50 chars)")
    for r in table:
        text = (r["completion"] or r["error_type"] or "").replace("\n", " ")[:50]
        print(f"{r['document_id']:<16} {r['page'] or '':>4} {r['status']:<6} {r['completion_tokens'] or 0:>6} "
              f"{r['latency_ms'] or 0:>7.0f}  {text}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medvlm`` console script."""
    args = build_parser().parse_args(argv)
    handlers = {
        "run": cmd_run, "demo": cmd_demo, "validate": cmd_validate, "query": cmd_query,
        "make-tiny-model": cmd_make_tiny_model, "eval": cmd_eval,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
