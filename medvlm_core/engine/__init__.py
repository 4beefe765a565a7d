"""The llama.cpp engines behind one interface (``Engine``): requests in, completions out.

* ``types``: ``Request``, ``Generation`` and the ``Engine`` protocol.
* ``llama``: ``VisionEngine``, one page at a time (loads the model and the vision projector).
* ``batched``: ``BatchedEngine``, several pages decoded together over a loaded ``VisionEngine``.
* ``isolated``: ``IsolatedEngine``, the batched engine in a supervised child process (native crashes cost
  one page, not the run).
* ``stream``: ``SharedStream``, overlapping ``generate_many`` calls (a worker's chunks) fed to one running batch.
* ``registry``: ``shared_engine``, the process-wide engine picked from the config (behind a ``SharedStream``).
"""

from medvlm_core.engine.batched import BatchedEngine
from medvlm_core.engine.isolated import IsolatedEngine
from medvlm_core.engine.llama import VisionEngine
from medvlm_core.engine.registry import close_shared_engines, shared_engine
from medvlm_core.engine.stream import SharedStream
from medvlm_core.engine.types import Engine, Generation, RawPixels, Request, Result

__all__ = [
    "BatchedEngine", "Engine", "Generation", "IsolatedEngine", "RawPixels", "Request", "Result", "SharedStream",
    "VisionEngine", "close_shared_engines", "shared_engine",
]
