"""Production set-up end to end: a real Prefect server, work pools, `prefect deploy --all` from prefect.yaml,
two GPU-pool process workers and a CPU-pool worker, and `prefect deployment run` of the fan-out.

Checks: shards ran on both GPU workers at the same time and the output is complete; a second run skips
everything; a worker killed mid-shard (SIGKILL) is survived: the shard is relaunched elsewhere and the
output has exactly one ok row per key; the nightly deployment carries its schedule.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from PIL import Image

from conftest import write_manifest
from medvlm_core.testing.s3_server import free_port

pytestmark = pytest.mark.e2e  # pytest -m 'not e2e' leaves these out

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def kill_tree(process: subprocess.Popen) -> None:
    for pid in descendants(process.pid) + [process.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


class PrefectStack:
    """A Prefect server on loopback plus workers, all in a temp PREFECT_HOME, killed at the end."""

    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.env.update(
            PREFECT_HOME=str(home), PREFECT_API_URL=f"http://127.0.0.1:{self.port}/api",
            PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="1",
            PREFECT_WORKER_PREFETCH_SECONDS="1", MEDVLM_CACHE_DIR=str(home / "medvlm-cache"),
            PATH=f"{BIN}:{os.environ['PATH']}",
        )
        self.processes: dict[str, subprocess.Popen] = {}

    def spawn(self, name: str, *args: str, cwd: Path = REPO, **env: str) -> subprocess.Popen:
        log = open(self.home / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [str(BIN / "prefect"), *args], cwd=cwd, env=dict(self.env, **env), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[name] = proc
        return proc

    def cli(self, *args: str, timeout: float = 180, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(BIN / "prefect"), *args], cwd=cwd, env=dict(self.env, **env), capture_output=True,
                              text=True, timeout=timeout)
        assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        return proc

    def start_server(self) -> None:
        self.spawn("server", "server", "start", "--host", "127.0.0.1", "--port", str(self.port))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("Prefect server did not start:\n" + (self.home / "server.log").read_text()[-3000:])

    @contextlib.contextmanager
    def client(self):
        """A Prefect client of this stack's server."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            yield client

    def wait_for_workers(self, pool: str, names: set[str], timeout: float = 300) -> None:
        """Wait until the workers ``names`` of ``pool`` are online (polling for runs): a worker process takes
        seconds to start on a loaded machine, and one that starts late would pick up its shard only after the other
        shard ran."""
        from prefect.client.schemas.objects import WorkerStatus

        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                online = {w.name for w in client.read_workers_for_work_pool(pool) if w.status == WorkerStatus.ONLINE}
                if names <= online:
                    return
                assert time.monotonic() < deadline, f"workers {sorted(names - online)} of {pool} not online after {timeout} s"
                time.sleep(0.5)

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                kill_tree(proc)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = PrefectStack(tmp_path_factory.mktemp("stack") / "prefect")
    s.home.mkdir()
    try:
        s.start_server()
        s.cli("work-pool", "create", "medvlm-gpu", "--type", "process")
        s.cli("work-pool", "create", "medvlm-cpu", "--type", "process")
        s.cli("--no-prompt", "deploy", "--all")
        yield s
    finally:
        s.stop()


def run_deployment(stack: PrefectStack, name: str, timeout: int = 900, **params) -> str:
    args = ["deployment", "run", name, "--watch", "--watch-interval", "1", "--watch-timeout", str(timeout)]
    for key, value in params.items():
        args += ["--param", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return stack.cli(*args, timeout=timeout + 30).stdout


def shard_runs_and_progress(stack: PrefectStack) -> dict:
    """From the stack's server: every ``medvlm-shard`` flow run as (created, ended), and the progress values of
    the fan-out's progress artifacts, oldest first."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with stack.client() as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["medvlm-shard"])))
        artifacts = [a for a in client.read_artifacts() if a.type == "progress"]
    shards = sorted((r.created, r.end_time or datetime.max.replace(tzinfo=r.created.tzinfo)) for r in runs)
    return {"shards": shards, "artifacts": [a.data for a in sorted(artifacts, key=lambda a: a.created)]}


def commit_records(output: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in (output / "_commits").glob("*.json")), key=lambda r: r["committed_at"])


def test_fan_out_over_two_gpu_workers(stack, tmp_path, tiny_llava, tiny_qwen, demo_docs):
    docs = tmp_path / "documents"
    for i in range(5):
        Image.new("RGB", (300 + 10 * i, 400), "white").save(docs / f"extra-{i}.png")
    records = demo_docs + [{"document_id": f"extra-{i}", "image_uri": f"documents/extra-{i}.png"} for i in range(5)]
    manifest = write_manifest(tmp_path / "manifest.csv", records)
    output = tmp_path / "out"
    common = dict(manifest=str(manifest), output=str(output), model=str(tiny_llava.model_path),
                  mmproj=str(tiny_llava.mmproj_path), options={"max_tokens": 2000, "n_ctx": 4096, "chunk_size": 2},
                  shard_size=4)

    # the nightly deployment was deployed with its schedule
    nightly = stack.cli("deployment", "inspect", "medvlm-nightly/medvlm-nightly").stdout
    assert "0 2 * * *" in nightly and "America/New_York" in nightly

    stack.spawn("gpu-0", "worker", "start", "--pool", "medvlm-gpu", "--limit", "1", "--name", "gpu-0", CUDA_VISIBLE_DEVICES="0")
    stack.spawn("gpu-1", "worker", "start", "--pool", "medvlm-gpu", "--limit", "1", "--name", "gpu-1", CUDA_VISIBLE_DEVICES="1")
    stack.spawn("cpu-0", "worker", "start", "--pool", "medvlm-cpu", "--limit", "2", "--name", "cpu-0")
    stack.wait_for_workers("medvlm-gpu", {"gpu-0", "gpu-1"})  # both poll before the shards exist, so both get one

    # 1. the fan-out: 8 rows in 2 shards, one on each GPU worker, at the same time
    run_deployment(stack, "medvlm-fanout/medvlm-fanout", **common)
    [first] = commit_records(output)
    shards = first["shards"]
    assert sorted(s["worker"]["cuda_visible_devices"] for s in shards) == ["0", "1"]
    spans = [(datetime.fromisoformat(s["started_at"]), datetime.fromisoformat(s["finished_at"])) for s in shards]
    assert max(a for a, _ in spans) < min(b for _, b in spans), f"shards did not overlap: {spans}"
    rows = ds.dataset(output / "completions", partitioning="hive").to_table().to_pylist()
    assert sorted(r["document_id"] for r in rows) == sorted(r["document_id"] for r in records)
    assert {r["status"] for r in rows} == {"ok"}

    # the run's pages are in the done index, which the shards of the next run read (each only its documents')
    state = json.loads((output / "_index" / "done" / "state.json").read_text())
    assert state["runs"] == [first["run_id"]]
    progress = shard_runs_and_progress(stack)
    assert progress["artifacts"] and progress["artifacts"][-1] == 100.0  # the progress artifact reached 100 %

    # the published event triggered the downstream report deployment (prefect.yaml's trigger), which ran
    report = output / "reports" / "throughput_per_run" / f"report-{first['run_id']}.parquet"
    deadline = time.monotonic() + 600
    while not report.exists() and time.monotonic() < deadline:
        time.sleep(1)
    assert report.exists(), "the medvlm-report deployment was not triggered by medvlm.run.published"
    assert [r["run_id"] for r in ds.dataset(report).to_table().to_pylist()] == [first["run_id"]]

    # 2. the same again, one shard run at a time: everything is skipped (the done index says so)
    run_deployment(stack, "medvlm-fanout/medvlm-fanout", **dict(common, max_concurrent_shards=1))
    runs = {r["run_id"]: r for r in ds.dataset(output / "runs", partitioning="hive").to_table().to_pylist()}
    second = runs[commit_records(output)[1]["run_id"]]
    assert (second["pages_ok"], second["skipped_rows"], second["reconciled"]) == (0, 8, True)
    later = [r for r in shard_runs_and_progress(stack)["shards"] if r[0] > max(b for _, b in spans)]
    assert len(later) == 2 and later[1][0] >= later[0][1], f"the second shard run existed before the first ended: {later}"

    # 3. a GPU worker is killed mid-shard; its shard is relaunched on the other worker; exactly once
    output2 = tmp_path / "out2"
    slow = dict(common, output=str(output2), model=str(tiny_qwen.model_path), mmproj=str(tiny_qwen.mmproj_path),
                options={"max_tokens": 48, "n_ctx": 4096, "chunk_size": 1, "max_pixels": 1_300_000},
                shard_timeout_seconds=40)  # isolation: the shard starts a child too
    for i in range(5):  # bigger pages: the qwen-style encoder makes each take a while
        Image.new("RGB", (1000, 1300), "white").save(docs / f"extra-{i}.png")
    runner = subprocess.Popen(
        [str(BIN / "prefect"), "deployment", "run", "medvlm-fanout/medvlm-fanout", "--watch", "--watch-interval", "1",
         "--watch-timeout", "900", *sum((["--param", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"] for k, v in slow.items()), [])],
        cwd=REPO, env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 400
    staged = []
    busy = False  # gpu-0 is executing a shard run (its flow-run process exists): a worker may start late
    while time.monotonic() < deadline and not (staged and busy):
        staged = list((output2 / "_staging").glob("*/completions/shard-*-chunk-*.parquet"))
        busy = bool(descendants(stack.processes["gpu-0"].pid))
        time.sleep(0.2)
    assert staged and busy, f"no shard started on gpu-0 (staged: {len(staged)})"
    kill_tree(stack.processes["gpu-0"])  # the worker and the shard run it was executing
    out, _ = runner.communicate(timeout=930)
    assert runner.returncode == 0, out[-1500:] + str(commit_records(output2))

    [record] = commit_records(output2)
    assert record["failed_shards"] == {}
    # the killed worker's shard was launched twice and finished on the surviving worker
    assert sorted(record["shard_attempts"].values()) == [1, 2]
    assert [s["worker"]["cuda_visible_devices"] for s in record["shards"]] == ["1", "1"]
    rows = ds.dataset(output2 / "completions", partitioning="hive").to_table().to_pylist()
    keys = [r["result_key"] for r in rows if r["status"] == "ok"]
    assert len(keys) == len(set(keys)) == 8  # every page exactly once
    [run] = ds.dataset(output2 / "runs", partitioning="hive").to_table().to_pylist()
    assert (run["pages_ok"], run["reconciled"]) == (8, True)



def test_a_worker_elsewhere_runs_the_code_from_a_git_clone(stack, tmp_path, tiny_llava, demo_docs):
    """prefect.yaml's ``pull_from_git``: a worker with medvlm installed but no checkout runs a deployment whose
    flow runs clone the repository (here a local bare one made from this working tree) into a temp folder."""
    import shutil

    import yaml

    tree = tmp_path / "checkout"
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tree / name)
    git = ["git", "-c", "user.name=medvlm-test", "-c", "user.email=test@example.org", "-c", "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "medvlm"]):
        subprocess.run(git + args, cwd=tree, check=True)
    remote = tmp_path / "medvlm.git"
    subprocess.run(git + ["clone", "-q", "--bare", str(tree), str(remote)], check=True)

    # deploy from the checkout with the shipped git pull, to a pool whose worker runs in an empty folder
    config = yaml.safe_load((tree / "prefect.yaml").read_text())
    config["pull"] = config["definitions"]["pull_from_git"]
    [batch] = [d for d in config["deployments"] if d["name"] == "medvlm-batch"]
    config["deployments"] = [dict(batch, name="medvlm-batch-remote", work_pool={"name": "medvlm-remote"})]
    (tree / "prefect.remote.yaml").write_text(yaml.safe_dump(config))
    stack.cli("work-pool", "create", "medvlm-remote", "--type", "process")
    stack.cli("--no-prompt", "deploy", "--prefect-file", "prefect.remote.yaml", "--all", cwd=tree,
              MEDVLM_GIT_REPOSITORY=remote.as_uri(), MEDVLM_GIT_BRANCH="main")
    with stack.client() as client:
        steps = client.read_deployment_by_name("medvlm-batch/medvlm-batch-remote").pull_steps
    assert steps == [{"prefect.deployments.steps.git_clone": {"repository": remote.as_uri(), "branch": "main"}}], steps
    elsewhere = tmp_path / "worker-home"
    elsewhere.mkdir()
    stack.spawn("remote-0", "worker", "start", "--pool", "medvlm-remote", "--limit", "1", "--name", "remote-0",
                cwd=elsewhere)

    output = tmp_path / "out"
    run_deployment(stack, "medvlm-batch/medvlm-batch-remote", manifest=str(write_manifest(tmp_path / "m.csv", demo_docs)),
                   output=str(output), model=str(tiny_llava.model_path), mmproj=str(tiny_llava.mmproj_path),
                   options={"max_tokens": 4, "n_ctx": 4096})
    rows = ds.dataset(output / "completions", partitioning="hive").to_table().to_pylist()
    assert sorted(r["document_id"] for r in rows) == sorted(d["document_id"] for d in demo_docs)
    assert {r["status"] for r in rows} == {"ok"}
    assert not list(elsewhere.iterdir())  # each flow run cloned into its own temp folder
