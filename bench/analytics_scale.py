"""Analytics at scale: the current views and the document status over a long synthetic history.

    python -m bench.analytics_scale [--runs 365] [--new-pages 1800] [--repeat 3] [--bloom] [--dir DIR] [--out FILE.json]

Writes a completions history in the real output layout (``completions/run_date=.../part-<run_id>.parquet``
plus ``runs`` and ``quarantine``), with pyarrow directly (no model, no Prefect), ~1M rows by default:

* every run (one a day) adds ``--new-pages`` pages of new documents (1 to 3 pages each; document ids are
  hashes, so their order in the files says nothing: no min/max statistics can skip a file for a document);
  90% ok, 7% error, 3% truncated; 1% of new documents are missing (one document-level ``not_found`` row);
* every current error is retried by the next run (same result key): half are fixed, half fail again; a
  missing file arrives with probability 1/2 per run;
* every 30th run is a ``--force`` re-run of 20,000 earlier pages (same keys); every 90th run a model change
  re-runs 10,000 earlier pages (new keys), 2% of which fail.

Then times, each on a fresh DuckDB connection (median and fastest of ``--repeat``; connecting included): a
plain scan of the history, the current completions, ``errors_by_type``, the document status of all documents,
and of one document (through the view with a WHERE, whose filter DuckDB pushes into every scan, and through
``analytics.document_status``, which reads the document's rows once and needs no current view).
With ``--bloom`` the completions files carry a Parquet Bloom filter on ``document_id``.
Prints a table and, with --out, writes JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from medvlm_core import analytics
from medvlm_core.output.results import COMPLETIONS_SCHEMA, QUARANTINE_SCHEMA, RUNS_SCHEMA
from medvlm_core.storage import Storage

START = datetime(2026, 1, 1, 2, 0, tzinfo=timezone.utc)
ERROR_TYPES = ("inference_error", "context_overflow", "unreadable_image")
PARAMS = '{"chat_format":"qwen2.5-vl","generation":{"max_tokens":768,"seed":0,"temperature":0.0},"max_pixels":1003520,"pdf_dpi":150}'


def rss_mb() -> float:
    """Peak resident memory of this process, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _key(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()


def synthesize(output: Path, runs: int = 365, new_pages: int = 1800, seed: int = 0, bloom: bool = False) -> dict:
    """Write the synthetic history under ``output``.

    Args:
        output: the output folder to create.
        runs: number of runs (one per day).
        new_pages: pages of new documents per run (about).
        seed: random seed.
        bloom: write a Parquet Bloom filter on ``completions.document_id`` (DuckDB then skips the files that
            cannot hold a document; medvlm's writer does not write one today).

    Returns:
        Counts: rows, runs, documents, slots (document, prompt, page), current_rows expected by the rule.
    """
    rng = random.Random(seed)
    # state per page slot: (document, page) -> (key, status); the document-level rows of missing files
    # are tracked in ``missing`` (document -> key)
    state: dict[tuple[str, int], tuple[str, str]] = {}
    failing: set[tuple[str, int]] = set()
    pages_of: dict[str, int] = {}
    missing: dict[str, str] = {}
    model = "m1"
    total = 0
    documents = 0
    for r in range(runs):
        run_id = f"{(START + timedelta(days=r)).strftime('%Y%m%dT%H%M%S')}-{r:04d}"
        run_day = START + timedelta(days=r)
        rows: list[tuple] = []  # (document_id, page, key, status, error_type)

        def record(doc: str, page: int, key: str, status: str, error: str | None, current: bool = True) -> None:
            rows.append((doc, page, key, status, error))
            if current:
                state[(doc, page)] = (key, status)
                (failing.add if status == "error" else failing.discard)((doc, page))

        def attempt(doc: str, page: int, key: str, fail_rate: float) -> None:
            u = rng.random()
            if u < fail_rate:
                record(doc, page, key, "error", rng.choice(ERROR_TYPES))
            elif u < fail_rate + 0.03:
                record(doc, page, key, "truncated", None)
            else:
                record(doc, page, key, "ok", None)

        # retries of yesterday's errors (same keys: half fixed, half fail again), and missing files
        for doc, page in sorted(failing):
            key = state[(doc, page)][0]
            if rng.random() < 0.5:
                record(doc, page, key, "ok", None)
            else:
                record(doc, page, key, "error", rng.choice(ERROR_TYPES))
        for doc, key in sorted(missing.items()):
            if rng.random() < 0.5:  # the file arrived
                del missing[doc]
                for p in range(1, pages_of[doc] + 1):
                    attempt(doc, p, _key(doc, p, model), 0.07)
            else:
                rows.append((doc, None, key, "error", "not_found"))
        # new documents
        made = 0
        while made < new_pages:
            documents += 1
            doc = "D" + _key("doc", documents)[:15]
            n = rng.choice((1, 1, 2, 3))
            pages_of[doc] = n
            made += n
            if rng.random() < 0.01:
                missing[doc] = _key(doc, None, model)
                rows.append((doc, None, missing[doc], "error", "not_found"))
                continue
            for p in range(1, n + 1):
                attempt(doc, p, _key(doc, p, model), 0.07)
        # a --force re-run (same keys: the new row is current, ok or not) and a model change (new keys: a
        # failure does not displace an ok answer)
        if r and r % 30 == 0:
            for doc, page in rng.sample(sorted(state), min(20_000, len(state))):
                ok = rng.random() < 0.95
                record(doc, page, state[(doc, page)][0], "ok" if ok else "error", None if ok else "inference_error")
        if r and r % 90 == 0:
            model = f"m{r}"
            for doc, page in rng.sample(sorted(state), min(10_000, len(state))):
                ok = rng.random() < 0.98
                record(doc, page, _key(doc, page, model), "ok" if ok else "error", None if ok else "context_overflow",
                       current=ok or state[(doc, page)][1] != "ok")
        _write_run(output, run_id, run_day, rows, rng, bloom)
        total += len(rows)
    # expected current rows: one per page slot, plus the document-level rows of files still missing
    current = len(state) + len(missing)
    return {"rows": total, "runs": runs, "documents": documents, "current_rows": current}


def _write_run(output: Path, run_id: str, day: datetime, rows: list[tuple], rng: random.Random, bloom: bool) -> None:
    n = len(rows)
    base = [day + timedelta(microseconds=i * 1000) for i in range(n)]
    columns = {
        "run_id": [run_id] * n,
        "result_key": [r[2] for r in rows],
        "document_id": [r[0] for r in rows],
        "page": [r[1] for r in rows],
        "page_count": [None if r[1] is None else 3 for r in rows],
        "manifest_row": list(range(1, n + 1)),
        "image_uri": [f"s3://records/{day:%Y-%m-%d}/{r[0]}.pdf" for r in rows],
        "image_sha256": [None if r[1] is None else r[2][:64] for r in rows],
        "image_format": [None if r[1] is None else "PDF" for r in rows],
        "image_width": [None if r[1] is None else 1240 for r in rows],
        "image_height": [None if r[1] is None else 1754 for r in rows],
        "patient_id": [f"P{rng.randrange(10**7):07d}" for _ in rows],
        "encounter_id": [f"E{rng.randrange(10**8):08d}" for _ in rows],
        "prompt_id": ["clinical_analysis"] * n,
        "prompt_sha256": [_key("prompt")] * n,
        "model_name": ["qwen2.5-vl-7b-instruct-q4_k_m"] * n,
        "model_sha256": [_key("model")] * n,
        "mmproj_sha256": [_key("mmproj")] * n,
        "chat_format": ["qwen2.5-vl"] * n,
        "params_json": [PARAMS] * n,
        "completion": [
            None if r[3] == "error" else f"Diagnoses: condition {rng.randrange(5000)}; medications: drug "
            f"{rng.randrange(3000)} {rng.randrange(1, 1000)} mg {rng.choice(('BID', 'TID', 'QD'))}; follow-up in "
            f"{rng.randrange(1, 12)} weeks. " * 3 for r in rows
        ],
        "finish_reason": [None if r[3] == "error" else ("length" if r[3] == "truncated" else "stop") for r in rows],
        "prompt_tokens": [None if r[3] == "error" else 1400 for r in rows],
        "completion_tokens": [None if r[3] == "error" else rng.randrange(50, 768) for r in rows],
        "fetch_ms": [rng.random() * 50 for _ in rows],
        "preprocess_ms": [rng.random() * 30 for _ in rows],
        "latency_ms": [None if r[3] == "error" else rng.random() * 9000 for r in rows],
        "status": [r[3] for r in rows],
        "error_type": [r[4] for r in rows],
        "error_message": [None if r[4] is None else f"{r[0]}: {r[4]}" for r in rows],
        "created_at": base,
    }
    for name in COMPLETIONS_SCHEMA.names:  # columns this harness does not fill (added since) stay null
        columns.setdefault(name, [None] * n)
    table = pa.table({name: columns[name] for name in COMPLETIONS_SCHEMA.names}, schema=COMPLETIONS_SCHEMA)
    date = day.strftime("%Y-%m-%d")
    path = _part(output, "completions", date, run_id)
    options = {"bloom_filter_options": {"document_id": {"ndv": n, "fpp": 0.01}}} if bloom else {}
    pq.write_table(table, path, compression="zstd", **options)
    ok = sum(1 for r in rows if r[3] == "ok")
    run = {name: None for name in RUNS_SCHEMA.names} | {
        "run_id": run_id, "status": "completed", "started_at": day, "finished_at": day + timedelta(hours=1),
        "manifest_uri": f"s3://records/{date}/manifest.csv", "pages_ok": ok, "pages_error": n - ok,
        "reconciled": True, "params_json": PARAMS,
    }
    path = _part(output, "runs", date, run_id)
    pq.write_table(pa.Table.from_pylist([run], schema=RUNS_SCHEMA), path)
    quarantine = [{name: None for name in QUARANTINE_SCHEMA.names} | {
        "run_id": run_id, "manifest_uri": f"s3://records/{date}/manifest.csv", "row_number": n + 1,
        "row_json": json.dumps({"document_id": f"Q{run_id}", "image_uri": ""}), "column": "image_uri",
        "check": "not_empty", "reason": f"row {n + 1}: image_uri is empty", "created_at": day,
    }]
    path = _part(output, "quarantine", date, run_id)
    pq.write_table(pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA), path)


def _part(output: Path, table: str, date: str, run_id: str) -> Path:
    """A run's published file of one table (the layout of medvlm_core.output.paths, written out here)."""
    path = output / table / f"run_date={date}" / f"{'run' if table == 'runs' else 'part'}-{run_id}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _time(fn, repeat: int) -> tuple[float, float, object]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), min(times), result


def measure(output: Path, repeat: int = 3) -> list[dict]:
    """Time the analytics questions over ``output`` (each on a fresh connection, views included).

    Args:
        output: an output folder (the synthetic history, or a real one).
        repeat: runs per question; the median is reported.

    Returns:
        One dict per question: name, seconds (median), rows returned.
    """
    storage = Storage()
    url = str(output)
    probe = analytics.query(url, "select document_id from completions_current where page = 2 "
                                 "order by document_id limit 1", storage).column("document_id")[0].as_py()

    def on_connection(sql: str, parameters: dict | None = None):
        return lambda: analytics.query(url, sql, storage, parameters).num_rows

    questions = [
        ("connect (list files, create views)", lambda: analytics.connect(url, storage).close() or 0),
        ("history: count(*) from completions", on_connection("select count(*) from completions")),
        ("history: status counts (full scan)", on_connection("select status, count(*) from completions group by 1")),
        ("current: count(*) from completions_current", on_connection("select count(*) from completions_current")),
        ("current: errors_by_type", on_connection(analytics.EXAMPLE_QUERIES["errors_by_type"])),
        ("current: every column, all rows (to Arrow)", on_connection("select * from completions_current")),
        ("document_status, all documents", on_connection("select * from document_status")),
        ("still_failing (all documents)", on_connection(analytics.EXAMPLE_QUERIES["still_failing"])),
        ("document_status view WHERE document_id = one",
         on_connection("select * from document_status where document_id = $d", {"d": probe})),
        ("completions_current WHERE document_id = one",
         on_connection("select * from completions_current where document_id = $d", {"d": probe})),
        ("analytics.document_status(one): rows read once",
         lambda: analytics.document_status(url, storage, probe).num_rows),
    ]
    results = []
    for name, fn in questions:
        seconds, fastest, rows = _time(fn, repeat)
        results.append({"question": name, "seconds": round(seconds, 3), "min_seconds": round(fastest, 3), "rows": rows})
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point: synthesise, measure, print (and write JSON with --out).

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        Exit status 0.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=365)
    parser.add_argument("--new-pages", type=int, default=1800, help="pages of new documents per run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", help="where to write the history (default: a temp folder, removed after)")
    parser.add_argument("--bloom", action="store_true", help="Bloom filters on completions.document_id")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    temp = None
    if args.dir:
        output = Path(args.dir)
    else:
        temp = tempfile.TemporaryDirectory(prefix="medvlm-analytics-")
        output = Path(temp.name) / "out"
    started = time.perf_counter()
    made = synthesize(output, runs=args.runs, new_pages=args.new_pages, bloom=args.bloom)
    made["synthesis_seconds"] = round(time.perf_counter() - started, 1)
    made["parquet_mb"] = round(sum(f.stat().st_size for f in output.rglob("*.parquet")) / 2**20, 1)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results = measure(output, repeat=args.repeat)
    check = analytics.query(str(output), "select count(*) as n from completions_current", Storage()).column("n")[0].as_py()
    made["current_rows_found"] = check
    made["bloom"] = args.bloom
    print(f"history: {made['rows']:,} completion rows in {made['runs']} runs ({made['parquet_mb']} MB Parquet), "
          f"{made['documents']:,} documents{', Bloom filter on document_id' if args.bloom else ''}; current rows {check:,} (expected {made['current_rows']:,}); "
          f"synthesised in {made['synthesis_seconds']} s")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"duckdb {__import__('duckdb').__version__}")
    print()
    print(f"| question | seconds, median of {args.repeat} | fastest | rows |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['question']} | {r['seconds']:.3f} | {r['min_seconds']:.3f} | {r['rows']:,} |")
    print(f"\npeak RSS {rss_mb():.0f} MB; load average before/after measuring: {load_before} / "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.out:
        Path(args.out).write_text(json.dumps({"history": made, "results": results, "peak_rss_mb": rss_mb()}, indent=2))
    if temp is not None:
        temp.cleanup()
    return 0 if check == made["current_rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
