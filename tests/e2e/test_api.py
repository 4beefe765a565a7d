"""The Python API (medvlm_core.api): a model loaded once annotates images, documents and manifests in memory,
with the same rows and result keys as a flow run, and writes nothing."""

from __future__ import annotations

import os

import pyarrow.dataset as ds
import pytest
from PIL import Image

from conftest import batch, write_manifest
from medvlm_core.api import MedicalVisionLLM
from medvlm_core.errors import RunError

SAME = ("document_id", "page", "result_key", "completion", "status", "params_json", "model_sha256", "image_sha256")


def test_api_gives_the_rows_a_flow_run_writes(tmp_path, tiny_qwen, demo_docs, monkeypatch):
    manifest = write_manifest(tmp_path / "m.csv", demo_docs + [{"document_id": "", "image_uri": "x.png"}])
    batch(manifest=str(manifest), output=str(tmp_path / "out"), model=str(tiny_qwen.model_path),
          mmproj=str(tiny_qwen.mmproj_path), max_tokens=6, n_ctx=4096)
    flow_rows = ds.dataset(tmp_path / "out" / "completions", partitioning="hive").to_table().to_pylist()
    want = sorted(tuple(r[c] for c in SAME) for r in flow_rows)

    before = set(os.listdir(tmp_path))
    with MedicalVisionLLM.load(str(tiny_qwen.model_path), str(tiny_qwen.mmproj_path), max_tokens=6, n_ctx=4096) as vlm:
        from_manifest = vlm.transform(str(manifest))
        assert sorted(tuple(r[c] for c in SAME) for r in from_manifest.completions.to_pylist()) == want
        assert [q["row_number"] for q in from_manifest.quarantine.to_pylist()] == [4]

        # the same pages given as paths (ids given), as bytes and as an in-memory table (relative to the cwd)
        paths = [str(tmp_path / d["image_uri"]) for d in demo_docs]
        ids = [d["document_id"] for d in demo_docs]
        by_path = vlm.annotate(paths, document_ids=ids)
        assert sorted(tuple(r[c] for c in SAME) for r in by_path.completions.to_pylist()) == want
        as_bytes = vlm.annotate([open(p, "rb").read() for p in paths], document_ids=ids)
        assert sorted(r["result_key"] for r in as_bytes.completions.to_pylist()) == sorted(w[2] for w in want)
        monkeypatch.chdir(tmp_path)
        in_memory = vlm.transform(demo_docs)
        assert sorted(r["result_key"] for r in in_memory.completions.to_pylist()) == sorted(w[2] for w in want)

        # a PIL image works too; an unknown object is one clear error
        [row] = vlm.annotate([Image.new("RGB", (64, 64), "white")]).completions.to_pylist()
        assert row["document_id"] == "document-1" and row["status"] == "ok"
        with pytest.raises(RunError, match="document 1 is a int"):
            vlm.annotate([42])
    assert set(os.listdir(tmp_path)) == before  # nothing written
    with pytest.raises(RunError, match="closed"):
        vlm.transform(demo_docs)


def test_api_structured_mode_returns_the_structured_tables(tmp_path, tiny_qwen, demo_docs):
    with MedicalVisionLLM.load(str(tiny_qwen.model_path), str(tiny_qwen.mmproj_path), prompt_id="clinical_extraction",
                               max_tokens=48, n_ctx=4096) as vlm:
        result = vlm.annotate([str(tmp_path / d["image_uri"]) for d in demo_docs])
    assert result.completions.num_rows == 3
    assert {"diagnoses", "medications"} <= set(result.tables)
    for table in result.tables.values():  # each structured row joins back to its page
        assert set(table.column("result_key").to_pylist()) <= set(result.completions.column("result_key").to_pylist())


def test_api_refuses_bad_options_with_one_message(tiny_qwen):
    with pytest.raises(RunError, match="max_tokens"):
        MedicalVisionLLM.load(str(tiny_qwen.model_path), str(tiny_qwen.mmproj_path), max_tokens=0)


def test_pages_are_decoded_where_the_engine_reads_its_requests(tmp_path, tiny_llava, demo_docs, monkeypatch):
    """An engine that reads its requests ahead (the isolated one, the batched one with its encoder thread) decodes
    the pages there; an engine that reads them between its own steps gets them from a prefetch thread. The
    answers are the same whichever does."""
    from medvlm_core.run import pages as pipeline

    prefetched = []
    real = pipeline.prefetch
    monkeypatch.setattr(pipeline, "prefetch", lambda source, depth=2: prefetched.append(depth) or real(source, depth))
    paths = [str(tmp_path / d["image_uri"]) for d in demo_docs]
    answers = []
    for options in ({}, {"isolate": False}, {"isolate": False, "overlap_encode": False}):
        with MedicalVisionLLM.load(str(tiny_llava.model_path), str(tiny_llava.mmproj_path), max_tokens=6, n_ctx=4096,
                                   **options) as vlm:
            rows = vlm.annotate(paths).completions.to_pylist()
        assert [r["status"] for r in rows] == ["ok"] * len(paths)
        answers.append(sorted((r["document_id"], r["completion"]) for r in rows))
    assert prefetched == [2]  # the inline engine only
    assert answers[0] == answers[1] == answers[2]
