"""The messages between the isolated engine's parent and its child (pickled over the two pipes).

Parent -> child: ``PageRequest`` (one request: a page, a document's pages or a text-only prompt), ``EndOfStream``
(no more requests in the current stream), ``Stop``.
Child -> parent: ``Ready`` or ``LoadFailed`` (once, after loading), then ``Answer`` / ``PageFailed`` per page,
``Idle`` when a stream is done, ``Fatal`` when the batched engine failed. A page's key stays in the parent: the
child sees only integer ids. Messages carry no document text besides the page's own prompt and answer.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Callable

from medvlm_core.engine.types import Generation
from medvlm_core.run.params import GenerationParams

# A fault injector (tests only): called in the child with (intake, attempt) before each page is taken.
FaultInjector = Callable[[int, int], None]


@dataclass(frozen=True)
class PageRequest:
    """Parent -> child: one request with its page images (one, several in page order, or none). Pixels as raw RGB
    bytes, the pages one after another (``sizes``: each page's width and height), in a shared-memory block named
    ``shared`` (the parent owns it until the request is answered), or in ``pixels`` when no block could be made;
    neither for a text-only request. The request's key stays in the parent."""

    id: int
    intake: int
    attempt: int  # 0 in a stream, 1 in the solo retry after a crash
    sizes: tuple[tuple[int, int], ...]
    pixels: bytes | None
    prompt: str
    params: GenerationParams
    schema: dict | None
    system: str | None = None
    shared: str | None = None

    @property
    def images(self) -> int:
        """How many page images the request holds."""
        return len(self.sizes)


@dataclass(frozen=True)
class EndOfStream:
    """Parent -> child: no more pages in the current stream (the child finishes what it has)."""


@dataclass(frozen=True)
class Stop:
    """Parent -> child: exit."""


@dataclass(frozen=True)
class Ready:
    """Child -> parent, once: the model is loaded."""

    load_seconds: float


@dataclass(frozen=True)
class LoadFailed:
    """Child -> parent, once: the model could not be loaded (a one-line, PHI-free message)."""

    message: str


@dataclass(frozen=True)
class Answer:
    """Child -> parent: a page's completion."""

    id: int
    generation: Generation


@dataclass(frozen=True)
class PageFailed:
    """Child -> parent: a page's DocumentError."""

    id: int
    error_type: str
    message: str


@dataclass(frozen=True)
class Idle:
    """Child -> parent: the current stream is done."""


@dataclass(frozen=True)
class Fatal:
    """Child -> parent: the batched engine raised something other than a DocumentError; the child exits."""

    message: str


def describe_exit(exitcode: int | None) -> str:
    """A process exit status in words: a signal name (``SIGSEGV``) or ``exit code N``.

    Args:
        exitcode: ``Process.exitcode`` (negative: the signal that ended it; None: still running).

    Returns:
        The words for error messages (no document content).
    """
    if exitcode is None:
        return "no exit status"
    if exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"
