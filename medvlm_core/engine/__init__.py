"""The llama.cpp engines behind one interface (``Engine``): requests in, completions out.

* ``types``: ``Request`` (one page, a document's pages in one prompt, or a text-only prompt), ``Generation`` and
  the ``Engine`` protocol. A request too long for a sequence is a ``context_overflow`` whose counts
  ``overflow_counts`` reads.
* ``llama``: ``VisionEngine``, one page at a time (loads the model and the vision projector).
* ``batched``: ``BatchedEngine``, several pages decoded together over a loaded ``VisionEngine`` (its scheduler);
  its parts: ``chat_render`` (the prompt text), ``encoding`` (vision encoding, on encoder threads),
  ``prefill`` (a page into its sequence), ``sampling`` (sampler chains, token scores), ``slot`` (a page's
  decoding state and its ``Generation``), ``reasoning_markers`` (the thinking block apart from the answer).
* ``isolated``: ``IsolatedEngine``, the batched engine in a supervised child process (native crashes cost
  one page, not the run); its parts: ``child_messages`` (the pipe protocol), ``child_process`` (starting and
  hearing a child), ``child_loop`` (the child's side), ``shared_pixels`` (page pixels in shared memory).
* ``stream``: ``SharedStream``, overlapping ``generate_many`` calls (a worker's chunks) fed to one running batch.
* ``registry``: ``shared_engine``, the process-wide engine picked from the config (behind a ``SharedStream``).
"""

from medvlm_core.settings import prefer_passive_openmp

prefer_passive_openmp()  # before any module of this package imports llama_cpp (libgomp reads it when loaded)

from medvlm_core.engine.batched import BatchedEngine  # noqa: E402
from medvlm_core.engine.encoding import overflow_counts  # noqa: E402
from medvlm_core.engine.isolated import IsolatedEngine  # noqa: E402
from medvlm_core.engine.llama import VisionEngine  # noqa: E402
from medvlm_core.engine.registry import close_shared_engines, shared_engine  # noqa: E402
from medvlm_core.engine.stream import SharedStream  # noqa: E402
from medvlm_core.engine.types import Engine, Generation, RawPixels, Request, Result  # noqa: E402

__all__ = [
    "BatchedEngine", "Engine", "Generation", "IsolatedEngine", "RawPixels", "Request", "Result", "SharedStream",
    "VisionEngine", "close_shared_engines", "overflow_counts", "shared_engine",
]
