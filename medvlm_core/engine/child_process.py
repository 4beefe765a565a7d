"""The isolated engine's parent-side handle on one child process: starting it, writing to it, hearing from it.

``spawn_child`` starts the child with multiprocessing's "spawn" (a fresh interpreter: no forked llama.cpp or
thread state) at ``medvlm_core.isolated_child.start_child``, which loads llama.cpp before numpy and then runs
``child_loop.child_main``, and waits for the model to load. ``Child`` holds the process, the parent's pipe ends
and a sender thread that does all the writing, so a multi-MB message blocking on a full pipe never stops the
parent from reading results. ``Child.receive`` raises ``ChildDied`` once the process has ended (after every
message it sent was read) and ``ChildHung`` when it sent nothing in time.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection as mp_connection
import queue
import sys
import threading
import time
from typing import Any, Iterator

from medvlm_core.engine.child_loop import CHILD_MAIN
from medvlm_core.engine.child_messages import FaultInjector, Ready, Stop, describe_exit
from medvlm_core.errors import RunError
from medvlm_core.isolated_child import start_child
from medvlm_core.run.params import EngineConfig

STOP_WAIT_S = 5.0  # a clean child exits in well under a second; past this it is killed


class ChildDied(Exception):
    """The child process ended (its description in ``args[0]``)."""


class ChildHung(Exception):
    """The child sent nothing for ``args[0]`` seconds while pages were in flight."""


@contextlib.contextmanager
def _main_not_rerun() -> Iterator[None]:
    """Start a spawned child without running the user's ``__main__`` script in it again.

    ``spawn`` re-imports the parent's main module in the child; a plain script that loads a model at its top
    level (no ``if __name__ == "__main__":`` guard, as in the README's examples) would then load it again in the
    child and fail there. The child runs only ``child_loop.child_main``, so the main module is hidden from
    multiprocessing's preparation data while the child starts (it reads them synchronously in ``start()``).
    """
    main = sys.modules.get("__main__")
    saved = {name: getattr(main, name) for name in ("__file__", "__spec__") if main is not None and hasattr(main, name)}
    try:
        for name in saved:
            setattr(main, name, None)
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)


class Child:
    """One running child process, its pipe ends and the sender thread that writes its requests.

    Args:
        process: the started ``multiprocessing`` process.
        requests: the parent's sending end of the request pipe.
        results: the parent's receiving end of the result pipe.
    """

    def __init__(self, process: Any, requests: Any, results: Any):
        self.process = process
        self.requests = requests  # the parent's sending end
        self.results = results  # the parent's receiving end
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=_send_loop, args=(self._outbox, requests),
                                        name="medvlm-isolated-sender", daemon=True)
        self._sender.start()

    def send(self, message: Any) -> None:
        """Queue a message for the child (never blocks: the sender thread does the writing)."""
        self._outbox.put(message)

    def receive(self, timeout: float | None = None) -> Any:
        """The child's next message; ``ChildDied`` once it has exited and every message it sent has been read;
        ``ChildHung`` when it sent nothing for ``timeout`` seconds."""
        sentinel = self.process.sentinel
        while True:
            ready = mp_connection.wait([self.results, sentinel], timeout)
            if not ready:
                raise ChildHung(timeout)
            # Read what the child wrote before it died first: those pages did finish.
            if self.results in ready or self.results.poll():
                try:
                    return self.results.recv()
                except (EOFError, OSError):
                    break
                except Exception:  # a message cut short by the death: the death is what counts
                    break
            if sentinel in ready:
                break
        self.process.join(STOP_WAIT_S)
        if self.process.is_alive():  # its result pipe closed but it lives on: unusable, end it
            self.process.kill()
            self.process.join()
        raise ChildDied(describe_exit(self.process.exitcode))

    def stop(self, graceful: bool) -> None:
        """End the child: ask it to stop (``graceful``) and wait a few seconds, else kill it."""
        if graceful and self.process.is_alive():
            self.send(Stop())
        self._outbox.put(None)  # ends the sender thread once it has written what is queued
        if graceful:
            self._sender.join(STOP_WAIT_S)
            self.process.join(STOP_WAIT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._sender.join(STOP_WAIT_S)  # a write to a dead child fails at once, ending the thread
        self.requests.close()
        self.results.close()


def _send_loop(outbox: queue.SimpleQueue, connection: Any) -> None:
    while True:
        message = outbox.get()
        if message is None:
            return
        try:
            connection.send(message)
        except (OSError, ValueError):  # the child is gone; the receiving side notices its death
            return


def spawn_child(config: EngineConfig, chat_format: str, log_phi: bool, fault: FaultInjector | None,
                start_timeout_s: float) -> tuple[Child, float]:
    """Start a child process and wait until it has loaded the model.

    Args:
        config: the model files and llama.cpp settings (the child loads them).
        chat_format: one of ``medvlm_core.model.files.CHAT_FORMATS``.
        log_phi: the ``MEDVLM_LOG_PHI`` debug setting, handed to the child.
        fault: tests only: a picklable fault injector the child calls before each page.
        start_timeout_s: how long the child may take to start and load the model.

    Returns:
        ``(child, seconds)``: the running child and how long it took to start and load.

    Raises:
        RunError: the child's own message if the model cannot be loaded, or if the child dies or times out
            while loading.
    """
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked llama.cpp or thread state
    request_recv, request_send = ctx.Pipe(duplex=False)
    result_recv, result_send = ctx.Pipe(duplex=False)
    # The child starts outside this package, so that it loads llama.cpp before numpy (isolated_child).
    process = ctx.Process(target=start_child,
                          args=(CHILD_MAIN, config, chat_format, log_phi, fault, request_recv, result_send),
                          name="medvlm-inference", daemon=True)
    started = time.perf_counter()
    with _main_not_rerun():
        process.start()
    # Only the child holds these ends now, so its death reads as EOF here.
    request_recv.close()
    result_send.close()
    child = Child(process, request_send, result_recv)
    model = config.model_path
    if not mp_connection.wait([result_recv, process.sentinel], start_timeout_s):
        child.stop(graceful=False)
        raise RunError(f"the inference process did not load {model} within {start_timeout_s:g} s")
    try:
        message = child.receive()
    except ChildDied as died:
        child.stop(graceful=False)
        raise RunError(f"the inference process died ({died.args[0]}) while loading {model}") from None
    if not isinstance(message, Ready):
        child.stop(graceful=True)
        raise RunError(getattr(message, "message", "the inference process sent no ready message"))
    return child, time.perf_counter() - started
