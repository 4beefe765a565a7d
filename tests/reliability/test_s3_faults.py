"""S3 faults on the wire: a fault-injecting proxy (503 SlowDown, 500, resets, slow and truncated responses)
between the real pipeline and a real S3 server. Runs complete with every page accounted for, retries are
bounded and counted in the runs row."""

from __future__ import annotations

import hashlib
import uuid

import pyarrow.dataset as ds
import pytest

from conftest import batch, write_manifest
from medvlm_core import errors
from medvlm_core.errors import DocumentError
from medvlm_core.storage import RetryPolicy, Storage, s3_options
from support.fault_proxy import FaultProxy
from support.reliability_report import record

BUCKET = "medvlm-faults"


@pytest.fixture(scope="module", autouse=True)
def bucket(s3_server):
    """This module's bucket on the session's S3 server (tests/conftest.py)."""
    s3_server.create_bucket(BUCKET)


def test_retries_are_bounded_and_counted(s3_server, s3):
    prefix = f"{BUCKET}/{uuid.uuid4().hex[:10]}"
    s3.pipe(f"{prefix}/a.bin", b"payload")
    with FaultProxy(s3_server.endpoint_url, rate=1.0, kinds=("503",), seed=1) as proxy:
        storage = Storage({"s3": s3_options(proxy.endpoint)}, RetryPolicy(max_attempts=4, base_delay_s=0.01))
        with pytest.raises(DocumentError) as failed:
            storage.read_bytes(f"s3://{prefix}/a.bin")
        assert failed.value.error_type == errors.READ_FAILED
        assert proxy.requests == 4 and storage.retries == 3  # 4 attempts, no hidden client-library retries
        proxy.rate = 0.0
        proxy.inject_next("500", 2)
        assert storage.read_bytes(f"s3://{prefix}/a.bin") == b"payload"
        assert storage.retries == 5
    record("S3: retries bounded (persistent 503, then 500s)", inputs=2, faults={"503": 4, "500": 2})


def test_run_survives_faults_with_every_page_accounted_for(s3_server, s3, tmp_path, demo_docs, tiny_llava,
                                                            monkeypatch):
    prefix = f"s3://{BUCKET}/{uuid.uuid4().hex[:10]}"
    records = [dict(r, document_id=f"{r['document_id']}-{i}") for i in range(4) for r in demo_docs]
    records.append({"document_id": "missing", "image_uri": "documents/not-there.png"})
    for doc in demo_docs:
        s3.put(str(tmp_path / doc["image_uri"]), f"{prefix}/in/{doc['image_uri']}")
    s3.put(str(write_manifest(tmp_path / "m.csv", records)), f"{prefix}/in/m.csv")
    s3.put(str(tiny_llava.model_path), f"{prefix}/models/model.gguf")
    s3.put(str(tiny_llava.mmproj_path), f"{prefix}/models/mmproj.gguf")
    monkeypatch.setenv("MEDVLM_CACHE_DIR", str(tmp_path / "cache"))

    with FaultProxy(s3_server.endpoint_url, rate=0.20, seed=7, slow_seconds=0.3) as proxy:
        summary = batch(
            manifest=f"{prefix}/in/m.csv", output=f"{prefix}/out", model=f"{prefix}/models/model.gguf",
            mmproj=f"{prefix}/models/mmproj.gguf", max_tokens=4, n_ctx=2048, chunk_size=4, s3_endpoint=proxy.endpoint,
            model_sha256=hashlib.sha256(tiny_llava.model_path.read_bytes()).hexdigest(),
        )
        injected = dict(proxy.injected)
    assert sum(injected.values()) >= 10 and len(injected) >= 4, injected  # the faults really happened
    assert (summary["pages_ok"], summary["pages_error"], summary["reconciled"]) == (12, 1, True)
    assert summary["error_types"] == {"not_found": 1}  # a fault never turns into a lost or failed page

    read = lambda table: ds.dataset(f"{prefix}/out/{table}".replace("s3://", ""), filesystem=s3,  # noqa: E731
                                    format="parquet", partitioning="hive").to_table().to_pylist()
    rows = read("completions")
    record("S3: a run behind a 20% fault proxy", inputs=len(records), faults=injected,
           rows_lost=len(records) - len({r["manifest_row"] for r in rows}))
    assert sorted(r["manifest_row"] for r in rows) == list(range(1, 14))  # one row per manifest row
    [run] = read("runs")
    # every retry answered an injected fault (a slow response needs none; aiohttp resends some on its own)
    retryable = sum(n for kind, n in injected.items() if kind != "slow")
    assert 1 <= run["storage_retries"] <= retryable, (run["storage_retries"], injected)
    assert summary["storage_retries"] == run["storage_retries"]
