"""Where the isolated engine's child process starts: llama.cpp's libraries load there before numpy's.

On a CUDA build, processes that had loaded numpy first crashed inside ``llama_model_load_from_file``, five runs
out of five, and ran every time with llama_cpp loaded first (../shared/gpu/README.md, on an H200). The ``engine``
package imports numpy (``batched``, ``images``), so the child's first code lives outside it and imports nothing
at module level: the parent imports this module for the spawn target, and the parent must never load llama.cpp.
The child's main loop is reached by name, after llama.cpp.
"""

from __future__ import annotations

import importlib
from typing import Any


def start_child(main: str, *args: Any) -> None:
    """Set OpenMP's wait policy, load llama.cpp, then run the child's main loop.

    Args:
        main: ``"module:function"``, the child's main loop (``medvlm_core.engine.isolated:_child_main``), named
            rather than imported so that the engine package, and numpy with it, loads after llama.cpp.
        args: its arguments.
    """
    from medvlm_core.settings import prefer_passive_openmp

    prefer_passive_openmp()  # libgomp reads it when llama.cpp loads it
    import llama_cpp  # noqa: F401

    module, function = main.split(":")
    getattr(importlib.import_module(module), function)(*args)
