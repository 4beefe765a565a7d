"""The process-wide engine: loaded on first use, reused by every chunk (and every flow run) in the process.

A worker process running many chunks loads the model once. Asking for another config closes the previous
engine first, so two models never sit in memory (or VRAM) at once. Which engine answers pages follows the
config: ``isolate`` -> ``IsolatedEngine`` (the model lives in a supervised child; this process never loads
it); else a ``BatchedEngine`` of ``n_parallel`` sequences over a ``VisionEngine`` (one sequence when
``n_parallel`` is 1). Every page is thus answered by the same code, whichever way it runs: the batched
engine's sampler chain, reasoning handling and confidences.
"""

from __future__ import annotations

import atexit
import threading

from medvlm_core.config import EngineConfig
from medvlm_core.engine.batched import BatchedEngine
from medvlm_core.engine.isolated import FaultInjector, IsolatedEngine
from medvlm_core.engine.llama import VisionEngine
from medvlm_core.engine.types import Engine
from medvlm_core.errors import RunError

_LOCK = threading.Lock()
_CURRENT: dict[tuple, list[Engine]] = {}  # key -> the engines to close, outermost first
_GAVE_UP: dict[tuple, str] = {}  # configs whose isolated engine kept crashing: not restarted in this process
_FAULT: list[FaultInjector | None] = [None]


def inject_fault(fault: FaultInjector | None) -> None:
    """Tests only: isolated engines created from now on hand ``fault`` to their child (None: stop).

    Args:
        fault: a picklable fault injector (see ``medvlm_core.testing.faults``), or None.
    """
    with _LOCK:
        _FAULT[0] = fault


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
        batched = BatchedEngine(single, n_seq=config.n_parallel, ctx_per_seq=config.n_ctx, overlap=config.overlap_encode)
    except BaseException:
        single.close()
        raise
    return [batched, single]


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
        engines = _CURRENT[key] = _create(config, chat_format, log_phi)
        return engines[0]


def close_shared_engines() -> None:
    """Close every shared engine (tests, process shutdown)."""
    with _LOCK:
        _close_all_locked()


# Free models before interpreter teardown: Llama.__del__ during shutdown raises (its ctypes are gone).
atexit.register(close_shared_engines)
