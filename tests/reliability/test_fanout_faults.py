"""A fan-out through real Prefect workers with 20% of its S3 requests faulted: while the shards read documents and
stage their rows, and while the parent reads the shard records and publishes. Every row is accounted for, once."""

from __future__ import annotations

import hashlib
import uuid

import pyarrow.dataset as ds
import pytest
from test_deployments import run_deployment, stack  # noqa: F401  (the Prefect server + deployments fixture)

from conftest import write_manifest
from support.fault_proxy import FaultProxy
from support.reliability_report import record

pytestmark = pytest.mark.e2e
BUCKET = "medvlm-fanout-faults"


def test_fan_out_under_s3_faults_loses_and_duplicates_nothing(stack, s3_server, s3, tmp_path, demo_docs, tiny_llava):  # noqa: F811
    s3_server.create_bucket(BUCKET)
    prefix = f"s3://{BUCKET}/{uuid.uuid4().hex[:10]}"
    records = [dict(r, document_id=f"{r['document_id']}-{i}") for i in range(3) for r in demo_docs]
    for doc in demo_docs:
        s3.put(str(tmp_path / doc["image_uri"]), f"{prefix}/in/{doc['image_uri']}")
    s3.put(str(write_manifest(tmp_path / "m.csv", records)), f"{prefix}/in/m.csv")
    env = s3_server.env()  # the workers' credentials, as on a deployment (the endpoint comes from the options)
    for name, pool in (("gpu-0", "medvlm-gpu"), ("gpu-1", "medvlm-gpu"), ("cpu-0", "medvlm-cpu")):
        stack.spawn(name, "worker", "start", "--pool", pool, "--limit", "2" if pool == "medvlm-cpu" else "1",
                    "--name", name, CUDA_VISIBLE_DEVICES=name[-1], **env)

    with FaultProxy(s3_server.endpoint_url, rate=0.20, seed=11, slow_seconds=0.2) as proxy:
        run_deployment(stack, "medvlm-fanout/medvlm-fanout", manifest=f"{prefix}/in/m.csv", output=f"{prefix}/out",
                       model=str(tiny_llava.model_path), mmproj=str(tiny_llava.mmproj_path), shard_size=3,
                       options={"max_tokens": 4, "n_ctx": 4096, "chunk_size": 2, "s3_endpoint": proxy.endpoint,
                                "model_sha256": hashlib.sha256(tiny_llava.model_path.read_bytes()).hexdigest()})
        injected = dict(proxy.injected)
    assert sum(injected.values()) >= 10, injected  # the faults really happened

    def read(table: str) -> list[dict]:
        return ds.dataset(f"{prefix}/out/{table}".replace("s3://", ""), filesystem=s3, format="parquet",
                          partitioning="hive").to_table().to_pylist()

    rows = read("completions")
    record("S3: a fan-out (3 shards, 2 workers) behind a 20% fault proxy", inputs=len(records), faults=injected,
           rows_lost=len(records) - len({r["manifest_row"] for r in rows}))
    assert sorted(r["manifest_row"] for r in rows) == list(range(1, len(records) + 1))  # each row once
    assert {r["status"] for r in rows} == {"ok"}  # a fault never became an error row
    [run] = read("runs")
    assert (run["pages_ok"], run["reconciled"]) == (len(records), True) and run["storage_retries"] >= 1
