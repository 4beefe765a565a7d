"""Fault injectors for the crash tests: handed to ``IsolatedEngine(fault=...)`` (or, for a whole flow run, to
``medvlm_core.engine.registry.inject_fault``), they run in the inference child before it takes each page."""

from __future__ import annotations

import ctypes
import os
import sys
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class NativeAbort:
    """Abort the child the way llama.cpp does (``ggml_abort``) when it is about to take certain pages.

    ``on``: intake numbers (0-based, per ``generate_many`` call of the engine: per stream behind a
    ``SharedStream``) that abort on every run, the solo retry
    included, so the page ends as an ``engine_crash`` error. ``once``: intake numbers that abort only on the
    page's first run, so its solo retry succeeds. Set ``GGML_NO_BACKTRACE=1`` in tests, or ggml attaches gdb.
    """

    on: frozenset[int] = field(default_factory=frozenset)
    once: frozenset[int] = field(default_factory=frozenset)

    def __call__(self, intake: int, attempt: int) -> None:
        """Abort if this page is one of ours.

        Args:
            intake: the page's intake number.
            attempt: 0 in the batch, 1 in the solo retry.
        """
        if intake in self.on or (attempt == 0 and intake in self.once):
            native_abort()


@dataclass(frozen=True)
class Stall:
    """Hang the child (a sleep in its page intake, where a stuck llama.cpp call would hold it) before it takes
    certain pages: ``on`` every time, ``once`` only on the first run (so the solo retry succeeds)."""

    on: frozenset[int] = field(default_factory=frozenset)
    once: frozenset[int] = field(default_factory=frozenset)
    seconds: float = 3600.0

    def __call__(self, intake: int, attempt: int) -> None:
        """Sleep if this page is one of ours.

        Args:
            intake: the page's intake number.
            attempt: 0 in the batch, 1 in the solo retry.
        """
        if intake in self.on or (attempt == 0 and intake in self.once):
            time.sleep(self.seconds)


def native_abort() -> None:
    """Abort the way llama.cpp does (``ggml_abort``: message, backtrace, SIGABRT); ``os.abort()`` if not found."""
    function = None
    try:
        import llama_cpp.llama_cpp as llama_cpp_lib

        function = llama_cpp_lib._lib.ggml_abort  # dlsym on libllama also finds its dependency libggml-base
    except (ImportError, AttributeError):
        try:
            import llama_cpp

            lib = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so")
            function = ctypes.CDLL(lib).ggml_abort
        except (ImportError, OSError, AttributeError):
            function = None
    if function is not None:
        function.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
        function.restype = None
        function(b"medvlm_core/testing/faults.py", 1, b"medvlm test abort")
    os.abort()


@dataclass(frozen=True)
class RequireLlamaBeforeNumpy:
    """Abort the child (as llama.cpp does) before its first page if numpy was loaded there before llama.cpp's
    libraries: the order a CUDA build crashed on (``medvlm_core.isolated_child``)."""

    def __call__(self, intake: int, attempt: int) -> None:
        """Abort if numpy came first.

        Args:
            intake: the page's intake number.
            attempt: 0 in the batch, 1 in the solo retry.
        """
        loaded = list(sys.modules)
        if "numpy" in loaded and loaded.index("numpy") < loaded.index("llama_cpp.llama_cpp"):
            native_abort()
