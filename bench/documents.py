"""Pages per second at document scope against page scope, on the same documents, side by side in one run.

    python -m bench.documents [--model M.gguf --mmproj P.gguf | --family qwen2vl] [--docs 8] [--pages 3]
                              [--repeats 3] [--max-tokens 32] [--n-ctx 4096] [--parallel 4] [--out FILE]

Three variants over the same multi-page documents (rendered demo-like pages, ``--pages`` a document), each with
its model loaded once and untimed: page scope (one answer per page), document scope ``single_prompt`` (one prompt
holding a document's pages) and document scope ``map_reduce`` (each page, then a text-only consolidation). The
variants take turns, repeat by repeat, so the machine's slow spells fall on each alike. Runs in memory through
``MedicalVisionLLM`` (nothing is written, so map-reduce reuses no page answer). Prints one line per variant and
writes the raw figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def write_documents(folder: Path, docs: int, pages: int) -> list[dict]:
    """``docs`` multipage PDFs of ``pages`` rendered pages each; their manifest rows."""
    from medvlm_core.testing.demo_docs import render_document

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for d in range(docs):
        images = [render_document(f"Document {d + 1}, page {p + 1} of {pages}",
                                  [f"Line {i + 1}: medication {d}-{p}-{i}, 10 mg BID" for i in range(12)])
                  for p in range(pages)]
        path = folder / f"doc-{d:03d}.pdf"
        images[0].save(path, save_all=True, append_images=images[1:], resolution=118)
        rows.append({"document_id": f"doc-{d:03d}", "image_uri": str(path)})
    return rows


def main(argv=None) -> int:
    """Run the benchmark."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="qwen2vl", help="generated tiny model family when no --model is given")
    ap.add_argument("--model")
    ap.add_argument("--mmproj")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--pages", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--max-pixels", type=int, default=400_000, help="pixel budget a page")
    ap.add_argument("--out", default="bench/results/documents.json")
    args = ap.parse_args(argv)

    from medvlm_core.api import MedicalVisionLLM

    work = Path(tempfile.mkdtemp(prefix="medvlm-bench-documents-"))
    if args.model:
        model, mmproj = args.model, args.mmproj
    else:
        from medvlm_core.testing.tiny_model import make_tiny_model

        made = make_tiny_model(work / "model", family=args.family)
        model, mmproj = str(made.model_path), str(made.mmproj_path)
    manifest = write_documents(work / "documents", args.docs, args.pages)
    common = dict(max_tokens=args.max_tokens, n_ctx=args.n_ctx, n_parallel=args.parallel, temperature=0.0, seed=1,
                  max_pixels=args.max_pixels)
    variants = {
        "page scope": dict(common),
        "document, single_prompt": dict(common, scope="document", document_method="single_prompt"),
        "document, map_reduce": dict(common, scope="document", document_method="map_reduce"),
    }
    loaded = {name: MedicalVisionLLM.load(model, mmproj, **options) for name, options in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    tokens: dict[str, dict] = {}
    try:
        for vlm in loaded.values():
            vlm.transform(manifest[:1])  # warm-up, untimed
        for _ in range(args.repeats):
            for name, vlm in loaded.items():
                started = time.perf_counter()
                rows = vlm.transform(manifest).completions.to_pylist()
                times[name].append(time.perf_counter() - started)
                answers = [r for r in rows if r["status"] == "ok"]
                tokens[name] = {"answers": len(answers), "rows": len(rows),
                                "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in answers),
                                "completion_tokens": sum(r["completion_tokens"] or 0 for r in answers),
                                "methods": sorted({r["method"] for r in rows if r["method"]})}
    finally:
        for vlm in loaded.values():
            vlm.close()
    pages = args.docs * args.pages
    result = {"docs": args.docs, "pages_per_doc": args.pages, "repeats": args.repeats, "variants": {}}
    print(f"{pages} pages ({args.docs} documents of {args.pages}), {args.repeats} repeats, max_tokens "
          f"{args.max_tokens}, n_parallel {args.parallel}")
    for name in variants:
        median = statistics.median(times[name])
        result["variants"][name] = {"seconds": times[name], "pages_per_second": pages / median, **tokens[name]}
        print(f"  {name:<26} {pages / median:6.2f} pages/s  (median {median:.2f} s, "
              f"min {min(times[name]):.2f}, max {max(times[name]):.2f}); {tokens[name]['answers']} answers, "
              f"{tokens[name]['prompt_tokens']} prompt + {tokens[name]['completion_tokens']} completion tokens")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
