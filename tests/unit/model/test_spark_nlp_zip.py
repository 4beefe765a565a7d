"""A Spark NLP model zip as John Snow Labs ships one: its saved llama.cpp parameters become the run's defaults
wherever the user set none, and land in params_json (real llama.cpp, a real flow)."""

from __future__ import annotations

import json
import zipfile

import pyarrow.dataset as ds
import pytest

from conftest import batch, write_manifest
from medvlm_core.errors import RunError
from medvlm_core.inputs.prompts import get_prompt
from medvlm_core.model.spark_nlp import read_saved_params, saved_options

SYSTEM = "You are a clinical NLP model from the vendor."


def spark_zip(path, model, param_map: dict):
    """The folder layout of a Spark ML model saved by DefaultParamsWriter, zipped, GGUFs inside."""
    metadata = {"class": "com.johnsnowlabs.nlp.annotators.seq2seq.AutoGGUFVisionModel", "timestamp": 1764000000000,
                "sparkVersion": "3.5.1", "uid": "AutoGGUFVisionModel_4b1c", "paramMap": param_map,
                "defaultParamMap": {"nCtx": 4096, "nPredict": 100, "nGpuLayers": 99, "temperature": 0.8}}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("jsl_meds_vlm_reasoning_8b_q4_v1/metadata/part-00000", json.dumps(metadata) + "\n")
        z.writestr("jsl_meds_vlm_reasoning_8b_q4_v1/metadata/_SUCCESS", "")
        z.write(model.model_path, "jsl_meds_vlm_reasoning_8b_q4_v1/model.gguf")
        z.write(model.mmproj_path, "jsl_meds_vlm_reasoning_8b_q4_v1/mmproj.gguf")
    return path


def read(path):
    return ds.dataset(path, partitioning="hive").to_table().to_pylist()


def test_saved_parameters_are_the_defaults_the_user_can_override(tmp_path, tiny_llava, demo_docs):
    bundle = spark_zip(tmp_path / "vendor.zip", tiny_llava, {
        "nCtx": 3072, "nPredict": 7, "temperature": 0.0, "repeatPenalty": 1.05, "systemPrompt": SYSTEM,
        "nGpuLayers": 99, "removeThinkingTag": "think", "useChatTemplate": True,
    })
    manifest = write_manifest(tmp_path / "m.csv", demo_docs)
    first = batch(manifest=str(manifest), output=str(tmp_path / "a"), model=str(bundle), n_parallel=2)
    assert (first["pages_ok"], first["reconciled"]) == (3, True)
    rows = read(tmp_path / "a" / "completions")
    assert {r["completion_tokens"] for r in rows} == {7}  # nPredict
    params = json.loads(rows[0]["params_json"])["generation"]
    assert (params["max_tokens"], params["repeat_penalty"]) == (7, 1.05)
    assert {r["prompt_sha256"] for r in rows} == {get_prompt("clinical_analysis", system=SYSTEM).sha256}

    # what the user sets wins; the rest still comes from the zip
    second = batch(manifest=str(manifest), output=str(tmp_path / "b"), model=str(bundle), max_tokens=3,
                   system_prompt="Mine.", n_parallel=2)
    rows = read(tmp_path / "b" / "completions")
    assert second["pages_ok"] == 3 and {r["completion_tokens"] for r in rows} == {3}
    assert json.loads(rows[0]["params_json"])["generation"]["repeat_penalty"] == 1.05
    assert {r["prompt_sha256"] for r in rows} == {get_prompt("clinical_analysis", system="Mine.").sha256}


def test_the_mapping_of_spark_names(tmp_path, tiny_llava):
    bundle = spark_zip(tmp_path / "v.zip", tiny_llava, {
        "nBatch": 256, "nUbatch": 128, "topK": 20, "topP": 0.8, "minP": 0.1, "mirostat": "V2", "gpuSplitMode": "ROW",
        "tokenIdBias": {"42": -3.0}, "disableTokenIds": [7], "stopStrings": ["</answer>"], "nProbs": 2,
        "chatTemplate": "{{ messages }}", "grammar": "root ::= \"x\"", "temperature": "not a number",
    })
    options, template = saved_options(read_saved_params(str(bundle)))
    assert options == {"n_batch": 256, "n_ubatch": 128, "top_k": 20, "top_p": 0.8, "min_p": 0.1, "mirostat": 2,
                       "split_mode": "row", "logit_bias": {"42": -3.0}, "banned_tokens": [7], "stop": ["</answer>"],
                       "logprobs": 2}
    assert template == "{{ messages }}"  # used as the chat template when the user gives none
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as z:
        z.write(tiny_llava.model_path, "m.gguf")
    assert read_saved_params(str(plain)) == {}
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(broken, "w") as z:
        z.writestr("metadata/part-00000", "not json")
    with pytest.raises(RunError, match="not Spark ML metadata"):
        read_saved_params(str(broken))


def test_unusable_saved_parameters_stop_the_run_with_one_message(tmp_path, tiny_llava, demo_docs):
    bundle = spark_zip(tmp_path / "bad.zip", tiny_llava, {"nCtx": 64})
    state = batch(manifest=str(write_manifest(tmp_path / "m.csv", demo_docs)), output=str(tmp_path / "o"),
                  model=str(bundle), return_state=True)
    assert state.is_failed() and "parameters saved in the model zip" in state.message and "n_ctx must be >= 256" in state.message
