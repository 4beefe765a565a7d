"""The llama.cpp engines behind one interface (``Engine``): requests in, completions out.

* ``types``: ``Request``, ``Generation`` and the ``Engine`` protocol.
* ``llama``: ``VisionEngine``, one page at a time (loads the model and the vision projector).
* ``batched``: ``BatchedEngine``, several pages decoded together over a loaded ``VisionEngine``.
* ``isolated``: ``IsolatedEngine``, the batched engine in a supervised child process (native crashes cost
  one page, not the run).
* ``stream``: ``SharedStream``, overlapping ``generate_many`` calls (a worker's chunks) fed to one running batch.
* ``registry``: ``shared_engine``, the process-wide engine picked from the config (behind a ``SharedStream``).
"""

from medvlm_core.settings import prefer_passive_openmp

prefer_passive_openmp()  # before any module of this package imports llama_cpp (libgomp reads it when loaded)

from medvlm_core.engine.batched import BatchedEngine  # noqa: E402
from medvlm_core.engine.isolated import IsolatedEngine  # noqa: E402
from medvlm_core.engine.llama import VisionEngine  # noqa: E402
from medvlm_core.engine.registry import close_shared_engines, shared_engine  # noqa: E402
from medvlm_core.engine.stream import SharedStream  # noqa: E402
from medvlm_core.engine.types import Engine, Generation, RawPixels, Request, Result  # noqa: E402

__all__ = [
    "BatchedEngine", "Engine", "Generation", "IsolatedEngine", "RawPixels", "Request", "Result", "SharedStream",
    "VisionEngine", "close_shared_engines", "shared_engine",
]
