"""Memory planning: the KV arithmetic against what llama.cpp reports, and the decision under a small budget
(a real run, the budget simulated through MEDVLM_MEMORY_BUDGET_MB)."""

from __future__ import annotations

import re
import subprocess
import sys

import pyarrow.dataset as ds
import pytest

from conftest import batch, write_manifest
from medvlm_core.errors import RunError
from medvlm_core.model.memory_plan import MIB, kv_cache_bytes, plan_memory
from medvlm_core.run.params import EngineConfig

REPORT = re.compile(r"llama_kv_cache: size =\s+([0-9.]+) MiB \(\s*(\d+) cells,\s+(\d+) layers")


def reported_kv_mib(model_path: str, n_ctx: int, n_seq: int, cache: str = "f16") -> float:
    code = ("import llama_cpp, sys\n"
            f"m = llama_cpp.Llama({model_path!r}, n_ctx={n_ctx}, verbose=True, flash_attn=True)\n"
            f"p = llama_cpp.llama_context_default_params(); p.n_ctx = {n_ctx * n_seq}; p.n_seq_max = {n_seq}\n"
            "p.kv_unified = False; p.flash_attn_type = m.context_params.flash_attn_type\n"
            "c = llama_cpp.llama_init_from_model(m._model.model, p); llama_cpp.llama_free(c); m.close()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    sizes = [float(m.group(1)) for m in REPORT.finditer(out.stderr)]
    assert sizes, out.stderr[-2000:]
    return sizes[-1]  # the second context: n_seq sequences


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_kv_cache_arithmetic_matches_llama_cpp(request, family):
    model = request.getfixturevalue(f"tiny_{family}")
    for n_ctx, n_seq in ((8192, 1), (4096, 3)):  # large enough that the report's 2 decimals do not matter
        assert kv_cache_bytes(str(model.model_path), n_ctx * n_seq) / MIB == pytest.approx(
            reported_kv_mib(str(model.model_path), n_ctx, n_seq), rel=0.01)


def test_the_plan_lowers_n_parallel_or_refuses_with_the_numbers(tiny_llava):
    config = EngineConfig(str(tiny_llava.model_path), str(tiny_llava.mmproj_path), n_ctx=8192, n_parallel=8)
    roomy = plan_memory(config, budget_mb=100_000)
    assert roomy.n_parallel == 8 and roomy.budget_source == "setting"
    per_page = roomy.kv_mb_per_page
    assert per_page == pytest.approx(kv_cache_bytes(config.model_path, 8192) / MIB)
    tight = roomy.needed_mb - 5.5 * per_page  # room for 2 pages fewer than 8 (and a half)
    plan = plan_memory(config, budget_mb=tight)
    assert plan.n_parallel == 2 and plan.needed_mb <= tight < plan.needed_mb + per_page
    with pytest.raises(RunError) as caught:
        plan_memory(config, budget_mb=roomy.weights_mb)
    assert "does not fit" in str(caught.value) and "MiB" in str(caught.value) and "n_ctx 8192" in str(caught.value)
    # each encoder context beyond the first holds another copy of the projector
    three = plan_memory(config.replace(encode_workers=3), budget_mb=100_000)
    assert three.weights_mb - roomy.weights_mb == pytest.approx(2 * tiny_llava.mmproj_path.stat().st_size / MIB)
    detected = plan_memory(config)  # this CPU machine: the host's available memory
    assert detected.budget_source == "host" and detected.budget_mb > 0


def test_a_run_under_a_small_budget_decodes_fewer_pages_together(tmp_path, tiny_llava, demo_docs, monkeypatch):
    config = EngineConfig(str(tiny_llava.model_path), str(tiny_llava.mmproj_path), n_ctx=4096, n_parallel=8)
    full = plan_memory(config, budget_mb=100_000)
    monkeypatch.setenv("MEDVLM_MEMORY_BUDGET_MB", str(full.needed_mb - 5.5 * full.kv_mb_per_page))
    manifest = write_manifest(tmp_path / "m.csv", demo_docs)
    summary = batch(manifest=str(manifest), output=str(tmp_path / "out"), model=str(tiny_llava.model_path),
                    mmproj=str(tiny_llava.mmproj_path), max_tokens=3, n_ctx=4096, n_parallel=8)
    assert (summary["pages_ok"], summary["reconciled"]) == (3, True)
    [run] = ds.dataset(tmp_path / "out" / "runs", partitioning="hive").to_table().to_pylist()
    assert run["n_parallel"] == 2 and run["memory_needed_mb"] <= run["memory_budget_mb"]
    monkeypatch.setenv("MEDVLM_MEMORY_BUDGET_MB", "1")
    state = batch(manifest=str(manifest), output=str(tmp_path / "out2"), model=str(tiny_llava.model_path),
                  mmproj=str(tiny_llava.mmproj_path), max_tokens=3, n_ctx=4096, return_state=True)
    assert state.is_failed() and "does not fit" in state.message
