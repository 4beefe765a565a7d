"""S3 end to end against a real S3 server (SeaweedFS on loopback): documents, manifests, models, tables."""

from __future__ import annotations

import hashlib
import uuid
import zipfile

import duckdb
import pyarrow.dataset as ds
import pytest
import s3fs

from conftest import batch, completion_row, run_row, write_manifest
from medvlm_core.output import results
from medvlm_core.output.paths import OutputLayout
from medvlm_core.output.publish import publish_run
from medvlm_core.storage import Storage, s3_options

BUCKET = "medvlm-test"


@pytest.fixture(scope="module", autouse=True)
def bucket(s3_server):
    """This module's bucket on the session's S3 server (tests/conftest.py); tests use a prefix each."""
    s3_server.create_bucket(BUCKET)


@pytest.fixture
def prefix():
    """A fresh prefix in the test bucket."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


def upload_documents(fs, tmp_path, demo_docs, prefix):
    """Put the demo documents under ``prefix/in/documents`` and return their manifest records."""
    for record in demo_docs:
        fs.put(str(tmp_path / record["image_uri"]), f"{prefix}/in/{record['image_uri']}")
    return demo_docs


def read_s3(fs, url):
    return ds.dataset(url.replace("s3://", ""), filesystem=fs, format="parquet", partitioning="hive").to_table()


def test_s3_to_s3_with_model_from_s3(s3, tmp_path, demo_docs, prefix, tiny_llava, monkeypatch):
    records = upload_documents(s3, tmp_path, demo_docs, prefix)
    records = records + [
        {"document_id": "absolute", "image_uri": f"{prefix}/in/documents/rx-0002.png", "patient_id": "P-9"},
        {"document_id": "missing", "image_uri": "documents/not-there.png"},
    ]
    s3.put(str(write_manifest(tmp_path / "manifest.csv", records)), f"{prefix}/in/manifest.csv")
    s3.put(str(tiny_llava.model_path), f"{prefix}/models/model.gguf")
    s3.put(str(tiny_llava.mmproj_path), f"{prefix}/models/mmproj.gguf")
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEDVLM_CACHE_DIR", str(cache))
    params = dict(
        manifest=f"{prefix}/in/manifest.csv", output=f"{prefix}/out", model=f"{prefix}/models/model.gguf",
        mmproj=f"{prefix}/models/mmproj.gguf", max_tokens=4, n_ctx=4096,
        model_sha256=hashlib.sha256(tiny_llava.model_path.read_bytes()).hexdigest(),
    )
    state = batch(return_state=True, **params)
    assert state.is_completed(), state.message
    summary = state.result()
    assert (summary["pages_ok"], summary["pages_error"], summary["reconciled"]) == (4, 1, True)
    cached = sorted(p.name for p in (cache / "models").iterdir() if p.suffix == ".gguf")
    assert len(cached) == 2
    stamp = {p: p.stat().st_mtime_ns for p in (cache / "models").glob("*.gguf")}

    # second run: the model comes from the cache, not S3, and only the failed page is tried again
    state = batch(return_state=True, **params)
    assert state.is_completed(), state.message
    again = state.result()
    assert (again["pages_ok"], again["pages_error"], again["skipped_rows"], again["reconciled"]) == (0, 1, 4, True)
    assert {p: p.stat().st_mtime_ns for p in (cache / "models").glob("*.gguf")} == stamp

    table = read_s3(s3, f"{prefix}/out/completions")
    rows = table.to_pylist()
    assert table.num_rows == 6  # five pages, then the missing one again, in two files
    by_id = {r["document_id"]: r for r in rows}
    assert by_id["absolute"]["status"] == "ok" and by_id["absolute"]["patient_id"] == "P-9"
    assert by_id["discharge-0001"]["image_uri"] == f"{prefix}/in/documents/discharge-0001.png"
    assert (by_id["missing"]["status"], by_id["missing"]["error_type"]) == ("error", "not_found")
    assert by_id["missing"]["image_uri"] == f"{prefix}/in/documents/not-there.png"
    assert by_id["rx-0002"]["image_sha256"] == hashlib.sha256((tmp_path / "documents" / "rx-0002.png").read_bytes()).hexdigest()

    con = duckdb.connect()
    con.register_filesystem(s3)
    got = con.execute(
        f"select run_date, count(*), count(distinct run_id) from read_parquet('{prefix}/out/completions/*/*.parquet', "
        "hive_partitioning=true) group by 1"
    ).fetchall()
    assert [(n, runs) for _, n, runs in got] == [(6, 2)]
    assert con.execute(f"select sum(pages_ok) from read_parquet('{prefix}/out/runs/*/*.parquet')").fetchone()[0] == 4
    # nothing left in staging, and the commit records exist
    # (SeaweedFS may keep the emptied folder itself; no staged file may remain)
    assert [p for p in s3.find(f"{prefix}/out/_staging") if p.endswith(".parquet")] == []
    assert len(s3.ls(f"{prefix}/out/_commits")) == 2


def test_wrong_model_sha256_is_refused_before_any_document(s3, tmp_path, demo_docs, prefix, tiny_llava):
    upload_documents(s3, tmp_path, demo_docs, prefix)
    s3.put(str(write_manifest(tmp_path / "m.csv", demo_docs)), f"{prefix}/in/m.csv")
    s3.put(str(tiny_llava.model_path), f"{prefix}/models/model.gguf")
    state = batch(
        return_state=True, manifest=f"{prefix}/in/m.csv", output=f"{prefix}/out", model=f"{prefix}/models/model.gguf",
        mmproj=str(tiny_llava.mmproj_path), model_sha256="0" * 64,
    )
    assert state.is_failed() and "sha256 mismatch" in state.message and "refusing the model" in state.message
    assert not s3.exists(f"{prefix}/out/completions")


def test_zip_bundle_from_s3(s3, tmp_path, demo_docs, prefix, tiny_qwen):
    upload_documents(s3, tmp_path, demo_docs, prefix)
    s3.put(str(write_manifest(tmp_path / "m.jsonl", demo_docs[:1])), f"{prefix}/in/m.jsonl")
    bundle = tmp_path / "vendor-model.zip"
    with zipfile.ZipFile(bundle, "w") as z:
        z.write(tiny_qwen.mmproj_path, "release/mmproj-model-f16.gguf")
        z.write(tiny_qwen.model_path, "release/model-q4.gguf")
    s3.put(str(bundle), f"{prefix}/models/vendor-model.zip")
    state = batch(
        return_state=True, manifest=f"{prefix}/in/m.jsonl", output=f"{prefix}/out",
        model=f"{prefix}/models/vendor-model.zip", max_tokens=3, n_ctx=4096,
    )
    assert state.is_completed(), state.message
    [row] = read_s3(s3, f"{prefix}/out/completions").to_pylist()
    assert row["status"] == "ok" and row["chat_format"] == "qwen2.5-vl"
    assert row["mmproj_sha256"] == hashlib.sha256(tiny_qwen.mmproj_path.read_bytes()).hexdigest()


def test_wrong_credentials_give_one_clear_error(s3, s3_server, tmp_path, demo_docs, prefix, tiny_llava, monkeypatch):
    s3.put(str(write_manifest(tmp_path / "m.csv", demo_docs)), f"{prefix}/in/m.csv")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-" + "x" * 20)
    state = batch(
        return_state=True, manifest=f"{prefix}/in/m.csv", output=f"{prefix}/out",
        model=str(tiny_llava.model_path), mmproj=str(tiny_llava.mmproj_path),
    )
    assert state.is_failed()
    assert "manifest cannot be read" in state.message and "access denied" in state.message
    assert "not-the-secret" not in state.message and s3_server.credentials.secret_key not in state.message


def test_credentials_from_a_secret_block(s3_server, tmp_path, demo_docs, prefix, tiny_llava, monkeypatch):
    from prefect.blocks.system import Secret

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    creds = s3_server.credentials
    Secret(value={"aws_access_key_id": creds.access_key, "aws_secret_access_key": creds.secret_key,
                  "endpoint_url": s3_server.endpoint_url}).save("medvlm-test-s3", overwrite=True)
    fs = s3fs.S3FileSystem(**s3_server.storage_options())
    fs.put(str(write_manifest(tmp_path / "m.csv", [{"document_id": "x", "image_uri": "gone.png"}])), f"{prefix}/m.csv")
    state = batch(
        return_state=True, manifest=f"{prefix}/m.csv", output=f"{prefix}/out", model=str(tiny_llava.model_path),
        mmproj=str(tiny_llava.mmproj_path), credentials_block="medvlm-test-s3",
    )
    assert state.is_completed(), state.message
    assert state.result()["error_types"] == {"not_found": 1}
    state = batch(
        return_state=True, manifest=f"{prefix}/m.csv", output=f"{prefix}/out", model=str(tiny_llava.model_path),
        mmproj=str(tiny_llava.mmproj_path), credentials_block="no-such-block",
    )
    assert state.is_failed() and "credentials block 'no-such-block' cannot be loaded" in state.message


def test_republishing_a_run_does_not_duplicate_rows(s3, s3_server, prefix):
    storage = Storage({"s3": s3_options(endpoint_url=s3_server.endpoint_url)})
    layout = OutputLayout.of(prefix)
    row = completion_row()
    staged = layout.staged_chunk("r1", "completions", 0)
    for _ in range(2):
        results.write_rows(storage, staged, "completions", [row, row | {"document_id": "e", "manifest_row": 2}])
        publish_run(storage, layout, "r1", "2026-11-28", [], run_row(pages=2))
    assert read_s3(s3, f"{prefix}/completions").num_rows == 2
    assert read_s3(s3, f"{prefix}/runs").num_rows == 1
    assert storage.put_if_absent(layout.commit("r1"), b"again") is False


def test_server_side_encryption_is_requested_for_every_written_object(s3, s3_server, tmp_path, demo_docs, prefix, tiny_llava):
    import boto3
    from botocore.config import Config

    upload_documents(s3, tmp_path, demo_docs, prefix)
    s3.put(str(write_manifest(tmp_path / "m.csv", demo_docs[:1])), f"{prefix}/in/m.csv")
    state = batch(
        return_state=True, manifest=f"{prefix}/in/m.csv", output=f"{prefix}/out", model=str(tiny_llava.model_path),
        mmproj=str(tiny_llava.mmproj_path), max_tokens=2, n_ctx=4096, sse="AES256",
    )
    assert state.is_completed(), state.message
    written = [p for p in s3.find(f"{prefix}/out") if p.endswith((".parquet", ".json"))]
    assert len(written) >= 3
    client = boto3.client(
        "s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1", config=Config(s3={"addressing_style": "path"}),
        aws_access_key_id=s3_server.credentials.access_key, aws_secret_access_key=s3_server.credentials.secret_key,
    )

    def encryption(path: str) -> str | None:  # s3fs's info() does not report it; HEAD does
        bucket, key = path.split("/", 1)
        return client.head_object(Bucket=bucket, Key=key).get("ServerSideEncryption")

    unencrypted = [p.rsplit("/out/", 1)[1] for p in written if encryption(p) != "AES256"]
    assert unencrypted == [], f"{len(unencrypted)} of {len(written)}: {unencrypted}"


@pytest.mark.parametrize("kind", ["aws-credentials", "s3-bucket"])
def test_credentials_from_prefect_aws_blocks(s3_server, tmp_path, prefix, tiny_llava, monkeypatch, kind):
    import logging

    from prefect.client.orchestration import get_client
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    fs = s3fs.S3FileSystem(**s3_server.storage_options())
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MEDVLM_S3_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)  # the block alone brings the keys and the endpoint
    creds = s3_server.credentials
    block = AwsCredentials(aws_access_key_id=creds.access_key, aws_secret_access_key=creds.secret_key,
                           aws_client_parameters=AwsClientParameters(endpoint_url=s3_server.endpoint_url))
    block.save("medvlm-test-aws", overwrite=True)
    S3Bucket(bucket_name=BUCKET, credentials=block).save("medvlm-test-bucket", overwrite=True)
    name = "aws-credentials/medvlm-test-aws" if kind == "aws-credentials" else "s3-bucket/medvlm-test-bucket"
    fs.put(str(write_manifest(tmp_path / "m.csv", [{"document_id": "x", "image_uri": "gone.png"}])), f"{prefix}/m.csv")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    watched = [logging.getLogger("prefect"), logging.getLogger()]  # the flow run's loggers and everything else
    for logger in watched:
        logger.addHandler(handler)
    try:
        state = batch(return_state=True, manifest=f"{prefix}/m.csv", output=f"{prefix}/out",
                      model=str(tiny_llava.model_path), mmproj=str(tiny_llava.mmproj_path), credentials_block=name)
    finally:
        for logger in watched:
            logger.removeHandler(handler)
    assert state.is_completed(), state.message
    assert state.result()["error_types"] == {"not_found": 1}
    # the secret is nowhere: not in the tables, the flow run's parameters or its logs
    runs = read_s3(fs, f"{prefix}/out/runs").to_pylist()
    assert creds.secret_key not in str(runs)
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
    assert creds.secret_key not in str(flow_run.parameters) and name in str(flow_run.parameters)
    logged = "\n".join(r.getMessage() for r in records)
    assert f"run {state.result()['run_id']}" in logged
    assert creds.secret_key not in logged and creds.access_key not in logged

    state = batch(return_state=True, manifest=f"{prefix}/m.csv", output=f"{prefix}/out", model=str(tiny_llava.model_path),
                  mmproj=str(tiny_llava.mmproj_path), credentials_block=f"{kind}/no-such-block")
    assert state.is_failed() and f"credentials block '{kind}/no-such-block' cannot be loaded" in state.message
    if kind == "aws-credentials":
        # a bare name is a Secret block's: the error says which typed name to pass instead
        state = batch(return_state=True, manifest=f"{prefix}/m.csv", output=f"{prefix}/out",
                      model=str(tiny_llava.model_path), mmproj=str(tiny_llava.mmproj_path),
                      credentials_block="medvlm-test-aws")
        assert state.is_failed() and "pass 'aws-credentials/medvlm-test-aws'" in state.message, state.message
        assert creds.secret_key not in state.message
