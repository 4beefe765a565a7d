"""Where the isolated engine's child process starts: llama.cpp's libraries load there before numpy's
(``settings.load_llama_cpp`` says why). The ``engine`` package imports numpy (``batched``, ``images``), so the
child's first code lives outside it and imports nothing at module level: the parent imports this module for the
spawn target, and the parent must never load llama.cpp. The child's main loop is reached by name, after llama.cpp.
"""

from __future__ import annotations

import importlib
from typing import Any


def start_child(main: str, *args: Any) -> None:
    """Set OpenMP's wait policy, load llama.cpp, then run the child's main loop.

    Args:
        main: ``"module:function"``, the child's main loop (``medvlm_core.engine.child_loop:child_main``), named
            rather than imported so that the engine package, and numpy with it, loads after llama.cpp.
        args: its arguments.
    """
    from medvlm_core.settings import load_llama_cpp

    load_llama_cpp()
    module, function = main.split(":")
    getattr(importlib.import_module(module), function)(*args)
