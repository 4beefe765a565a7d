"""Shared fixtures: an isolated Prefect home, tiny real GGUF models, synthetic documents and manifests.

Prefect settings are set here, before anything imports Prefect, so every test (and every ``medvlm``
subprocess, which inherits the environment) uses a throwaway ephemeral server under a temp folder.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# The Airflow provider's tests need an environment of their own (Airflow and Prefect cannot share one): they run
# with make test-airflow.
collect_ignore = ["airflow"]

_PREFECT_HOME = tempfile.mkdtemp(prefix="medvlm-test-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("PREFECT_API_KEY", None)
os.environ["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "true"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_TO_API_ENABLED"] = "false"
os.environ["MEDVLM_CACHE_DIR"] = os.path.join(_PREFECT_HOME, "medvlm-cache")
# The reliability checks' records (tests/support/reliability_report.py): one file for the run, made by the process that
# starts it and inherited by the pytest-xdist workers, which start after this runs.
_REPORT_OWNER = "MEDVLM_RELIABILITY_REPORT" not in os.environ
if _REPORT_OWNER:
    os.environ["MEDVLM_RELIABILITY_REPORT"] = os.path.join(tempfile.mkdtemp(prefix="medvlm-test-reliability-"),
                                                           "report.jsonl")

from medvlm_core.testing.demo_docs import DOCUMENTS, write_demo_documents  # noqa: E402
from medvlm_core.testing.tiny_model import make_tiny_model  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    from medvlm_core.engine import close_shared_engines

    close_shared_engines()
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """The generated LLaVA-style tiny model pair (real llama.cpp loads it)."""
    return make_tiny_model(tmp_path_factory.mktemp("model-llava"), family="llava")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """The generated Qwen2-VL-style tiny model pair."""
    return make_tiny_model(tmp_path_factory.mktemp("model-qwen"), family="qwen2vl")


@pytest.fixture
def demo_docs(tmp_path):
    """The three synthetic clinical documents as PNGs in ``tmp_path/documents``; returns manifest records."""
    return write_demo_documents(tmp_path / "documents")


def batch(manifest: str, output: str, model: str, mmproj: str | None = None, return_state: bool = False, **options):
    """The ``medvlm-batch`` flow with its run options given flat (``max_tokens=4``), as most tests write them."""
    from medvlm.flows.batch import medvlm_batch

    return medvlm_batch(manifest=manifest, output=output, model=model, mmproj=mmproj, options=options,
                        return_state=return_state)


# A valid SHA-256 hex digest, for rows made by hand.
HEX64 = "ab" * 32


def completion_row(**change) -> dict:
    """One valid ``ok`` completions row (run ``r1``, document ``d``, manifest row 1), with ``change`` applied:
    for tests that write or publish tables by hand."""
    from medvlm_core.output import results

    row = {
        "run_id": "r1", "result_key": HEX64, "document_id": "d", "page": 1, "manifest_row": 1,
        "image_sha256": HEX64, "prompt_sha256": HEX64, "model_sha256": HEX64, "mmproj_sha256": HEX64,
        "status": "ok", "completion": "text", "completion_tokens": 3, "created_at": results.utc_now(),
    }
    return row | change


def run_row(pages: int = 1, **change) -> dict:
    """The valid runs row of run ``r1`` that answered ``pages`` pages, with ``change`` applied."""
    row = {"run_id": "r1", "manifest_rows": pages, "quarantined_rows": 0, "skipped_rows": 0, "processed_rows": pages,
           "pages_ok": pages, "pages_error": 0}
    return row | change


def write_manifest(path: Path, records: list[dict]) -> Path:
    """Write records as a manifest in the format given by ``path``'s extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for r in records:
        columns += [k for k in r if k not in columns]
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(records)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in records]), path)
    return path


@pytest.fixture
def documents():
    """The synthetic documents' definitions (ids, patient ids, text)."""
    return DOCUMENTS


@pytest.fixture
def vitals_extraction(tmp_path):
    """A user extraction (``vitals``) whose schema forces one or two short items, so even the random tiny model
    extracts rows (to query, to score)."""
    spec = {"prompt_id": "vitals", "prompt": "List every vital sign on the page.",
            "schema": {"type": "object", "required": ["vitals"], "properties": {"vitals": {
                "type": "array", "minItems": 1, "maxItems": 2,
                "items": {"type": "object", "required": ["name", "value"],
                          "properties": {"name": {"type": "string", "maxLength": 5},
                                         "value": {"type": "string", "maxLength": 4}}}}}}}
    path = tmp_path / "vitals.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """One Prefect test server for the in-process flows of the session, stopped cleanly at the end."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One real S3 server (SeaweedFS on loopback) for the session; each test module creates its own bucket."""
    from medvlm_core.testing.s3_server import LocalS3Server

    server = LocalS3Server(tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The server's credentials and endpoint in the environment (the standard AWS variables), and an fs that
    talks to it directly."""
    import s3fs

    from medvlm_core.storage import s3_options

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3fs.S3FileSystem(**s3_options(endpoint_url=s3_server.endpoint_url))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """After the test summary: what the reliability suite tried and survived (tests/support/reliability_report.py)."""
    from support.reliability_report import lines

    path = Path(os.environ["MEDVLM_RELIABILITY_REPORT"])
    text = lines(path)
    if text:
        terminalreporter.section("reliability: faults injected, inputs tried, rows lost")
        for line in text:
            terminalreporter.write_line(line)
    if _REPORT_OWNER:
        shutil.rmtree(path.parent, ignore_errors=True)
