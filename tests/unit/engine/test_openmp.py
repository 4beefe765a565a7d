"""llama.cpp's OpenMP threads sleep when idle (``OMP_WAIT_POLICY=passive``) unless the operator chose otherwise,
in this process and in the isolated engine's child: libgomp itself reports what it read when it was loaded
(``OMP_DISPLAY_ENV``), so these tests check the policy llama.cpp runs with, not only the variable."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from medvlm_core.settings import OPENMP_WAIT_POLICY_ENV as WAIT_POLICY_ENV

# libgomp's spin count per policy: 0 when passive, 300000 when unset, 30000000000 when active.
SPIN = re.compile(r"GOMP_SPINCOUNT = '(\d+)'")


def libgomp_spin_counts(code: str, **env: str) -> list[int]:
    """Run ``code`` in a fresh interpreter; the spin counts every libgomp it loaded (its children's too) reported."""
    environment = {k: v for k, v in os.environ.items() if k != WAIT_POLICY_ENV}
    environment.update(env, OMP_DISPLAY_ENV="VERBOSE")
    done = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [int(n) for n in SPIN.findall(done.stderr)]


def test_llama_cpp_loaded_through_medvlm_waits_passively():
    assert libgomp_spin_counts("import llama_cpp") == [300_000]  # what llama.cpp gets on its own
    assert libgomp_spin_counts("import medvlm_core.engine, llama_cpp") == [0]
    # memory planning's import (asking whether the build offloads to a GPU loads llama.cpp)
    assert libgomp_spin_counts("from medvlm_core.model.memory_plan import detect_budget_mb; detect_budget_mb(True)") == [0]


def test_an_operators_wait_policy_wins():
    assert libgomp_spin_counts("import medvlm_core.engine, llama_cpp", OMP_WAIT_POLICY="active") == [30_000_000_000]


def test_the_isolated_child_waits_passively(tiny_llava):
    code = (
        "from PIL import Image\n"
        "from medvlm_core.run.params import EngineConfig, GenerationParams\n"
        "from medvlm_core.engine import IsolatedEngine, Request\n"
        f"engine = IsolatedEngine(EngineConfig({str(tiny_llava.model_path)!r}, {str(tiny_llava.mmproj_path)!r}, n_ctx=2048,"
        " n_parallel=2), 'llava-1-5').start()\n"
        "[(key, result)] = engine.generate_many([Request(0, Image.new('RGB', (64, 64), 'white'), 'Describe.',"
        " GenerationParams(max_tokens=2))])\n"
        "assert result.completion_tokens >= 1, result\n"
        "engine.close()\n"
        "import sys; assert 'llama_cpp' not in sys.modules  # so the report below is the child's\n"
    )
    counts = libgomp_spin_counts(code)
    assert counts == [0]


def test_the_isolated_child_loads_llama_cpp_before_numpy(tiny_llava, monkeypatch):
    # On a CUDA build, processes that loaded numpy first crashed inside llama_model_load_from_file (seen on the lent H200):
    # the probe aborts the child (an engine_crash error) when numpy came first there.
    from PIL import Image

    from medvlm_core.engine import IsolatedEngine, Request
    from medvlm_core.run.params import EngineConfig, GenerationParams
    from medvlm_core.testing.faults import RequireLlamaBeforeNumpy

    monkeypatch.setenv("GGML_NO_BACKTRACE", "1")
    config = EngineConfig(str(tiny_llava.model_path), str(tiny_llava.mmproj_path), n_ctx=2048, n_parallel=2)
    with IsolatedEngine(config, "llava-1-5", fault=RequireLlamaBeforeNumpy()) as engine:
        [(_, result)] = engine.generate_many([Request(0, Image.new("RGB", (64, 64), "white"), "Describe.",
                                                      GenerationParams(max_tokens=2))])
    assert not isinstance(result, Exception), result
    assert result.completion_tokens >= 1
