"""What every engine takes and gives: ``Request`` in, ``Generation`` (or a ``DocumentError``) out, and the
``Engine`` interface the pipeline drives.

An engine answers an iterable of requests lazily and yields ``(key, result)`` pairs as pages finish (not
necessarily in request order). Three implementations exist: ``VisionEngine`` (one page at a time, in this
process), ``BatchedEngine`` (several pages decoded together) and ``IsolatedEngine`` (the batched engine in a
supervised child process). ``medvlm_core.engine.registry`` picks one from the ``EngineConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Protocol, runtime_checkable

from PIL import Image

from medvlm_core.errors import DocumentError
from medvlm_core.run.params import GenerationParams


@dataclass(frozen=True)
class RawPixels:
    """A page as raw RGB bytes (``width * height * 3``), as the isolated engine's child receives it: the batched
    engine hands them to libmtmd without another conversion."""

    width: int
    height: int
    data: bytearray


Page = Image.Image | RawPixels


@dataclass
class Request:
    """One prompt for an engine with its page images: one page (page scope), all the pages of a document in page
    order (a document asked in one prompt), or none (a text-only prompt, such as the consolidation of a
    document's page answers). A page is a PIL image, or ``RawPixels`` for the batched engine. ``key`` comes back
    with its result.

    ``image`` takes one page, a sequence of pages or None; ``images`` gives them as a tuple either way.
    """

    key: Any
    image: Page | tuple[Page, ...] | list[Page] | None
    prompt: str
    params: GenerationParams
    schema: dict | None = None
    system: str | None = None  # the system prompt (None: the chat format's default)

    @property
    def images(self) -> tuple[Page, ...]:
        """The request's page images, in order (empty for a text-only prompt)."""
        if self.image is None:
            return ()
        if isinstance(self.image, (tuple, list)):
            return tuple(self.image)
        return (self.image,)


@dataclass(frozen=True)
class Generation:
    """One completion and what it cost."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    # Vision encoder time for the page where the engine measures it apart (the batched engine); else 0.0.
    encode_ms: float = 0.0
    # Reasoning models: the thinking block (without its markers), its tokens, and whether the reasoning
    # budget closed it. ``text`` is then the answer alone.
    reasoning: str | None = None
    reasoning_tokens: int = 0
    reasoning_budget_hit: bool = False
    # Confidence: log-probabilities of the answer's tokens under the model (before any sampler), and for each
    # answer token the top-N alternatives as (token text, logprob) when asked.
    token_logprobs: tuple[float, ...] = ()
    token_offsets: tuple[int, ...] = ()  # byte offset in ``text`` where each answer token starts
    top_logprobs: tuple[tuple[tuple[str, float], ...], ...] = ()

    @property
    def mean_logprob(self) -> float | None:
        """Mean log-probability of the answer tokens (None without tokens)."""
        return sum(self.token_logprobs) / len(self.token_logprobs) if self.token_logprobs else None

    @property
    def min_logprob(self) -> float | None:
        """The least likely answer token's log-probability (None without tokens)."""
        return min(self.token_logprobs) if self.token_logprobs else None


Result = Generation | DocumentError


def takes_requests_ahead(engine: Any) -> bool:
    """Whether ``engine`` reads its request iterable concurrently with its model work (``Engine.reads_ahead``).

    Args:
        engine: any engine.

    Returns:
        Its ``reads_ahead``; False for an engine that does not say (it reads requests between its own steps).
    """
    return bool(getattr(engine, "reads_ahead", False))


# What a request iterable gives when no page is ready yet but more may come (see ``Engine.generate_many``).
NOT_YET = None
# How long an engine thread with nothing else to do waits before asking such an iterable again.
NOT_YET_WAIT_S = 0.005


@runtime_checkable
class Engine(Protocol):
    """A loaded model that answers pages: ``start()`` once, ``generate_many`` for every chunk, ``close()``.

    Usable as a context manager (``with engine:`` starts and closes it). ``generate_many`` never raises for
    one page's failure (that page's result is a ``DocumentError``); ``RunError`` means the engine itself is
    unusable, and an exception raised by the request iterable propagates after the pages in flight finish.

    An engine may also say ``reads_ahead = True``: it takes requests from the iterable concurrently with its
    model work (on threads of its own, or while a child process computes), so whatever producing a request
    costs (reading and decoding a page) already overlaps the model; callers need no prefetch thread of their
    own (``takes_requests_ahead``).
    """

    load_seconds: float

    @property
    def loaded(self) -> bool:
        """True between ``start()`` and ``close()``."""
        ...

    def start(self) -> "Engine":
        """Load the model (idempotent).

        Returns:
            The engine itself, ready.
        """
        ...

    def generate_many(self, requests: Iterable[Request]) -> Iterator[tuple[Any, Result]]:
        """Answer every request, taken lazily from ``requests``.

        Args:
            requests: the pages to answer. It may give ``None`` (``NOT_YET``): no page is ready yet but more may
                come, so the engine goes on with the pages it has and asks again (``SharedStream`` does, while
                the pages of a finished chunk are in flight and the next chunk may still join).

        Returns:
            An iterator of ``(request.key, Generation or DocumentError)`` as pages finish.
        """
        ...

    def close(self) -> None:
        """Free the model and everything the engine holds (idempotent)."""
        ...

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
