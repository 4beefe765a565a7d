"""The Airflow provider end to end, in its own environment (``make test-airflow``: ``.[airflow-test]``, no Prefect).

``airflow dags test`` runs the example DAGs (and a fan-out whose shard dies once) on a generated model, over
documents in a real S3 server (SeaweedFS on loopback) reached through an Airflow ``aws`` connection; the tests
read the tables the runs published. The reference for "the same tables a Prefect run writes" is the core's
in-process run of the same manifest (``MedicalVisionLLM.transform``), whose result keys the main suite checks
against the Prefect flows'.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3fs

from medvlm_core.testing.demo_docs import DOCUMENTS, write_demo_documents
from medvlm_core.testing.s3_server import LocalS3Server
from medvlm_core.testing.tiny_model import make_tiny_model

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
OPTIONS = {"max_tokens": 8, "temperature": 0.0, "n_ctx": 2048}
PAGES = len(DOCUMENTS)


def _manifest_csv(records: list[dict]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["document_id", "image_uri", "page", "patient_id"])
    writer.writeheader()
    for record in records:
        writer.writerow(record)
    return buffer.getvalue().encode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """An Airflow home (SQLite, migrated), a DAG folder with the example DAGs and the test DAG, an S3 server with
    the demo documents and a manifest (one bad row), an ``aws`` connection to it, and a tiny model."""
    work = tmp_path_factory.mktemp("airflow")
    server = LocalS3Server(work / "s3").start()
    fs = s3fs.S3FileSystem(**server.storage_options())
    server.create_bucket("records")
    server.create_bucket("analytics")
    docs = write_demo_documents(work / "docs")
    records = []
    for record in docs:
        fs.put(str(work / "docs" / Path(record["image_uri"]).name), f"records/docs/{Path(record['image_uri']).name}")
        records.append({"document_id": record["document_id"], "image_uri": f"docs/{Path(record['image_uri']).name}",
                        "page": 1, "patient_id": record["patient_id"]})
    records.append({"document_id": "bad-row", "image_uri": "docs/missing.png", "page": 0, "patient_id": "P-0"})
    fs.pipe("records/manifest.csv", _manifest_csv(records))

    import medvlm.airflow.example_dags as examples

    dags = work / "dags"
    dags.mkdir()
    for name in ("medvlm_batch.py", "medvlm_fanout.py", "medvlm_nightly.py"):
        (dags / name).symlink_to(Path(examples.__file__).parent / name)
    (dags / "medvlm_fanout_dies_once.py").symlink_to(HERE / "dags" / "medvlm_fanout_dies_once.py")
    model = make_tiny_model(work / "model", family="qwen2vl")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AIRFLOW"))}
    env.update({
        "AIRFLOW_HOME": str(work / "home"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "MEDVLM_CACHE_DIR": str(work / "cache"),
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        # The only credentials: an Airflow connection (the environment has no AWS variables).
        "AIRFLOW_CONN_MEDVLM_S3": json.dumps({
            "conn_type": "aws", "login": server.credentials.access_key, "password": server.credentials.secret_key,
            "extra": {"endpoint_url": server.endpoint_url},
        }),
    })
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True, timeout=600)
    yield {"env": env, "fs": fs, "server": server, "model": model, "work": work, "records": records, "outputs": []}
    server.stop()


def dags_test(stack, dag_id: str, **conf) -> subprocess.CompletedProcess:
    """``airflow dags test DAG_ID -c CONF`` over the stack's manifest, model and connection."""
    conf = {"manifest": "s3://records/manifest.csv", "model": str(stack["model"].model_path),
            "mmproj": str(stack["model"].mmproj_path), "options": OPTIONS, "aws_conn_id": "medvlm_s3", **conf}
    done = subprocess.run([str(BIN / "airflow"), "dags", "test", dag_id, "-c", json.dumps(conf)], env=stack["env"],
                          capture_output=True, text=True, timeout=900)
    stack["outputs"].append(done.stdout + done.stderr)  # dags test logs the tasks to its console, not to files
    return done


def table(stack, output: str, name: str) -> list[dict]:
    """Every published row of one table of an output."""
    fs = stack["fs"]
    fs.invalidate_cache()  # another process wrote since the last listing
    rows = []
    for path in sorted(fs.find(f"{output}/{name}")):
        if path.endswith(".parquet"):
            with fs.open(path, "rb") as f:
                rows += pq.read_table(f).to_pylist()
    return rows


def check_run(stack, output: str) -> tuple[list[dict], list[dict]]:
    """One ok row per page, a reconciled runs row per run, the bad row quarantined; the completions and runs."""
    completions, runs = table(stack, output, "completions"), table(stack, output, "runs")
    ok = [r for r in completions if r["status"] == "ok"]
    assert sorted(r["document_id"] for r in ok) == sorted(DOCUMENTS)
    assert len({r["result_key"] for r in ok}) == PAGES
    assert runs and all(r["reconciled"] for r in runs)
    assert runs[0]["manifest_rows"] == PAGES + 1 and runs[0]["quarantined_rows"] == 1
    assert [q["row_number"] for q in table(stack, output, "quarantine")][:1] == [PAGES + 1]
    return completions, runs


@pytest.fixture(scope="module")
def reference_keys(stack):
    """The result keys of the core's in-process run of the same manifest (no orchestrator)."""
    from medvlm_core.api import MedicalVisionLLM

    server = stack["server"]
    os.environ.update(server.env())  # this process reads the manifest directly
    try:
        with MedicalVisionLLM.load(str(stack["model"].model_path), str(stack["model"].mmproj_path), **OPTIONS) as vlm:
            result = vlm.transform("s3://records/manifest.csv")
    finally:
        for key in server.env():
            os.environ.pop(key, None)
    return {r["result_key"] for r in result.completions.to_pylist() if r["status"] == "ok"}


def test_the_environment_has_airflow_and_the_provider_but_no_prefect(stack):
    assert importlib.util.find_spec("airflow") is not None and importlib.util.find_spec("medvlm_core") is not None
    assert importlib.util.find_spec("prefect") is None
    listed = subprocess.run([str(BIN / "airflow"), "providers", "list"], env=stack["env"], capture_output=True,
                            text=True, timeout=300)
    assert listed.returncode == 0 and "medvlm" in listed.stdout
    errors = subprocess.run([str(BIN / "airflow"), "dags", "list-import-errors", "--local"], env=stack["env"],
                            capture_output=True, text=True, timeout=300)
    assert errors.returncode == 0 and "medvlm" not in errors.stdout, errors.stdout  # every DAG file parses
    dags = subprocess.run([str(BIN / "airflow"), "dags", "list", "--local"], env=stack["env"], capture_output=True,
                          text=True, timeout=300)
    assert all(d in dags.stdout for d in ("medvlm_batch", "medvlm_fanout", "medvlm_nightly")), dags.stdout
    # the Prefect-only command says what to install instead of a traceback
    cli = subprocess.run([str(BIN / "medvlm"), "run", "--manifest", "m.csv", "--output", "o", "--model", "x.gguf"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "medvlm[prefect]" in cli.stderr


def test_batch_then_a_rerun_that_skips_everything(stack, reference_keys):
    done = dags_test(stack, "medvlm_batch", output="s3://analytics/batch")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    completions, runs = check_run(stack, "analytics/batch")
    assert {r["result_key"] for r in completions if r["status"] == "ok"} == reference_keys
    assert runs[0]["flow_run_id"].startswith("airflow:medvlm_batch/")

    again = dags_test(stack, "medvlm_batch", output="s3://analytics/batch")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    completions, runs = check_run(stack, "analytics/batch")
    assert len([r for r in completions if r["status"] == "ok"]) == PAGES  # nothing ran twice
    rerun = max(runs, key=lambda r: r["started_at"])
    assert len(runs) == 2 and rerun["pages_ok"] == 0 and rerun["skipped_pages"] == PAGES


def test_fanout_of_several_mapped_shards_publishes_one_run(stack, reference_keys):
    done = dags_test(stack, "medvlm_fanout", output="s3://analytics/fanout", shard_size=1)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    completions, runs = check_run(stack, "analytics/fanout")
    assert {r["result_key"] for r in completions if r["status"] == "ok"} == reference_keys
    assert len(runs) == 1 and len({r["run_id"] for r in completions}) == 1
    assert "shard 2 of run" in done.stdout + done.stderr  # three mapped shards ran


def test_a_shard_that_dies_is_retried_by_airflow_exactly_once(stack, reference_keys):
    done = dags_test(stack, "medvlm_fanout_dies_once", output="s3://analytics/flaky", shard_size=1)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "shard 1 dies on its first try" in done.stdout + done.stderr  # the fault did happen
    completions, runs = check_run(stack, "analytics/flaky")
    assert len(completions) == PAGES and {r["result_key"] for r in completions} == reference_keys
    assert len(runs) == 1


def test_a_shard_that_fails_for_good_becomes_error_rows_and_fails_the_run(stack):
    done = dags_test(stack, "medvlm_fanout_shard_fails", output="s3://analytics/failing", shard_size=1)
    assert done.returncode != 0  # the publishing task fails, naming the shard, after publishing
    assert "1 of 3 shard(s) failed (shard 1: its task shard failed)" in done.stdout + done.stderr
    completions, runs = table(stack, "analytics/failing", "completions"), table(stack, "analytics/failing", "runs")
    failed = [r for r in completions if r["status"] == "error"]
    assert len(completions) == PAGES and len(failed) == 1 and failed[0]["error_type"] == "task_failed"
    assert "shard 1 failed without leaving its record" in failed[0]["error_message"]
    assert len(runs) == 1 and runs[0]["reconciled"] and runs[0]["pages_error"] == 1


def test_bad_options_fail_before_any_work_naming_the_option(stack):
    done = dags_test(stack, "medvlm_batch", output="s3://analytics/refused", options={"max_tokenz": 5})
    assert done.returncode != 0
    assert "max_tokenz" in done.stdout + done.stderr
    assert not stack["fs"].exists("analytics/refused/completions")


def test_no_credential_or_document_text_reaches_xcom_logs_or_the_database(stack):
    """After every DAG run above: the S3 secret and the documents' text are in no task log (``dags test`` prints
    them to its console, unmasked, so nothing may log them), nor in the metadata database (XCom, rendered
    templates, asset events, the DAG runs' conf)."""
    secret = stack["server"].credentials.secret_key
    patient_name = "Jane Example"  # printed on a demo page: a model could echo it, XCom and logs must not
    outputs = stack["outputs"]
    assert len(outputs) >= 4 and all("medvlm run" in out for out in outputs[:3])
    for out in outputs:
        assert secret not in out and patient_name not in out
    home = Path(stack["env"]["AIRFLOW_HOME"])
    database = [p for p in home.rglob("*.db")]
    assert database and any(b"medvlm_run" in p.read_bytes() for p in database)  # the XCom is there
    # each published run left an event on the examples' Asset, its counts in the event's extra
    with sqlite3.connect(home / "airflow.db") as db:
        events = [json.loads(extra) for (extra,) in db.execute(
            "select e.extra from asset_event e join asset a on a.id = e.asset_id where a.name = 'medvlm_results'")]
    assert len(events) >= 3 and all(e["reconciled"] and "pages_ok" in e and "run_id" in e for e in events)
    for path in [p for p in home.rglob("*") if p.is_file()]:
        data = path.read_bytes()
        assert secret.encode() not in data, f"the S3 secret key is in {path}"
        assert patient_name.encode() not in data, f"document text is in {path}"
