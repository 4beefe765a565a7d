"""The process-wide engine: loaded on first use, reused by every chunk (and every flow run) in the process.

A worker process running many chunks loads the model once. Asking for another config closes the previous
engine first, so two models never sit in memory (or VRAM) at once. Which engine answers pages follows the
config: ``isolate`` -> ``IsolatedEngine`` (the model lives in a supervised child; this process never loads
it); else a ``BatchedEngine`` of ``n_parallel`` sequences over a ``VisionEngine`` (one sequence when
``n_parallel`` is 1). In front of either, a ``SharedStream``: the chunks running at once in the process feed
one running batch, so a chunk's end does not drain it. Every page is thus answered by the same code,
whichever way it runs: the batched engine's sampler chain, reasoning handling and confidences.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
from typing import Iterator

from medvlm_core.engine.batched import BatchedEngine
from medvlm_core.engine.isolated import FaultInjector, IsolatedEngine
from medvlm_core.engine.llama import VisionEngine
from medvlm_core.engine.stream import SharedStream
from medvlm_core.engine.types import Engine, takes_requests_ahead
from medvlm_core.errors import RunError
from medvlm_core.run.params import EngineConfig

_LOCK = threading.Lock()
_CURRENT: dict[tuple, list[Engine]] = {}  # key -> the engines to close, outermost first
_GAVE_UP: dict[tuple, str] = {}  # configs whose isolated engine kept crashing: not restarted in this process
_FAULT: list[FaultInjector | None] = [None]
_SHARE_STREAM = [True]  # False: each chunk drains the batch (``stream_per_chunk``)


def inject_fault(fault: FaultInjector | None) -> None:
    """Tests only: isolated engines created from now on hand ``fault`` to their child (None: stop).

    Args:
        fault: a picklable fault injector (see ``medvlm_core.testing.faults``), or None.
    """
    with _LOCK:
        _FAULT[0] = fault


@contextlib.contextmanager
def stream_per_chunk() -> Iterator[None]:
    """Benchmarks only: process-wide engines created inside are not wrapped in a ``SharedStream``, so each
    chunk drains the batch before the next one starts (how medvlm ran before one batch lived across chunks).
    """
    with _LOCK:
        _SHARE_STREAM[0] = False
    try:
        yield
    finally:
        with _LOCK:
            _SHARE_STREAM[0] = True


def _close_all_locked() -> None:
    for engines in _CURRENT.values():
        for engine in engines:
            engine.close()
    _CURRENT.clear()


def _create(config: EngineConfig, chat_format: str, log_phi: bool) -> list[Engine]:
    if config.isolate:
        return [IsolatedEngine(config, chat_format, log_phi=log_phi, fault=_FAULT[0]).start()]
    single = VisionEngine(config, chat_format, log_phi=log_phi).start()
    try:
        batched = BatchedEngine(single, n_seq=config.n_parallel, ctx_per_seq=config.n_ctx, overlap=config.overlap_encode,
                                encode_workers=config.encode_workers,
                                interleave_prefill=config.interleave_prefill)
    except BaseException:
        single.close()
        raise
    return [batched, single]


def _create_shared(config: EngineConfig, chat_format: str, log_phi: bool) -> list[Engine]:
    # The chunk tasks running at once in the process feed one running stream: a chunk's end does not drain
    # the batch.
    layers = _create(config, chat_format, log_phi)
    return [SharedStream(layers[0])] + layers if _SHARE_STREAM[0] else layers


def shared_engine(config: EngineConfig, chat_format: str, log_phi: bool = False) -> Engine:
    """The process-wide engine for this config, started on first use and reused after.

    Args:
        config: the model files and llama.cpp settings.
        chat_format: the model's chat format.
        log_phi: the ``MEDVLM_LOG_PHI`` debug setting.

    Returns:
        A started engine.

    Raises:
        RunError: the model cannot be loaded, or an isolated engine for this config gave up earlier in this
            process (its child kept crashing): a broken model or machine fails the run instead of
            crash-looping chunk after chunk.
    """
    key = (config, chat_format, log_phi)
    with _LOCK:
        if key in _GAVE_UP:
            raise RunError(_GAVE_UP[key])
        engines = _CURRENT.get(key)
        if engines is not None:
            engine = engines[0]
            if engine.loaded:
                return engine
            gave_up = getattr(engine, "gave_up", None)
            if gave_up:
                _GAVE_UP[key] = gave_up
                raise RunError(gave_up)
        _close_all_locked()
        engines = _CURRENT[key] = _create_shared(config, chat_format, log_phi)
        return engines[0]


class OwnedEngine:
    """An engine its caller owns (not shared, not cached): ``close`` frees every layer of it.

    Args:
        layers: the engines, outermost (the one that answers) first.
    """

    def __init__(self, layers: list[Engine]):
        self._layers = layers
        self.load_seconds = sum(getattr(e, "load_seconds", 0.0) for e in layers)
        self.reads_ahead = takes_requests_ahead(layers[0])  # as the layer that answers

    @property
    def loaded(self) -> bool:
        """True until ``close``."""
        return self._layers[0].loaded

    def start(self) -> "OwnedEngine":
        """Already started by ``create_engine``.

        Returns:
            The engine.
        """
        return self

    def generate_many(self, requests):
        """Answer every request (the ``Engine`` protocol's ``generate_many``).

        Args:
            requests: the pages to answer.

        Returns:
            An iterator of ``(request.key, Generation or DocumentError)`` as pages finish.
        """
        return self._layers[0].generate_many(requests)

    def close(self) -> None:
        """Close every layer (idempotent)."""
        for engine in self._layers:
            engine.close()

    def __enter__(self) -> "OwnedEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_engine(config: EngineConfig, chat_format: str, log_phi: bool = False) -> OwnedEngine:
    """A started engine of the same kind ``shared_engine`` makes, for a caller that owns it (the Python API).

    Args:
        config: the model files and llama.cpp settings.
        chat_format: the model's chat format.
        log_phi: the ``MEDVLM_LOG_PHI`` debug setting.

    Returns:
        The engine; the caller closes it.

    Raises:
        RunError: the model cannot be loaded.
    """
    return OwnedEngine(_create(config, chat_format, log_phi))


def current_shared_engine() -> Engine | None:
    """The process-wide engine loaded now (diagnostics and tests), or None.

    Returns:
        The outermost layer of the engine ``shared_engine`` last returned, None when none is loaded.
    """
    with _LOCK:
        for engines in _CURRENT.values():
            return engines[0]
        return None


def close_shared_engines() -> None:
    """Close every shared engine (tests, process shutdown)."""
    with _LOCK:
        _close_all_locked()


# Free models before interpreter teardown: Llama.__del__ during shutdown raises (its ctypes are gone).
atexit.register(close_shared_engines)
