"""OpenMP's wait policy for llama.cpp's CPU threads, chosen before llama.cpp is loaded.

llama-cpp-python's CPU backend runs each graph on an OpenMP thread team (libgomp). By default libgomp's idle
threads spin for a while before they sleep, and medvlm runs graphs from more than one thread at once (the
vision encoder ahead of the decode loop, several encoder contexts): the spinning teams take the cores from
each other and from the page decoding. With the passive policy idle threads sleep at once; one graph is one
parallel region (ggml synchronises inside it with its own barriers), so the wake-up is paid once per graph.
BENCHMARKS.md (the ``openmp`` path) has the measurement. libgomp reads the variable when it is loaded, so it
must be set before the first ``import llama_cpp`` of the process: importing ``medvlm_core.engine`` sets it.
"""

from __future__ import annotations

import os

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
DEFAULT_WAIT_POLICY = "passive"


def prefer_passive_wait() -> str:
    """Set ``OMP_WAIT_POLICY`` to ``passive`` unless the environment already sets it (an operator's choice
    wins), for llama.cpp loaded after this in the process and for its child processes.

    Returns:
        The policy now in the environment.
    """
    return os.environ.setdefault(WAIT_POLICY_ENV, DEFAULT_WAIT_POLICY)
