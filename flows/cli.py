"""The ``medvlm`` command line: ``run``, ``demo`` and ``make-tiny-model``.

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
from pathlib import Path
from typing import Any, Sequence

EXIT_OK, EXIT_UNRECONCILED, EXIT_CANNOT_RUN = 0, 1, 2
# Names of the example queries (medvlm_core.analytics.EXAMPLE_QUERIES), listed without importing DuckDB.
EXAMPLES = ("medications_per_diagnosis", "conditional_instructions", "errors_by_type", "throughput_per_run")


def _prefect_defaults() -> None:
    """Settings that make the first run work offline; set before Prefect is imported, never overriding."""
    # A fresh ephemeral server needs more than Prefect's 20 s default to migrate its database.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    from medvlm_core.config import EngineConfig, GenerationParams, ImageOptions

    g = GenerationParams()
    p.add_argument("--prompt-id", help="prompt of the library (default clinical_analysis)")
    p.add_argument("--prompt", help="free prompt text for every row (rows may still set their own)")
    p.add_argument("--max-tokens", type=int, default=g.max_tokens)
    p.add_argument("--temperature", type=float, default=g.temperature)
    p.add_argument("--top-p", type=float, default=g.top_p)
    p.add_argument("--top-k", type=int, default=g.top_k)
    p.add_argument("--min-p", type=float, default=g.min_p)
    p.add_argument("--repeat-penalty", type=float, default=g.repeat_penalty)
    p.add_argument("--seed", type=int, default=g.seed)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--n-gpu-layers", type=int, default=EngineConfig.n_gpu_layers, help="-1 = all layers")
    p.add_argument("--n-ctx", type=int, default=EngineConfig.n_ctx)
    p.add_argument("--n-threads", type=int, default=None)
    p.add_argument("--n-parallel", type=int, default=EngineConfig.n_parallel,
                   help="documents decoded together in one batch (n-ctx is then per document)")
    p.add_argument("--image-min-tokens", type=int, help="vision encoder: at least this many tokens per page")
    p.add_argument("--image-max-tokens", type=int, help="vision encoder: at most this many tokens per page")
    p.add_argument("--no-overlap-encode", dest="overlap_encode", action="store_false",
                   help="with --n-parallel: encode images inline instead of on a second thread ahead of the decode")
    p.add_argument("--no-flash-attn", dest="flash_attn", action="store_false",
                   help="turn flash attention off (text model and vision encoder)")
    p.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="run llama.cpp in this process (a native crash then ends the run) instead of a supervised child")
    p.add_argument("--chat-format", default=None, help="override the chat format picked from the model")
    p.add_argument("--max-pixels", type=int, default=ImageOptions.max_pixels, help="pixel budget per page image")
    p.add_argument("--pdf-dpi", type=int, default=ImageOptions.pdf_dpi)
    p.add_argument("--max-bytes", type=int, default=ImageOptions.max_bytes, help="limit: bytes per document file")
    p.add_argument("--max-source-pixels", type=int, default=ImageOptions.max_source_pixels,
                   help="limit: pixels per source page (decompression-bomb guard)")
    p.add_argument("--max-pages", type=int, default=ImageOptions.max_pages, help="limit: pages per document")
    p.add_argument("--chunk-size", type=int, default=None, help="manifest rows per inference task")
    p.add_argument("--model-sha256", help="expected sha256 of --model (refused on mismatch)")
    p.add_argument("--mmproj-sha256", help="expected sha256 of --mmproj (refused on mismatch)")
    p.add_argument("--s3-endpoint", help="endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL_S3)")
    p.add_argument("--credentials-block", help="Prefect Secret block holding S3 credentials as JSON")
    p.add_argument("--force", action="store_true", help="re-run pages that already have an ok result in the output")
    p.add_argument("--mode", choices=["text", "structured"], default="text",
                   help="structured: schema-constrained JSON into diagnoses/medications/instructions tables")
    p.add_argument("--extraction", help="your own extraction: JSON file with prompt_id, prompt and a JSON schema")
    p.add_argument("--sse", choices=["AES256", "aws:kms"], help="server-side encryption of what the run writes to S3")
    p.add_argument("--sse-kms-key-id", help="KMS key for --sse aws:kms")
    p.add_argument("--allow", action="append", dest="allowed_locations", default=None,
                   help="allowed S3 prefix or local root (repeatable); documents elsewhere are quarantined")


def _flow_params(args: argparse.Namespace) -> dict[str, Any]:
    prompt_id = args.prompt_id
    if args.mode == "structured" and not prompt_id and not args.extraction:
        prompt_id = "clinical_extraction"
    return dict(
        prompt_id=prompt_id, prompt=args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed,
        stop=args.stop, n_gpu_layers=args.n_gpu_layers, n_ctx=args.n_ctx, n_threads=args.n_threads,
        n_parallel=args.n_parallel, image_min_tokens=args.image_min_tokens, image_max_tokens=args.image_max_tokens,
        overlap_encode=args.overlap_encode, flash_attn=args.flash_attn,
        isolate=args.isolate, chat_format=args.chat_format, max_pixels=args.max_pixels, pdf_dpi=args.pdf_dpi, max_bytes=args.max_bytes,
        max_source_pixels=args.max_source_pixels, max_pages=args.max_pages, chunk_size=args.chunk_size,
        model_sha256=args.model_sha256, mmproj_sha256=args.mmproj_sha256, s3_endpoint=args.s3_endpoint,
        credentials_block=args.credentials_block, force=args.force, extraction=args.extraction,
        allowed_locations=args.allowed_locations, sse=args.sse, sse_kms_key_id=args.sse_kms_key_id,
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``medvlm`` command."""
    parser = argparse.ArgumentParser(prog="medvlm", description="Clinical document images -> VLM -> Parquet tables.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the batch flow over a manifest")
    run.add_argument("--manifest", required=True, help="manifest URI (.csv, .jsonl or .parquet)")
    run.add_argument("--output", required=True, help="output folder URI for the Parquet tables")
    run.add_argument("--model", required=True, help="text model GGUF, or a .zip holding model and mmproj (path or s3://)")
    run.add_argument("--mmproj", help="vision projector (mmproj) GGUF (path or s3://)")
    _add_run_options(run)

    demo = sub.add_parser("demo", help="render synthetic documents and run the whole flow on them")
    demo.add_argument("--workdir", default="./medvlm-demo")
    demo.add_argument("--model", help="text model GGUF (default: generate the tiny random model)")
    demo.add_argument("--mmproj", help="vision projector GGUF (with --model)")
    demo.add_argument("--family", default="llava", help="tiny model family when generating (llava, qwen2vl)")
    demo.add_argument("--max-tokens", type=int, default=48)
    demo.add_argument("--s3", action="store_true",
                      help="start a local S3 server (SeaweedFS) and run from s3:// to s3://")

    validate = sub.add_parser("validate", help="check a manifest (no model is loaded); non-zero if rows would be quarantined")
    validate.add_argument("manifest", help="manifest URI (.csv, .jsonl or .parquet)")
    validate.add_argument("--s3-endpoint", help="endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL_S3)")
    validate.add_argument("--examples", type=int, default=3, help="problems shown per check")

    q = sub.add_parser("query", help="run SQL (DuckDB) over the output tables")
    q.add_argument("sql", help="SQL over the views completions, runs, quarantine, diagnoses, medications, "
                              "instructions, ...; or an example name: " + ", ".join(EXAMPLES))
    q.add_argument("--output", required=True, help="the output folder or s3:// prefix of medvlm runs")
    q.add_argument("--format", choices=["table", "csv", "parquet"], default="table")
    q.add_argument("--out", help="file to write (csv, parquet); default: standard output for table/csv")
    q.add_argument("--s3-endpoint", help="endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL_S3)")

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random-weight VLM (text GGUF + mmproj) for tests")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--family", default="llava")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def run_flow(**params: Any) -> tuple[int, dict | None, str | None]:
    """Run the batch flow in-process. Returns (exit status, summary or None, error message or None)."""
    _prefect_defaults()
    from flows.batch import medvlm_batch

    state = medvlm_batch(return_state=True, **params)
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


def cmd_run(args: argparse.Namespace) -> int:
    code, summary, error = run_flow(
        manifest=args.manifest, output=args.output, model=args.model, mmproj=args.mmproj, **_flow_params(args)
    )
    if error is not None:
        print(f"medvlm: error: {error}", file=sys.stderr)
        return code
    print_summary(summary)
    if code == EXIT_UNRECONCILED:
        print("medvlm: error: the run's counts do not reconcile; see the runs table", file=sys.stderr)
    return code


def cmd_validate(args: argparse.Namespace) -> int:
    from medvlm_core.errors import RunError
    from medvlm_core.manifest import read_manifest
    from medvlm_core.storage import Storage, s3_options

    try:
        plan = read_manifest(args.manifest, Storage({"s3": s3_options(endpoint_url=args.s3_endpoint)}))
    except RunError as exc:
        print(f"medvlm: error: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    print(f"{args.manifest}: {plan.total_rows} rows, {len(plan.rows)} valid, {len(plan.quarantined)} would be quarantined")
    by_check: dict[str, list[dict]] = {}
    for record in plan.quarantined:
        by_check.setdefault(f"{record['column']}: {record['check']}", []).append(record)
    for check, records in sorted(by_check.items()):
        print(f"  {check} ({len(records)} rows)")
        for record in records[: args.examples]:
            print(f"    {record['reason']}")  # reasons carry row numbers, never values
    return EXIT_OK if not plan.quarantined else EXIT_UNRECONCILED


def cmd_query(args: argparse.Namespace) -> int:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from medvlm_core.analytics import EXAMPLE_QUERIES, query
    from medvlm_core.errors import RunError
    from medvlm_core.storage import Storage, s3_options

    sql = EXAMPLE_QUERIES.get(args.sql, args.sql)
    try:
        table = query(args.output, sql, Storage({"s3": s3_options(endpoint_url=args.s3_endpoint)}))
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


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from medvlm_core.tiny_model import make_tiny_model

    try:
        model = make_tiny_model(args.out, family=args.family, seed=args.seed)
    except ValueError as exc:
        print(f"medvlm: error: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    print(f"model:  {model.model_path}\nmmproj: {model.mmproj_path}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from medvlm_core.demo_docs import write_demo_documents
    from medvlm_core.tiny_model import make_tiny_model

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
    params = dict(manifest=str(manifest), output=str(workdir / "output"), model=model, mmproj=mmproj,
                  max_tokens=args.max_tokens, n_ctx=4096, force=True)  # a demo re-run shows fresh rows
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
    if not args.s3:
        print(f"Query the tables: duckdb -c \"select * from read_parquet('{workdir}/output/completions/*/*.parquet', "
              "hive_partitioning=true)\"")
    return code


def _demo_on_s3(workdir: Path, params: dict) -> tuple[int, dict | None, str | None]:
    """Start SeaweedFS on loopback, upload documents, manifest and model, run s3:// -> s3://, stop it."""
    import s3fs

    from medvlm_core.s3_server import LocalS3Server

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
        "make-tiny-model": cmd_make_tiny_model,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
