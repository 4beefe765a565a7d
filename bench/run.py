"""medvlm's benchmark harness: the same pages, model and settings through every path, in one process run.

    python -m bench.run [--family qwen2vl] [--model M --mmproj P --chat-format F] [--docs 16]
                        [--max-tokens 64] [--parallel 1,4,8,16] [--overlap off,on] [--encode-workers 1,3]
                        [--llama-server PATH|auto|none] [--n-gpu-layers -1] [--paths naive,engine,server,...]
                        [--quick] [--out bench/results/latest.json]

Paths measured side by side:
  naive    llama-cpp-python's create_chat_completion in a loop, the matching chat handler, model loaded once
  engine   medvlm's BatchedEngine at each --parallel value (continuous refill), with the image encoder inline
           (overlap off) and on threads ahead of the decode (overlap on), with each --encode-workers count
  server   llama.cpp's own llama-server (built from the same llama-cpp-python version's vendored sources by
           bench/build_llama_server.sh) with --parallel N and --mmproj, driven with N concurrent requests
  flow     the whole medvlm-batch Prefect flow (manifest -> Parquet) at the largest --parallel, each timed run
           paired with the same engine (the flow's shared engine, its child process when isolated) alone on the
           same pages decoded beforehand, then on the page files decoded as it goes (every other pair engine
           first): the orchestration and I/O overhead; with Prefect's flow-run heartbeat (its default) and without
  prefect  Prefect's own cost per flow run: a flow that only sleeps, from the call to its Completed state and return
  plan     validating and planning a 100,000-row manifest (time, memory, Prefect task runs it would create)
  stall    the pause a page entering the batch makes the others take: whole image prefill vs n_batch slices
  handoff  a page to the isolated engine's child: pixels pickled through the pipe vs a new shared-memory block
           per page vs blocks reused from a pool (the engine's way)
  openmp   the isolated engine on the flow's pages with llama.cpp's OpenMP threads spinning when idle (libgomp's
           default) and sleeping (the passive policy medvlm sets), side by side, alternating
Prints a table and writes JSON. Peak RSS is the process's high-water mark when each path ends (monotonic).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import io
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Identify the primary diagnoses and list all prescribed medications."  # the flow's default is its own


def ratio_of_sums_ci95(numerators: list[float], denominators: list[float], resamples: int = 2000) -> list[float]:
    """The 95% bootstrap interval of ``sum(numerators) / sum(denominators)``, the pairs resampled (a fixed seed:
    the same pairs give the same interval). What a run's ratio of sums can claim, given how its pairs spread (a
    single flow/engine pair swings by ~8% on a small shared machine).

    Args:
        numerators: one value per pair (the engine's time).
        denominators: the pairs' other values (the flow's time).
        resamples: bootstrap samples.

    Returns:
        [low, high].
    """
    import random

    rng, n = random.Random(0), len(numerators)
    ratios = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        ratios.append(sum(numerators[i] for i in picks) / sum(denominators[i] for i in picks))
    ratios.sort()
    return [ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_seconds() -> dict[str, float]:
    """CPU time (user + system) so far of this process and of each kind of its child processes, from /proc
    (Linux; empty elsewhere): ``harness`` (this process: the flow's own work, Prefect's client and, in process,
    llama.cpp), ``engine child`` (the isolated engine), ``prefect server`` (the ephemeral API server), ``other``."""
    me, tick, out = os.getpid(), os.sysconf("SC_CLK_TCK"), {}
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if int(pid) != me and int(stat[1]) != me:
                continue
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        kind = ("harness" if int(pid) == me else "prefect server" if "uvicorn" in command
                else "engine child" if "multiprocessing.spawn" in command else "other")
        out[kind] = out.get(kind, 0.0) + (int(stat[11]) + int(stat[12])) / tick
    return out


@contextlib.contextmanager
def cpu_used(into: list):
    """Appends to ``into`` the CPU seconds each kind of process (``cpu_seconds``) spent inside the block."""
    before = cpu_seconds()
    yield
    after = cpu_seconds()
    into.append({kind: round(after[kind] - before.get(kind, 0.0), 2) for kind in after})


def pages(n: int):

    from medvlm_core.testing.demo_docs import DOCUMENTS, render_document

    docs = [render_document(d["title"], d["lines"]) for d in DOCUMENTS.values()]
    out = []
    for i in range(n):
        page = docs[i % len(docs)].copy()
        page.paste((255 - 7 * (i % 30), 255, 255), (900, 1200, 990, 1290))  # every page differs a little
        out.append(page)
    return out


def bench_naive(engine, images, prompt, params) -> dict:
    started = time.perf_counter()
    tokens = 0
    for image in images:
        tokens += engine.generate(image, prompt, params).completion_tokens
    wall = time.perf_counter() - started
    return {"path": "naive", "parallel": 1, "docs": len(images), "wall_s": wall, "docs_per_s": len(images) / wall,
            "gen_tok_per_s": tokens / wall, "peak_rss_mb": rss_mb()}


def bench_engine(engine, images, prompt, params, n_seq: int, overlap: bool, confidences: bool = True,
                 encode_workers: int = 1) -> dict:
    from medvlm_core.engine import BatchedEngine, Request

    batched = BatchedEngine(engine, n_seq=n_seq, ctx_per_seq=engine.config.n_ctx, overlap=overlap, confidences=confidences,
                            encode_workers=encode_workers)
    try:
        started = time.perf_counter()
        tokens, encode_ms = 0, 0.0
        for _, result in batched.generate_many(Request(i, im, prompt, params) for i, im in enumerate(images)):
            tokens += result.completion_tokens
            encode_ms += result.encode_ms
        wall = time.perf_counter() - started
    finally:
        batched.close()
    return {"path": "engine" if confidences else "engine-noconf", "parallel": n_seq, "overlap": overlap,
            "encode_workers": encode_workers, "docs": len(images), "wall_s": wall,
            "docs_per_s": len(images) / wall, "gen_tok_per_s": tokens / wall,
            "encode_ms_per_page": encode_ms / len(images), "peak_rss_mb": rss_mb()}


def bench_stall(engine, images, prompt, params, n_seq: int) -> list[dict]:
    """What a page entering the batch costs the pages in flight: the longest pause it makes them take (the whole
    image prefill at once vs n_batch slices between their decode steps), per admitted page."""
    import statistics

    from medvlm_core.engine import BatchedEngine, Request

    out = []
    for interleave in (False, True):
        batched = BatchedEngine(engine, n_seq=n_seq, ctx_per_seq=engine.config.n_ctx, interleave_prefill=interleave)
        try:
            started = time.perf_counter()
            list(batched.generate_many(Request(i, im, prompt, params) for i, im in enumerate(images)))
            wall = time.perf_counter() - started
            pauses = list(batched.admission_pauses_ms)
        finally:
            batched.close()
        out.append({"path": "stall", "parallel": n_seq, "interleave_prefill": interleave, "docs": len(images),
                    "docs_per_s": len(images) / wall, "n_batch": engine.config.n_batch, "admitted": len(pauses),
                    "pause_ms_mean": statistics.mean(pauses) if pauses else 0.0,
                    "pause_ms_max": max(pauses) if pauses else 0.0})
    return out


def bench_scoring(vocab: int = 151_936, tokens: int = 2000) -> dict:
    """The scoring of one token (log-softmax over the vocabulary, as Sampling.score does) at a real model's
    vocabulary size (Qwen2.5-VL's), on random logits: the confidences' cost per generated token on any backend."""
    import numpy as np

    logits = np.random.default_rng(0).standard_normal(vocab).astype(np.float32)
    started = time.perf_counter()
    for t in range(tokens):
        peak = float(logits.max())
        float(logits[t]) - (peak + float(np.log(np.exp(logits - peak).sum())))
    per_token_ms = (time.perf_counter() - started) * 1000 / tokens
    return {"path": "scoring", "parallel": None, "vocab": vocab, "ms_per_token": per_token_ms}


def _handoff_child(connection) -> None:
    """The receiving end of bench_handoff: take each page's pixels as the isolated engine's child does, then ack."""
    from medvlm_core.engine.shared_pixels import read_pixels

    while (message := connection.recv()) is not None:
        read_pixels(message)
        connection.send(message.id)


def bench_handoff(images, repeats: int = 3) -> list[dict]:
    """Handing pages to the isolated engine's child: raw pixels pickled through the pipe (before) vs a new
    shared-memory block per page whose name goes through the pipe vs blocks reused from a pool (the engine's
    way now), one page at a time, round trip (prepare, send, take, ack)."""
    import multiprocessing

    from medvlm_core.engine import Request
    from medvlm_core.engine.child_messages import PageRequest
    from medvlm_core.engine.shared_pixels import BlockPool, page_request, release_block
    from medvlm_core.run.params import GenerationParams

    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_handoff_child, args=(there,), daemon=True)
    child.start()
    out = []
    pool = BlockPool(keep=2)
    try:
        for way in ("pipe", "shared", "pooled") * repeats:
            started = time.perf_counter()
            for i, image in enumerate(images):
                if way == "pipe":  # the message as it was before shared memory: the pixels themselves
                    rgb = image.convert("RGB")
                    message, block = PageRequest(i, i, 0, (rgb.size,), rgb.tobytes(), PROMPT, GenerationParams(), None), None
                else:
                    message, block = page_request(i, i, Request(i, image, PROMPT, GenerationParams()),
                                                  pool if way == "pooled" else None)
                here.send(message)
                here.recv()
                release_block(block, pool if way == "pooled" else None)
            ms = (time.perf_counter() - started) * 1000 / len(images)
            out.append({"path": f"handoff-{way}", "parallel": None, "docs": len(images), "ms_per_page": ms,
                        "page": f"{images[0].width}x{images[0].height} RGB"})
    finally:
        here.send(None)
        child.join(timeout=30)
        pool.close()
    return out


# libgomp's own spin count when no wait policy is set (OMP_DISPLAY_ENV=VERBOSE shows it): what llama.cpp's
# threads do unless medvlm sets the passive policy (medvlm_core/settings.py, prefer_passive_openmp).
LIBGOMP_DEFAULT_SPIN = "300000"


def bench_openmp(model, mmproj, chat_format, images, params, n_seq: int, n_ctx: int, repeats: int = 3,
                 n_threads: int | None = None, flash_attn: bool = True) -> list[dict]:
    """The isolated engine (the default) with llama.cpp's OpenMP threads spinning when idle (libgomp's default)
    and sleeping (the passive policy medvlm sets), two children side by side, alternating runs on the same pages."""
    from statistics import median_high as median
    from unittest import mock

    from medvlm_core.engine import IsolatedEngine, Request
    from medvlm_core.run.params import EngineConfig

    config = EngineConfig(str(model), str(mmproj), n_ctx=n_ctx, n_parallel=n_seq, n_threads=n_threads,
                          flash_attn=flash_attn)
    variants = {"spin": {"GOMP_SPINCOUNT": LIBGOMP_DEFAULT_SPIN}, "passive": {}}
    engines = {}
    try:
        for name, env in variants.items():
            with mock.patch.dict(os.environ, env):  # the child is spawned with this process's environment
                engines[name] = IsolatedEngine(config, chat_format).start()
        walls: dict[str, list[float]] = {name: [] for name in variants}
        for run in range(repeats + 1):  # the first round warms both up, untimed
            for name, engine in engines.items():
                started = time.perf_counter()
                list(engine.generate_many(Request(i, im, PROMPT, params) for i, im in enumerate(images)))
                if run:
                    walls[name].append(time.perf_counter() - started)
    finally:
        for engine in engines.values():
            engine.close()
    return [{"path": "openmp", "openmp_wait": name, "parallel": n_seq, "isolate": True, "docs": len(images),
             "walls_s": walls[name], "wall_s": median(walls[name]), "docs_per_s": len(images) / median(walls[name]),
             "peak_rss_mb": rss_mb()} for name in variants]


def find_llama_server(choice: str) -> str | None:
    """``auto``: the binary bench/build_llama_server.sh made for this llama-cpp-python version, if any."""
    if choice == "none":
        return None
    if choice != "auto":
        return choice
    import llama_cpp

    built = Path.home() / ".cache" / "medvlm" / "llama-server" / llama_cpp.__version__ / "build" / "bin" / "llama-server"
    return str(built) if built.exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict, timeout: float = 600) -> dict:
    import urllib.request

    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def bench_server(binary: str, model: Path, mmproj: Path, images, prompt, params, n_seq: int, n_ctx: int,
                 threads: tuple[int, int], image_max_tokens: int | None, flash_attn: str, workdir: Path,
                 n_gpu_layers: int = 0) -> dict:
    """llama-server -np N with N concurrent image chat requests (OpenAI API), greedy, the same max_tokens."""
    from concurrent.futures import ThreadPoolExecutor

    port = _free_port()
    cmd = [binary, "-m", str(model), "--mmproj", str(mmproj), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(n_seq), "-c", str(n_ctx * n_seq), "-ngl", str(999 if n_gpu_layers < 0 else n_gpu_layers),
           "-t", str(threads[0]), "-tb", str(threads[1]),
           "-b", "512", "-ub", "512", "-fa", flash_attn, "--jinja", "--no-webui"]
    if image_max_tokens:
        cmd += ["--image-max-tokens", str(image_max_tokens)]
    log = open(workdir / f"llama-server-{n_seq}.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                import urllib.request

                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not start; see {log.name}")
            time.sleep(0.2)
        urls = []
        for image in images:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())

        def ask(url: str) -> int:
            body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                {"type": "text", "text": prompt}]}],
                    "max_tokens": params.max_tokens, "temperature": 0.0, "cache_prompt": False}
            return _post(base + "/v1/chat/completions", body)["usage"]["completion_tokens"]

        ask(urls[-1])  # warm-up, like the other paths
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=n_seq) as pool:
            tokens = sum(pool.map(ask, urls))
        wall = time.perf_counter() - started
        hwm = 0.0
        with open(f"/proc/{server.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024.0
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    return {"path": "server", "parallel": n_seq, "docs": len(images), "wall_s": wall, "docs_per_s": len(images) / wall,
            "gen_tok_per_s": tokens / wall, "peak_rss_mb": hwm}


@contextlib.contextmanager
def _heartbeat(on: bool):
    """Prefect's flow-run heartbeat as it is (on: Prefect's default, every 180 s) or off for the flow runs inside.
    Off is the setting's ``None``, which only code can set (an environment variable must be an integer >= 30),
    and Prefect's default before 3.6.22: the runs then end when their body does instead of on the heartbeat
    thread's next whole-second step (``bench_prefect``)."""
    if on:
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


class _FlowPairs:
    """One flow variant's timed pairs: each flow run and its engine alone (on decoded pages, then on the files)."""

    def __init__(self):
        self.walls, self.teardowns, self.alone, self.files = [], [], [], []
        self.cpu_flow, self.cpu_files = [], []
        self.summary: dict = {}

    def engines(self, alone_s, from_files_s) -> None:
        """Time the engine alone on the decoded pages, then on the page files (with its CPU by process)."""
        self.alone.append(alone_s())
        with cpu_used(self.cpu_files):
            self.files.append(from_files_s())


def bench_flow(model, mmproj, chat_format, images, params, n_seq: int, n_ctx: int, workdir: Path,
               image_max_tokens: int | None = None, n_threads: int | None = None, flash_attn: bool = True,
               quick: bool = False, chunk_size: int | None = None, repeats: int = 1,
               isolation: tuple[bool, ...] = (True, False)) -> list[dict]:
    import csv

    from medvlm.flows.batch import medvlm_batch

    docs = workdir / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    page_files = [docs / f"doc-{i:04d}.png" for i in range(len(images))]
    with open(workdir / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["document_id", "image_uri"])
        for image, path in zip(images, page_files):
            image.save(path)
            writer.writerow([path.stem, f"docs/{path.name}"])
    locations = dict(manifest=str(workdir / "manifest.csv"), output=str(workdir / "out"), model=str(model), mmproj=str(mmproj))
    options = dict(
        chat_format=chat_format, max_tokens=params.max_tokens, n_ctx=n_ctx, n_parallel=n_seq, prompt=PROMPT,
        image_max_tokens=image_max_tokens, n_threads=n_threads, flash_attn=flash_attn,
        chunk_size=chunk_size or max(len(images), 1), force=True,
    )
    from statistics import median_high as median  # the middle value; of an even number, the higher of the two

    from PIL import Image

    from medvlm_core.engine import Request, close_shared_engines, registry
    from medvlm_core.engine.registry import current_shared_engine
    from medvlm_core.inputs.images import load_pages
    from medvlm_core.run.params import ImageOptions

    # The engine alone: the very engine the flow runs on (its shared engine: the same child process when
    # isolated), on the same pages decoded beforehand, timed right after each flow run. Paired like this the
    # comparison is orchestration and I/O alone, free of the speed differences between engine instances (up to
    # 25% on a small machine, between processes and within one: docs/benchmarks.md) that a second engine would add.
    decoded = [Image.open(path).convert("RGB") for path in page_files]

    def engine_s(requests) -> float:
        started = time.perf_counter()
        list(current_shared_engine().generate_many(requests))
        return time.perf_counter() - started

    def engine_alone_s() -> float:
        return engine_s(Request(i, im, PROMPT, params) for i, im in enumerate(decoded))

    # The same engine on the same page files, read and decoded as it goes by medvlm's own page loader (what any
    # program calling the engine must also do): the flow's cost apart from decoding the pages.
    image_options = ImageOptions()

    def from_files():
        for i, path in enumerate(page_files):
            for page in load_pages(path.read_bytes(), path.name, image_options):
                yield Request(i, page.image, PROMPT, params)

    def engine_from_files_s() -> float:
        return engine_s(from_files())

    out = []
    # the default (llama.cpp in a supervised child process), then in-process; --quick: the default, cold.
    # With several chunks: the chunks feeding one running batch (the default), then each chunk on its own.
    # One chunk: with Prefect's flow-run heartbeat (its default) and without it (its whole-second exit apart).
    streams = ("shared", "per chunk") if chunk_size and chunk_size < len(images) else ("shared",)
    heartbeats = (True,) if len(streams) > 1 else (True, False)
    for isolate in (True,) if quick else isolation:
        for stream in streams:
            with registry.stream_per_chunk() if stream == "per chunk" else contextlib.nullcontext():
                if not quick:
                    medvlm_batch(**locations, options=dict(options, isolate=isolate))  # untimed: Prefect, model load
                    engine_alone_s()  # untimed: as warm as the flow
                runs = {heartbeat: _FlowPairs() for heartbeat in heartbeats}
                for repeat in range(repeats):
                    # The variants take turns, pair by pair, on one engine: the machine's slow spells (this VM's
                    # steal time comes and goes over minutes) fall on each alike instead of on whichever ran then.
                    for heartbeat in heartbeats:
                        pairs = runs[heartbeat]
                        # Every other pair runs the engine first: whatever one run leaves behind (Prefect's logs and
                        # events still being sent, a warmer cache) then favours each side in turn.
                        engine_first = repeat % 2 == 1
                        if engine_first:
                            pairs.engines(engine_alone_s, engine_from_files_s)
                        with _heartbeat(heartbeat), cpu_used(pairs.cpu_flow):  # /proc reads outside the timed call
                            started = time.perf_counter()
                            state = medvlm_batch(**locations, options=dict(options, isolate=isolate), return_state=True)
                            pairs.walls.append(time.perf_counter() - started)
                        # The Completed state is made when the flow's body has returned (tables published); what
                        # follows is Prefect's own flow-run exit (see bench_prefect).
                        pairs.teardowns.append(time.time() - state.timestamp.timestamp())
                        pairs.summary = state.result()
                        if not engine_first:
                            pairs.engines(engine_alone_s, engine_from_files_s)
                close_shared_engines()
            for heartbeat, pairs in runs.items():
                walls, teardowns, alone, files = pairs.walls, pairs.teardowns, pairs.alone, pairs.files
                completed = [w - t for w, t in zip(walls, teardowns)]  # each flow run up to its Completed state
                wall = median(walls)
                out.append({
                    "path": "flow", "parallel": n_seq, "isolate": isolate, "docs": len(images), "wall_s": wall,
                    "chunk_size": options["chunk_size"], "stream": stream, "prefect_heartbeat": heartbeat,
                    "walls_s": walls, "engine_alone_walls_s": alone, "engine_from_files_walls_s": files,
                    "docs_per_s": pairs.summary["pages_ok"] / wall, "engine_alone_docs_per_s": len(images) / median(alone),
                    # medians of the paired ratios: the whole call, and the call up to the flow's Completed state
                    # (all of medvlm's work, publishing included, without Prefect's flow-run exit)
                    "x_engine_same_pages": median([a / w for a, w in zip(alone, walls)]),
                    "x_engine_to_completed": median([a / c for a, c in zip(alone, completed)]),
                    # against the engine that also reads and decodes the page files
                    "x_engine_from_files": median([f / w for f, w in zip(files, walls)]),
                    "x_engine_from_files_to_completed": median([f / c for f, c in zip(files, completed)]),
                    # the sums' ratio: steadier than a median of few pairs when single runs swing by 10-20%
                    "x_engine_same_pages_total": sum(alone) / sum(walls),
                    "x_engine_to_completed_total": sum(alone) / sum(completed),
                    "x_engine_from_files_to_completed_total": sum(files) / sum(completed),
                    # what those two can claim, given how the pairs spread
                    "x_engine_to_completed_total_ci95": ratio_of_sums_ci95(alone, completed),
                    "x_engine_from_files_to_completed_total_ci95": ratio_of_sums_ci95(files, completed),
                    "prefect_exit_s": median(teardowns), "prefect_exits_s": teardowns,
                    # CPU seconds by process in each flow run and each engine run on the page files: on a machine
                    # whose cores the engine fills, what the flow adds is what the engine loses
                    "cpu_s_flow": pairs.cpu_flow, "cpu_s_engine_from_files": pairs.cpu_files,
                    "flow_reported_pages_per_s": pairs.summary["pages_per_second"], "peak_rss_mb": rss_mb(),
                })
    return out


def bench_prefect(bodies: tuple[float, ...] = (0.2, 0.7, 1.2, 1.7)) -> list[dict]:
    """Prefect's own cost per flow run, apart from medvlm: a flow whose body only sleeps, timed from the call to its
    Completed state and to the call's return. (Prefect 3.9's flow-run heartbeat thread sleeps in whole seconds
    and is joined on exit, so a synchronous flow run's call tends to end on a whole second after its start.)"""
    from prefect import flow

    @flow(name="medvlm-bench-sleep")
    def sleep_flow(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    sleep_flow(0.0)  # untimed: the first flow run of the process
    out = []
    for heartbeat in (True, False):
        with _heartbeat(heartbeat):
            for body in bodies:
                started = time.perf_counter()
                state = sleep_flow(body, return_state=True)
                wall = time.perf_counter() - started
                out.append({"path": "prefect", "parallel": None, "body_s": body, "call_s": wall,
                            "prefect_heartbeat": heartbeat, "exit_s": time.time() - state.timestamp.timestamp()})
    return out


def bench_plan(rows: int, workdir: Path) -> dict:
    """Validate and plan a large manifest in a child process, so its memory is its own."""
    code = f"""
import csv, json, resource, time
from medvlm_core.run.params import EngineOptions
from medvlm_core.inputs.manifest import read_manifest
from medvlm_core.settings import Settings
from medvlm_core.storage import Storage
path = {str(workdir / 'big.csv')!r}
with open(path, 'w', newline='') as f:
    w = csv.writer(f); w.writerow(['document_id', 'image_uri', 'patient_id'])
    for i in range({rows}):
        w.writerow([f'doc-{{i:07d}}', f'scans/{{i % 997}}/doc-{{i:07d}}.tiff', f'P{{i % 50000:06d}}'])
t = time.perf_counter(); plan = read_manifest(path, Storage()); wall = time.perf_counter() - t
chunk = Settings().chunk_rows(EngineOptions().n_parallel)  # the rows per task a default run uses
print(json.dumps({{"rows": plan.total_rows, "valid": len(plan.rows), "validate_plan_s": wall,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "chunk_size": chunk,
    "task_runs": -(-len(plan.rows) // chunk)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {"path": "plan", **json.loads(out.stdout.strip().splitlines()[-1])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="qwen2vl", help="generated tiny model family when no --model is given")
    ap.add_argument("--model")
    ap.add_argument("--mmproj")
    ap.add_argument("--chat-format")
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--parallel", default="1,4,8,16")
    ap.add_argument("--overlap", default="off,on", help="engine runs with the encoder inline (off) and/or threaded (on)")
    ap.add_argument("--llama-server", default="auto",
                    help="llama-server binary; auto = the one bench/build_llama_server.sh built; none = skip")
    ap.add_argument("--n-ctx", type=int, default=2048, help="context per sequence")
    ap.add_argument("--n-threads", type=int, help="threads for every path (default: llama-cpp-python's)")
    ap.add_argument("--flash-attn", choices=["on", "off"], default="on", help="every path, the server included")
    ap.add_argument("--image-max-tokens", type=int, help="vision encoder token budget per page (default: the model's)")
    ap.add_argument("--flow-docs", type=int, default=64,
                    help="pages for the flow-vs-engine comparison (a run's fixed cost shows less on more pages)")
    ap.add_argument("--flow-chunk-size", type=int, help="manifest rows per inference task in the flow path "
                    "(default: all pages in one); smaller also runs each chunk on its own stream, to compare")
    ap.add_argument("--flow-repeats", type=int, default=5, help="timed runs of each flow variant, each paired with "
                    "its engine alone, every other pair engine first (the medians are reported)")
    ap.add_argument("--flow-isolate", default="on,off", help="the flow with llama.cpp in its supervised child "
                    "process (on, the default) and/or in-process (off)")
    ap.add_argument("--plan-rows", type=int, default=100_000)
    ap.add_argument("--confidence-repeats", type=int, default=2,
                    help="alternating runs of the engine at the largest parallelism without and with confidences")
    ap.add_argument("--encode-workers", default="1",
                    help="engine runs (encoder threaded) with each of these numbers of vision-encoder contexts")
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="layers offloaded on a GPU build, every path (-1 = all)")
    ap.add_argument("--naive-docs", type=int, help="pages for the one-at-a-time loop (default: --docs)")
    ap.add_argument("--n-batch", type=int, default=512, help="tokens per prefill decode (and per image slice), every path")
    ap.add_argument("--paths", default="naive,engine,stall,confidences,server,flow,openmp,prefect,plan,handoff",
                    help="which paths to run (comma-separated)")
    ap.add_argument("--quick", action="store_true", help="a few pages and tokens: proves the harness works")
    ap.add_argument("--out", default="bench/results/latest.json")
    args = ap.parse_args(argv)
    if not set(args.flow_isolate.split(",")) <= {"on", "off"}:
        ap.error(f"--flow-isolate takes on, off or on,off, not {args.flow_isolate!r}")
    if args.quick:
        args.docs, args.max_tokens, args.parallel, args.plan_rows, args.flow_docs = 3, 4, "1,2", 2000, 3
        args.flow_repeats = 1
        args.llama_server = "none" if args.llama_server == "auto" else args.llama_server

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from medvlm_core.settings import load_llama_cpp

    load_llama_cpp()  # this process opens the model: llama.cpp before anything imports numpy

    from medvlm_core.engine import VisionEngine
    from medvlm_core.model.files import choose_chat_format, inspect_model
    from medvlm_core.run.params import EngineConfig, GenerationParams

    workdir = Path(tempfile.mkdtemp(prefix="medvlm-bench-"))
    atexit.register(shutil.rmtree, workdir, True)  # models, pages and flow outputs: only the JSON is kept
    if args.model:
        model, mmproj = Path(args.model), Path(args.mmproj)
    else:
        # imported here: the generator needs the gguf package, which a run on a given model (bench/gpu.sh on a
        # machine without PyPI) does without
        from medvlm_core.testing.tiny_model import make_tiny_model

        made = make_tiny_model(workdir / "model", family=args.family)
        model, mmproj = made.model_path, made.mmproj_path
    chat_format = choose_chat_format(inspect_model(str(model), str(mmproj)), args.chat_format)
    images = pages(args.docs)
    params = GenerationParams(max_tokens=args.max_tokens)
    prompt = PROMPT
    parallel = [int(x) for x in args.parallel.split(",")]

    paths = set(args.paths.split(","))
    engine = VisionEngine(
        EngineConfig(str(model), str(mmproj), n_ctx=args.n_ctx, image_max_tokens=args.image_max_tokens,
                     n_threads=args.n_threads, flash_attn=args.flash_attn == "on", n_gpu_layers=args.n_gpu_layers,
                     n_batch=args.n_batch),
        chat_format,
    ).start()
    engine.generate(images[0], prompt, params)  # warm-up (first graph allocation)
    threads = (engine.llm.n_threads, engine.llm.n_threads_batch)
    results = [bench_naive(engine, images[: args.naive_docs or len(images)], prompt, params)]  # the baseline, always
    overlaps = [{"off": False, "on": True}[x] for x in args.overlap.split(",")]
    workers = [int(x) for x in args.encode_workers.split(",")]
    if "engine" in paths:
        for n in parallel:
            for overlap in overlaps:
                for w in workers if overlap else [1]:  # encoder contexts work on threads: only with overlap
                    results.append(bench_engine(engine, images, prompt, params, n, overlap, encode_workers=w))
    # What the confidences cost (every answer token scored): the same engine without them, side by side.
    if "stall" in paths:
        results.extend(bench_stall(engine, images, prompt, params, max(parallel)))
    if "confidences" in paths:
        for _ in range(args.confidence_repeats):
            for confidences in (False, True):
                results.append(bench_engine(engine, images, prompt, params, max(parallel), True, confidences))
        results.append(bench_scoring())
    engine.close()
    server = find_llama_server(args.llama_server) if "server" in paths else None
    if server:
        for n in parallel:
            results.append(bench_server(server, model, mmproj, images, prompt, params, n, args.n_ctx, threads,
                                        args.image_max_tokens, args.flash_attn, workdir, args.n_gpu_layers))
    elif "server" in paths:
        print("llama-server: not built (bash bench/build_llama_server.sh), skipped", file=sys.stderr)
    if "flow" in paths:
        results.extend(bench_flow(model, mmproj, chat_format, pages(args.flow_docs), params, max(parallel), args.n_ctx,
                                  workdir / "flow", args.image_max_tokens, args.n_threads, args.flash_attn == "on",
                                  args.quick, args.flow_chunk_size, args.flow_repeats,
                                  tuple(mode == "on" for mode in args.flow_isolate.split(","))))
    if "openmp" in paths:
        results.extend(bench_openmp(model, mmproj, chat_format, pages(args.flow_docs), params, max(parallel),
                                    args.n_ctx, args.flow_repeats, args.n_threads, args.flash_attn == "on"))
    if "prefect" in paths:
        results.extend(bench_prefect())
    if "plan" in paths:
        results.append(bench_plan(args.plan_rows, workdir))
    if "handoff" in paths:
        results.extend(bench_handoff(images))

    naive = results[0]["docs_per_s"]
    server_at = {r["parallel"]: r for r in results if r["path"] == "server"}
    for r in results:
        if "docs_per_s" in r and r["path"] not in ("plan", "scoring", "stall") and not r["path"].startswith("handoff"):
            r["x_naive"] = r["docs_per_s"] / naive
            if r["parallel"] in server_at:
                r["x_server"] = r["docs_per_s"] / server_at[r["parallel"]]["docs_per_s"]
    flows = [r for r in results if r["path"] == "flow"]
    for other_pages in flows + [r for r in results if r["path"] == "openmp"]:
        other_pages.pop("x_server", None)  # other pages than the server's: not comparable
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "model": {"path": str(model.name), "mmproj": str(mmproj.name), "chat_format": chat_format},
        "settings": {"docs": args.docs, "max_tokens": args.max_tokens, "n_ctx_per_seq": args.n_ctx,
                     "n_gpu_layers": args.n_gpu_layers,
                     "threads": list(threads), "flash_attn": args.flash_attn,
                     "image_max_tokens": args.image_max_tokens,
                     "page": "1000x1300 PNG"},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"{'path':<21} {'par':>4} {'docs/s':>8} {'tok/s':>8} {'enc ms':>7} {'x naive':>8} {'x server':>8} {'RSS MB':>8}")
    for r in results:
        if r["path"] == "plan":
            print(f"plan: {r['rows']} rows validated and planned in {r['validate_plan_s']:.2f} s, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB, {r['task_runs']} task runs (chunk_size {r['chunk_size']})")
            continue
        if r["path"] == "stall":
            print(f"stall ({'sliced' if r['interleave_prefill'] else 'whole image'}, n_batch {r['n_batch']}) at "
                  f"{r['parallel']}: {r['docs_per_s']:.2f} docs/s; pause per admitted page mean {r['pause_ms_mean']:.1f} "
                  f"ms, max {r['pause_ms_max']:.1f} ms ({r['admitted']} pages)")
            continue
        if r["path"].startswith("handoff"):
            print(f"{r['path']}: {r['ms_per_page']:.2f} ms per {r['page']} page (prepare, send, take in the child, ack)")
            continue
        if r["path"] == "prefect":
            print(f"prefect{'' if r['prefect_heartbeat'] else ' (heartbeat off)'}: a flow whose body sleeps "
                  f"{r['body_s']:.1f} s: the call takes {r['call_s']:.2f} s, "
                  f"{r['exit_s']:.2f} s of it after the Completed state")
            continue
        if r["path"] == "scoring":
            print(f"scoring: {r['ms_per_token']:.3f} ms per token at a {r['vocab']}-token vocabulary (numpy log-softmax)")
            continue
        if r["path"] == "openmp":
            print(f"openmp ({r['openmp_wait']}), isolated engine on {r['docs']} pages at {r['parallel']}: "
                  f"{r['docs_per_s']:.2f} docs/s ({', '.join(f'{w:.2f}' for w in r['walls_s'])} s)")
            continue
        name = r["path"] + (" ov=" + ("on" if r["overlap"] else "off") if "overlap" in r else "")
        name += f" enc={r['encode_workers']}" if r.get("encode_workers", 1) > 1 else ""
        name += (" isolated" if r["isolate"] else " in-proc") if "isolate" in r else ""
        name += " per-chunk" if r.get("stream") == "per chunk" else ""
        name += " no-hb" if r.get("prefect_heartbeat") is False else ""
        enc = f"{r['encode_ms_per_page']:.0f}" if "encode_ms_per_page" in r else "-"
        xs = f"{r['x_server']:.2f}" if "x_server" in r else "-"
        print(f"{name:<21} {r['parallel']:>4} {r['docs_per_s']:>8.2f} {r.get('gen_tok_per_s', 0):>8.1f} {enc:>7} "
              f"{r['x_naive']:>8.2f} {xs:>8} {r['peak_rss_mb']:>8.0f}")
    plain = [r["gen_tok_per_s"] for r in results if r["path"] == "engine-noconf"]
    scored = [r["gen_tok_per_s"] for r in results if r["path"] == "engine" and r["parallel"] == max(parallel)
              and r.get("overlap")][-len(plain):] if plain else []
    if plain and scored:
        print(f"confidences: {sum(scored) / len(scored):.1f} vs {sum(plain) / len(plain):.1f} gen tok/s without "
              f"(mean of {len(plain)} alternating runs at {max(parallel)}): "
              f"{100 * (1 - sum(scored) / sum(plain)):+.1f}% cost")
    def cpu_line(runs: list[dict]) -> str:  # a flow row's last run, CPU seconds by process
        last = runs[-1]
        return ", ".join(f"{kind} {last[kind]:.2f}" for kind in sorted(last) if last[kind] >= 0.01)

    for flow in flows:
        chunks = "" if flow["chunk_size"] >= flow["docs"] else f", chunks of {flow['chunk_size']}, {flow['stream']} stream"
        beat = "" if flow["prefect_heartbeat"] else ", Prefect heartbeat off"
        print(f"flow ({'isolated' if flow['isolate'] else 'in-process'}{chunks}{beat}) on {flow['docs']} pages at "
              f"{flow['parallel']}: {flow['docs_per_s']:.2f} docs/s; its engine alone on the same pages decoded "
              f"{flow['engine_alone_docs_per_s']:.2f} docs/s: flow = {flow['x_engine_same_pages']:.2f}x engine "
              f"(up to its Completed state {flow['x_engine_to_completed']:.2f}x, then {flow['prefect_exit_s']:.2f} s of "
              f"Prefect's flow-run exit); against the engine decoding the files as it goes "
              f"{flow['x_engine_from_files']:.2f}x ({flow['x_engine_from_files_to_completed']:.2f}x); "
              f"median of {len(flow['walls_s'])} triples; sums: {flow['x_engine_same_pages_total']:.2f}x "
              f"({flow['x_engine_to_completed_total']:.3f}x up to Completed, 95% interval "
              f"{flow['x_engine_to_completed_total_ci95'][0]:.3f}-{flow['x_engine_to_completed_total_ci95'][1]:.3f}; "
              f"against the files {flow['x_engine_from_files_to_completed_total']:.3f}x, "
              f"{flow['x_engine_from_files_to_completed_total_ci95'][0]:.3f}-"
              f"{flow['x_engine_from_files_to_completed_total_ci95'][1]:.3f})")
        if flow["cpu_s_flow"]:
            print(f"  CPU s, last triple: flow run: {cpu_line(flow['cpu_s_flow'])}; engine on the files: "
                  f"{cpu_line(flow['cpu_s_engine_from_files'])}")
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
