"""The isolated engine's child process: load the model, then answer streams of requests read from the pipe (each
with its pages: one, a document's, or none).

``medvlm_core.isolated_child.start_child`` loads llama.cpp first and then reaches ``child_main`` by name
(``"medvlm_core.engine.child_loop:child_main"``), so this module, and numpy with the engine package, load after
llama.cpp. The child answers every page through a ``BatchedEngine``; ``PageStream`` turns the pipe's messages
into its requests.
"""

from __future__ import annotations

import signal
from typing import Any, Iterator

from medvlm_core.engine.child_messages import (
    Answer,
    EndOfStream,
    Fatal,
    FaultInjector,
    Idle,
    LoadFailed,
    PageFailed,
    PageRequest,
    Ready,
    Stop,
)
from medvlm_core.engine.shared_pixels import read_pages
from medvlm_core.engine.types import NOT_YET, Request
from medvlm_core.errors import DocumentError, RunError, error_detail, short_message
from medvlm_core.run.params import EngineConfig

# How ``start_child`` names ``child_main`` (the parent passes it to the spawned process).
CHILD_MAIN = f"{__name__}:child_main"


class PageStream:
    """The child's side of one stream: Requests (with all their pages) read from the pipe until EndOfStream (or
    Stop / EOF).

    Args:
        connection: the child's receiving end of the request pipe.
        first: the stream's first message (already read).
        fault: tests only: called with ``(intake, attempt)`` before each page is taken.
    """

    def __init__(self, connection: Any, first: Any, fault: FaultInjector | None):
        self.connection = connection
        self.first = first
        self.fault = fault
        self.stopped = False  # the parent asked the child to stop (or went away)

    def __iter__(self) -> Iterator[Request | None]:
        message = self.first
        while True:
            if message is None:
                # Nothing in the pipe yet: NOT_YET, so that the batched engine goes on decoding the pages it has
                # (blocking here would stall an inline-encoder engine's decode loop while the parent waits for
                # an answer) and asks again.
                yield NOT_YET
            elif isinstance(message, EndOfStream):
                return
            elif not isinstance(message, PageRequest):  # Stop
                self.stopped = True
                return
            else:
                if self.fault is not None:
                    self.fault(message.intake, message.attempt)  # tests: the pages before this one are in flight
                pages = read_pages(message)  # raw RGB, straight to libmtmd
                image = pages[0] if len(pages) == 1 else (pages or None)  # as the parent's request held them
                yield Request(message.id, image, message.prompt, message.params, message.schema, message.system)
            try:
                message = self.connection.recv() if self.connection.poll() else None
            except (EOFError, OSError):  # the parent is gone
                self.stopped = True
                return


def child_main(config: EngineConfig, chat_format: str, log_phi: bool, fault: FaultInjector | None,
               requests: Any, results: Any) -> None:
    """The child process: load the model, report ready, then answer streams of requests until stopped.

    Args:
        config: the model files and llama.cpp settings.
        chat_format: one of ``medvlm_core.model.files.CHAT_FORMATS``.
        log_phi: the ``MEDVLM_LOG_PHI`` debug setting (error details may then include document content).
        fault: tests only: a fault injector called before each page is taken.
        requests: the child's receiving end of the request pipe.
        results: the child's sending end of the result pipe.
    """
    # Ctrl-C reaches the whole process group; the parent decides when the child stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from medvlm_core.engine.batched import BatchedEngine
    from medvlm_core.engine.llama import VisionEngine

    engine = batched = None
    try:
        try:
            # The child answers every page through the batched context; the engine's own context only has
            # to exist (llama-cpp-python makes one per model), so keep it small instead of another n_ctx of KV.
            small = config.replace(n_ctx=max(256, config.n_batch))
            engine = VisionEngine(small, chat_format, log_phi=log_phi).start()
            batched = BatchedEngine(engine, n_seq=config.n_parallel, ctx_per_seq=config.n_ctx,
                                    overlap=config.overlap_encode, encode_workers=config.encode_workers,
                                    interleave_prefill=config.interleave_prefill)
        except RunError as exc:
            results.send(LoadFailed(str(exc)))
            return
        except Exception as exc:  # e.g. ValueError for a bad mmproj; no traceback: the parent shows one line
            # Loading sees no document, so llama-cpp-python's text (file paths, reasons) carries no PHI.
            results.send(LoadFailed(f"llama.cpp could not load {config.model_path} with {config.mmproj_path} "
                                    f"({type(exc).__name__}: {short_message(exc)})"))
            return
        results.send(Ready(engine.load_seconds))
        while True:
            try:
                message = requests.recv()
            except (EOFError, OSError):
                return
            if isinstance(message, Stop):
                return
            stream = PageStream(requests, message, fault)
            try:
                for rid, result in batched.generate_many(stream):
                    if isinstance(result, DocumentError):
                        results.send(PageFailed(rid, result.error_type, result.message))
                    else:
                        results.send(Answer(rid, result))
            except (BrokenPipeError, EOFError):
                return
            except RunError as exc:
                results.send(Fatal(str(exc)))
                return
            except Exception as exc:
                results.send(Fatal(f"the batched engine failed{error_detail(exc, log_phi)}"))
                return
            if stream.stopped:
                return
            results.send(Idle())
    except (BrokenPipeError, EOFError, OSError):  # the parent went away mid-send
        return
    finally:
        if batched is not None:
            batched.close()
        if engine is not None:
            engine.close()
