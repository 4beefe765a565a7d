"""Orchestration at scale: what deciding the work costs as manifests and the output's history grow.

    python -m bench.scale [--sizes 10000,100000,1000000] [--history-runs 365] [--shard-size 256]
                          [--dir DIR] [--out bench/results/scale.json] [--quick]

For each size N it writes a synthetic N-row manifest (CSV) and a synthetic output history of N rows over
``--history-runs`` published runs (completions files in the real layout, ~90% answered), folds the history
into the done index the way a run's set-up does (``done_index.catch_up``), then measures, each in a fresh
child process so that its peak memory is its own:

* ``parent plan``: a fan-out parent validating the manifest and writing every shard's plan file;
* ``shard start-up``: one shard reading its plan, its documents' done keys and the model identity (the
  generated tiny GGUF, hashes cached as on a warm worker; loading the model itself is left out);
* ``shard start-up before``: what every shard did before the shard plans and the done index: the whole
  manifest and every ok key of the history;
* ``done keys, whole history``: the old lookup alone (every completions file's keys);
* ``publish index``: adding one nightly run's keys (N / history-runs rows) to the done index.

No inference runs here: this measures orchestration, not the model. The Prefect runs a fan-out creates are
computed from the code's own rules (shards of ``--shard-size``, ``chunk_rows`` per task, the in-flight bound)
rather than by launching them. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; its last stdout line is JSON, plus its peak RSS."""
    prologue = "import json, time\n"
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over execve from the forking process (this harness, whose
    # synthetic history is large), while VmHWM belongs to the new program's memory alone.
    epilogue = ("\nout['peak_rss_mb'] = int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) / 1024"
                "\nprint(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", prologue + code + epilogue], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_manifest(path: Path, rows: int) -> None:
    """An N-row manifest of relative TIFF paths with patient ids (polars writes it in a second)."""
    import polars as pl

    ids = pl.int_range(0, rows, eager=True)
    pl.DataFrame({
        "document_id": ("doc-" + ids.cast(pl.Utf8).str.zfill(8)),
        "image_uri": ("scans/" + (ids % 997).cast(pl.Utf8) + "/doc-" + ids.cast(pl.Utf8).str.zfill(8) + ".tiff"),
        "patient_id": ("P" + (ids % 50_000).cast(pl.Utf8).str.zfill(6)),
    }).write_csv(path)


def write_history(output: Path, rows: int, runs: int, seed: int = 0) -> dict:
    """``runs`` published runs totalling ``rows`` completions rows (only the columns the done keys use)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    per_run = max(1, rows // runs)
    written = 0
    for r in range(runs):
        day = time.strftime("%Y-%m-%d", time.gmtime(1_735_700_000 + 86_400 * r))
        run_id = f"{day.replace('-', '')}T020000Z-{r:08x}"
        # documents of the manifest's id space: a shard's documents have history
        docs = [f"doc-{rng.randrange(rows):08d}" for _ in range(per_run)]
        keys = [f"{rng.getrandbits(256):064x}" for _ in docs]
        statuses = ["ok" if rng.random() < 0.9 else "error" for _ in docs]
        path = output / "completions" / f"run_date={day}" / f"part-{run_id}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"run_id": [run_id] * len(docs), "result_key": keys, "document_id": docs,
                                 "status": statuses}), path, compression="zstd")
        written += len(docs)
    return {"history_rows": written, "history_runs": runs}


CATCH_UP = """
from medvlm_core.output import done_index
from medvlm_core.output.paths import OutputLayout
from medvlm_core.storage import Storage
t = time.perf_counter(); added = done_index.catch_up(Storage(), OutputLayout.of({output!r}))
out = {{"seconds": time.perf_counter() - t, "runs": len(added)}}
"""

PLAN = """
from medvlm_core.output.paths import OutputLayout
from medvlm_core.inputs.manifest import plan_manifest
from medvlm_core.run.shards import ShardPlanWriter
from medvlm_core.storage import Storage
storage = Storage()
t = time.perf_counter()
writer = ShardPlanWriter(storage, OutputLayout.of({output!r}), "bench-run", {shard_size})
plan = plan_manifest({manifest!r}, storage, sink=writer)
shards = writer.close()
out = {{"seconds": time.perf_counter() - t, "rows": plan.total_rows, "valid": plan.valid_rows, "shards": shards}}
"""

SHARD = """
from medvlm_core.output import done_index
from medvlm_core.output.paths import OutputLayout
from medvlm_core.model.files import identify_model
from medvlm_core.run.shards import read_shard_rows
from medvlm_core.storage import Storage
storage, layout = Storage(), OutputLayout.of({output!r})
t = time.perf_counter()
rows = read_shard_rows(storage, layout, "bench-run", {shard})
done = done_index.load_done_keys(storage, layout, {{r.document_id for r in rows}})
identity = identify_model({model!r}, {mmproj!r}, None, {cache!r})
out = {{"seconds": time.perf_counter() - t, "rows": len(rows), "done_keys": len(done)}}
"""

SHARD_BEFORE = """
import pyarrow.compute as pc, pyarrow.dataset as ds
from medvlm_core.inputs.manifest import read_manifest
from medvlm_core.model.files import identify_model
from medvlm_core.storage import Storage
t = time.perf_counter()
rows = read_manifest({manifest!r}, Storage()).rows[{first}:{first} + {shard_size}]  # the whole manifest, kept: its slice
table = ds.dataset({completions!r}, format="parquet", partitioning="hive").to_table(
    columns=["result_key"], filter=pc.field("status").isin(["ok", "truncated"]))
done = frozenset(table.column("result_key").to_pylist())
identity = identify_model({model!r}, {mmproj!r}, None, {cache!r})
out = {{"seconds": time.perf_counter() - t, "rows": len(rows), "done_keys": len(done)}}
"""

DONE_ALL = """
import pyarrow.compute as pc, pyarrow.dataset as ds
t = time.perf_counter()
table = ds.dataset({completions!r}, format="parquet", partitioning="hive").to_table(
    columns=["result_key"], filter=pc.field("status").isin(["ok", "truncated"]))
done = frozenset(table.column("result_key").to_pylist())
out = {{"seconds": time.perf_counter() - t, "done_keys": len(done)}}
"""

PUBLISH = """
import pyarrow as pa, pyarrow.parquet as pq, random
from medvlm_core.output import done_index
from medvlm_core.output.paths import OutputLayout
from medvlm_core.storage import Storage
layout = OutputLayout.of({output!r})
rng = random.Random(7)
docs = [f"doc-{{rng.randrange({space}):08d}}" for _ in range({rows})]
url = layout.table_part("completions", "2027-12-31", "20271231T020000Z-nightly0")
import os; os.makedirs(os.path.dirname(url), exist_ok=True)
pq.write_table(pa.table({{"run_id": ["nightly"] * len(docs), "result_key": [f"{{rng.getrandbits(256):064x}}" for _ in docs],
                          "document_id": docs, "status": ["ok"] * len(docs)}}), url)
t = time.perf_counter()
buckets = done_index.add_runs(Storage(), layout, {{"20271231T020000Z-nightly0": url}})
out = {{"seconds": time.perf_counter() - t, "rows": len(docs), "buckets_rewritten": buckets}}
"""

BASELINE = """
import polars, pyarrow, pandera.polars
from medvlm_core.output import done_index
from medvlm_core.inputs import manifest
from medvlm_core.model import files as models
from medvlm_core.run import shards
out = {"seconds": 0.0}
"""


def measure_size(size: int, history_runs: int, shard_size: int, workdir: Path, model, cache: Path) -> dict:
    """Every measurement at one manifest size and history size."""
    here = workdir / f"n{size}"
    output = here / "out"
    output.mkdir(parents=True)
    manifest = here / "manifest.csv"
    write_manifest(manifest, size)
    history = write_history(output, size, history_runs)
    common = dict(output=str(output), manifest=str(manifest), shard_size=shard_size, model=str(model.model_path),
                  mmproj=str(model.mmproj_path), cache=str(cache), completions=str(output / "completions"))
    result: dict = {"manifest_rows": size, **history}
    result["index_build"] = _child(CATCH_UP.format(**common))
    result["parent_plan"] = _child(PLAN.format(**common))
    shards = result["parent_plan"]["shards"]
    middle = shards // 2
    _child(SHARD.format(shard=middle, **common))  # warm the model-hash cache, as on a worker that ran a shard
    result["shard_startup"] = _child(SHARD.format(shard=middle, **common))
    result["shard_startup_before"] = _child(SHARD_BEFORE.format(first=middle * shard_size, **common))
    result["done_keys_whole_history"] = _child(DONE_ALL.format(**common))
    result["publish_index"] = _child(PUBLISH.format(space=size, rows=max(1, size // history_runs), **common))
    result["prefect_runs"] = prefect_runs(size, shard_size)
    return result


def prefect_runs(rows: int, shard_size: int) -> dict:
    """What a fan-out of ``rows`` valid rows creates in Prefect at the defaults (from the code's rules)."""
    from medvlm_core.run.params import EngineOptions
    from medvlm_core.settings import Settings

    chunk = Settings().chunk_rows(EngineOptions().n_parallel)
    shards = math.ceil(rows / shard_size)
    tasks_per_shard = math.ceil(min(rows, shard_size) / chunk)
    return {"flow_runs": 1 + shards, "shard_runs": shards, "task_runs": shards * tasks_per_shard, "chunk_rows": chunk,
            "task_runs_per_100_pages": round(100 * shards * tasks_per_shard / rows, 2),
            "in_flight_at_most": "max_concurrent_shards (default 2 x the shard pool's capacity)"}


def table(results: list[dict], baseline: dict) -> str:
    """The results as a Markdown table."""
    def cell(m: dict) -> str:
        return f"{m['seconds']:.2f} s, {m['peak_rss_mb']:.0f} MB"

    lines = [f"(a bare child process that imports the modules peaks at {baseline['peak_rss_mb']:.0f} MB)", "",
             "| what | " + " | ".join(f"{r['manifest_rows']:,} rows, {r['history_rows']:,} history" for r in results) + " |",
             "|---|" + "---|" * len(results)]
    rows = [
        ("parent: validate + write shard plans", "parent_plan"),
        ("shard start-up (its plan + done keys + model identity)", "shard_startup"),
        ("shard start-up before (whole manifest + whole history)", "shard_startup_before"),
        ("done keys over the whole history (the old lookup)", "done_keys_whole_history"),
        ("done index: build from the history (once per output)", "index_build"),
        ("done index: add one nightly run at publish", "publish_index"),
    ]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(cell(r[key]) for r in results) + " |")
    lines.append("| Prefect flow runs / task runs created | " + " | ".join(
        f"{r['prefect_runs']['flow_runs']:,} / {r['prefect_runs']['task_runs']:,}" for r in results) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the harness.

    Args:
        argv: command-line arguments.

    Returns:
        The exit status.
    """
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--history-runs", type=int, default=365)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--dir", help="work folder (default: a temp folder)")
    ap.add_argument("--quick", action="store_true", help="small sizes: proves the harness works")
    ap.add_argument("--out", default="bench/results/scale.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.history_runs = "2000", 10
    from medvlm_core.testing.tiny_model import make_tiny_model

    workdir = Path(args.dir or tempfile.mkdtemp(prefix="medvlm-scale-"))
    model = make_tiny_model(workdir / "model", family="qwen2vl")
    cache = workdir / "cache"
    os.environ["MEDVLM_CACHE_DIR"] = str(cache)
    baseline = _child(BASELINE)
    results = [measure_size(int(s), args.history_runs, args.shard_size, workdir, model, cache)
               for s in args.sizes.split(",")]
    text = table(results, baseline)
    print("Orchestration only: no inference runs in this harness (an instant stand-in would add nothing).")
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                                          "baseline": baseline, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
