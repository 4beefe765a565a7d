"""The nightly flow processes only what is new under its input prefix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.dataset as ds
import yaml
from PIL import Image

from conftest import write_manifest
from medvlm.flows.nightly import medvlm_nightly


def test_nightly_processes_only_new_manifests(tmp_path, tiny_llava, demo_docs):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    shutil.copytree(tmp_path / "documents", inbox / "documents")
    write_manifest(inbox / "2026-11-27.csv", demo_docs[:2])
    params = dict(input_prefix=str(inbox), output=str(out), model=str(tiny_llava.model_path),
                  mmproj=str(tiny_llava.mmproj_path), options={"max_tokens": 3, "n_ctx": 4096}, fan_out=False)

    first = medvlm_nightly(**params)
    assert first["new_inputs"] == 1 and [r["pages_ok"] for r in first["runs"]] == [2]

    assert medvlm_nightly(**params) == {"new_inputs": 0, "runs": []}  # nothing new

    write_manifest(inbox / "2026-11-28.csv", demo_docs[2:])
    third = medvlm_nightly(**params)
    assert third["new_inputs"] == 1 and [r["pages_ok"] for r in third["runs"]] == [1]
    rows = ds.dataset(out / "completions", partitioning="hive").to_table().to_pylist()
    assert sorted(r["document_id"] for r in rows) == ["discharge-0001", "lab-0003", "rx-0002"]


def test_nightly_without_manifests_processes_new_documents(tmp_path, tiny_llava):
    inbox, out = tmp_path / "scans", tmp_path / "out"
    (inbox / "ward-a").mkdir(parents=True)
    Image.new("RGB", (200, 260), "white").save(inbox / "ward-a" / "fax-1.png")
    params = dict(input_prefix=str(inbox), output=str(out), model=str(tiny_llava.model_path),
                  mmproj=str(tiny_llava.mmproj_path), options={"max_tokens": 2, "n_ctx": 4096}, fan_out=False)
    first = medvlm_nightly(**params)
    assert first["new_inputs"] == 1 and first["runs"][0]["pages_ok"] == 1
    Image.new("RGB", (200, 260), "gray").save(inbox / "ward-a" / "fax-2.png")
    (inbox / "notes.txt").write_text("not a document")
    second = medvlm_nightly(**params)
    assert second["new_inputs"] == 1 and second["runs"][0]["pages_ok"] == 1
    rows = ds.dataset(out / "completions", partitioning="hive").to_table().to_pylist()
    assert sorted(r["document_id"] for r in rows) == ["ward-a/fax-1.png", "ward-a/fax-2.png"]


def test_nightly_deployment_schedule_in_prefect_yaml():
    config = yaml.safe_load((Path(__file__).parents[2] / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    assert set(deployments) == {"medvlm-batch", "medvlm-shard", "medvlm-fanout", "medvlm-nightly", "medvlm-report",
                                "medvlm-eval"}
    [trigger] = deployments["medvlm-report"]["triggers"]
    assert trigger["expect"] == ["medvlm.run.published"] and trigger["parameters"]["output"] == "{{ event.payload.output }}"
    [schedule] = deployments["medvlm-nightly"]["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule["timezone"]
    assert deployments["medvlm-shard"]["work_pool"]["name"] == "medvlm-gpu"
    assert deployments["medvlm-fanout"]["work_pool"]["name"] == "medvlm-cpu"
    assert deployments["medvlm-eval"]["work_pool"]["name"] == "medvlm-cpu"
    assert deployments["medvlm-eval"]["entrypoint"] == "flows/eval.py:medvlm_eval"
