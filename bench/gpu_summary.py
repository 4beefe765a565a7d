"""One table from bench/gpu.sh's bench.run reports (one JSON per number of new tokens).

    python -m bench.gpu_summary [--mode gpu|cpu] [--out gpu.json] gpu-128.json gpu-512.json

Rows: the naive loop, llama-server and the engine (per encoder contexts) at each parallelism; per report: pages/s,
and the engine's speed-up over the naive loop and over llama-server at the same parallelism (the issue's goals:
>= 3x naive, >= 2x llama-server).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def rows_of(report: dict) -> dict[tuple[str, int], dict]:
    """The report's naive, server and engine results keyed by (label, parallel).

    Args:
        report: one bench.run JSON report.

    Returns:
        ``{(label, parallel): result}``; labels ``naive``, ``llama-server``, ``engine enc=N``.
    """
    out = {}
    for r in report["results"]:
        if r["path"] == "naive":
            out[("naive", 1)] = r
        elif r["path"] == "server":
            out[("llama-server", r["parallel"])] = r
        elif r["path"] == "engine" and r.get("overlap"):
            out[(f"engine enc={r.get('encode_workers', 1)}", r["parallel"])] = r
    return out


def summarize(reports: list[dict]) -> dict:
    """The combined table: one entry per (label, parallel), with each report's figures by its max_tokens.

    Args:
        reports: bench.run reports of the same model and pages at different ``max_tokens``.

    Returns:
        ``{"settings": [...], "rows": [{"label", "parallel", "by_tokens": {tokens: {...}}}]}``.
    """
    table: dict[tuple[str, int], dict] = {}
    for report in reports:
        tokens = report["settings"]["max_tokens"]
        for key, r in rows_of(report).items():
            entry = table.setdefault(key, {"label": key[0], "parallel": key[1], "by_tokens": {}})
            entry["by_tokens"][str(tokens)] = {k: r.get(k) for k in
                                               ("docs", "docs_per_s", "gen_tok_per_s", "encode_ms_per_page", "x_naive", "x_server")}
    order = {"naive": 0, "llama-server": 1}
    rows = sorted(table.values(), key=lambda e: (e["parallel"], order.get(e["label"], 2), e["label"]))
    return {"settings": [r["settings"] | {"commit": r.get("commit"), "machine": r.get("machine"), "model": r.get("model")}
                         for r in reports], "rows": rows}


def render(summary: dict) -> str:
    """The table as text.

    Args:
        summary: ``summarize``'s result.

    Returns:
        One line per row: pages/s, x naive and x server for each number of new tokens.
    """
    tokens = [str(s["max_tokens"]) for s in summary["settings"]]
    head = f"{'path':<16} {'par':>4}" + "".join(f" | {t + ' tok: pages/s':>18} {'x naive':>8} {'x server':>8}" for t in tokens)
    lines = [head, "-" * len(head)]
    for row in summary["rows"]:
        cells = ""
        for t in tokens:
            r = row["by_tokens"].get(t)
            if r is None:
                cells += f" | {'-':>18} {'-':>8} {'-':>8}"
                continue
            xs = f"{r['x_server']:.2f}" if r.get("x_server") is not None else "-"
            cells += f" | {r['docs_per_s']:>18.3f} {r['x_naive']:>8.2f} {xs:>8}"
        lines.append(f"{row['label']:<16} {row['parallel']:>4}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the table and write the combined JSON.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--mode", choices=["gpu", "cpu"], default="gpu")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    summary = summarize([json.loads(Path(p).read_text()) for p in args.reports])
    summary["mode"] = args.mode
    if args.mode == "cpu":
        print("CPU quick mode: a generated tiny model and a few pages; it proves the script, not GPU speed")
    print(render(summary))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
