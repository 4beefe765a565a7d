"""The ``medvlm`` command as a user runs it: a real subprocess, real Prefect, real llama.cpp."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from conftest import write_manifest

pytestmark = pytest.mark.e2e  # pytest -m 'not e2e' leaves these out

MEDVLM = str(Path(sys.executable).with_name("medvlm"))


def medvlm(*args: str, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([MEDVLM, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=os.environ.copy())


def test_run_command_end_to_end(tmp_path, tiny_llava, demo_docs):
    records = demo_docs + [{"document_id": "gone", "image_uri": "documents/gone.png"}]
    manifest = write_manifest(tmp_path / "manifest.parquet", records)
    out = tmp_path / "out"
    proc = medvlm(
        "run", "--manifest", str(manifest), "--output", str(out), "--model", str(tiny_llava.model_path),
        "--mmproj", str(tiny_llava.mmproj_path), "--prompt-id", "transcribe", "--max-tokens", "5",
        "--n-ctx", "4096", "--seed", "7", "--temperature", "0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 manifest rows -> 3 ok pages, 1 error pages" in proc.stdout and "reconciled=True" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    rows = ds.dataset(out / "completions", partitioning="hive").to_table().to_pylist()
    assert sorted((r["document_id"], r["status"]) for r in rows) == [
        ("discharge-0001", "ok"), ("gone", "error"), ("lab-0003", "ok"), ("rx-0002", "ok")
    ]
    assert {r["prompt_id"] for r in rows} == {"transcribe"}
    assert all(r["completion_tokens"] == 5 for r in rows if r["status"] == "ok")


def test_run_command_refuses_bad_setup_with_one_message(tmp_path, tiny_llava, demo_docs):
    manifest = write_manifest(tmp_path / "m.csv", demo_docs)
    proc = medvlm(
        "run", "--manifest", str(manifest), "--output", str(tmp_path / "o"), "--model", str(tiny_llava.mmproj_path),
        "--mmproj", str(tiny_llava.mmproj_path),
    )
    assert proc.returncode == 2
    assert "medvlm: error:" in proc.stderr and "is not a text model GGUF" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    bad = write_manifest(tmp_path / "bad.csv", [{"document_id": "a", "path": "x.png"}])
    proc = medvlm("run", "--manifest", str(bad), "--output", str(tmp_path / "o"), "--model", str(tiny_llava.model_path),
                  "--mmproj", str(tiny_llava.mmproj_path))
    assert proc.returncode == 2 and "missing required column(s) image_uri" in proc.stderr
    assert not (tmp_path / "o" / "completions").exists()


def test_demo_command(tmp_path):
    proc = medvlm("demo", "--workdir", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 manifest rows -> 6 ok pages" in proc.stdout
    assert "meaningless" in proc.stdout and "--mmproj" in proc.stdout
    for doc in ("discharge-0001", "rx-0002", "lab-0003", "discharge-0004"):
        assert doc in proc.stdout
    # the three-page discharge summary, then answered as one document
    assert "documents: 1 answered, 0 error" in proc.stdout and "discharge-0004    1-3 ok" in proc.stdout
    rows = ds.dataset(tmp_path / "demo" / "output" / "completions", partitioning="hive").to_table().to_pylist()
    assert sorted((r["scope"], r["document_id"]) for r in rows if r["scope"] == "document") == [
        ("document", "discharge-0004")]
    assert len(rows) == 7


def test_demo_command_s3_to_s3(tmp_path):
    proc = medvlm("demo", "--s3", "--workdir", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "local S3 server (SeaweedFS) at http://127.0.0.1:" in proc.stdout
    assert "4 manifest rows -> 6 ok pages" in proc.stdout
    assert "completions: s3://medvlm-demo/output/completions/run_date=" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    # the server was stopped with the demo
    assert subprocess.run(["pgrep", "-f", str(tmp_path / "demo" / "s3")], capture_output=True).returncode == 1


def test_make_tiny_model_command(tmp_path):
    proc = medvlm("make-tiny-model", "--out", str(tmp_path), "--family", "qwen2vl")
    assert proc.returncode == 0 and (tmp_path / "tiny-qwen2vl.gguf").exists() and (tmp_path / "tiny-qwen2vl-mmproj.gguf").exists()
    proc = medvlm("make-tiny-model", "--out", str(tmp_path), "--family", "gpt9")
    assert proc.returncode == 2 and "gpt9" in proc.stderr


def test_a_failed_run_ends_with_its_error(tmp_path, demo_docs, tiny_llava):
    """The temporary Prefect server stops before the error is printed: the error is the last line a user reads."""
    manifest = write_manifest(tmp_path / "manifest.csv", demo_docs)
    done = subprocess.run(
        [MEDVLM, "run", "--manifest", str(manifest), "--output", str(tmp_path / "out"),
         "--model", str(tmp_path / "no-such-model.gguf"), "--mmproj", str(tiny_llava.mmproj_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, env=os.environ.copy(),
    )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert done.returncode == 2, done.stdout[-3000:]
    assert lines[-1].startswith("medvlm: error: ") and "no-such-model.gguf" in lines[-1], lines[-5:]
    assert any("Stopping temporary server" in line for line in lines[:-1]), lines[-5:]  # it did start one
