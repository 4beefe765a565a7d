"""Errors and the stable error types written into result rows.

Two kinds of failure exist and they are kept apart on purpose:

* ``RunError``: the run as a whole cannot start or cannot finish (missing model, unreadable manifest,
  missing required column). It carries one clear, PHI-free message for the user.
* ``DocumentError``: one document or page failed (missing image, corrupt file). It becomes an error row
  with a stable ``error_type`` and the run goes on.
"""

from __future__ import annotations


class RunError(Exception):
    """The run cannot start or finish; the message is shown to the user as is."""


class DocumentError(Exception):
    """One document (or page) failed; recorded as an error row, the run goes on.

    ``error_type`` is one of the stable values below, so that analysts can group and count failures.
    The message names the file and the reason, never document content.
    """

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type
        self.message = message


# Stable error_type values (the contract of the ``error_type`` column).
NOT_FOUND = "not_found"
READ_FAILED = "read_failed"
UNREADABLE_IMAGE = "unreadable_image"
UNSUPPORTED_FORMAT = "unsupported_format"
TOO_LARGE = "too_large"
SHA256_MISMATCH = "sha256_mismatch"
PAGE_OUT_OF_RANGE = "page_out_of_range"
INFERENCE_ERROR = "inference_error"
CONTEXT_OVERFLOW = "context_overflow"
TASK_FAILED = "task_failed"
INVALID_ROW = "invalid_row"
INVALID_OUTPUT = "invalid_output"
# The inference process died (native abort or segfault) on this page, alone, after a restart
# (medvlm_core.engine.isolated); the message names only the signal or exit code.
ENGINE_CRASH = "engine_crash"
# The inference process answered nothing within the page timeout, on this page alone, after a restart; it was
# ended (the other pages in flight are answered by a new one).
TIMEOUT = "timeout"

ERROR_TYPES = (
    NOT_FOUND,
    READ_FAILED,
    UNREADABLE_IMAGE,
    UNSUPPORTED_FORMAT,
    TOO_LARGE,
    SHA256_MISMATCH,
    PAGE_OUT_OF_RANGE,
    INFERENCE_ERROR,
    CONTEXT_OVERFLOW,
    TASK_FAILED,
    INVALID_ROW,
    INVALID_OUTPUT,
    ENGINE_CRASH,
    TIMEOUT,
)


def short_message(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's text (its type name when it has none), at most ``limit`` characters.

    Args:
        exc: the exception.
        limit: the longest text returned.

    Returns:
        One line, safe to put in a one-line error message when the exception carries no document data.
    """
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def error_detail(exc: BaseException, log_phi: bool = False) -> str:
    """What an error message may say about a library exception.

    Args:
        exc: the exception raised by llama.cpp (or another library handling document data).
        log_phi: the ``MEDVLM_LOG_PHI`` debug setting.

    Returns:
        `` (Type)``; `` (Type: first line)`` only with ``log_phi``, because llama.cpp's text can echo the
        prompt, the document or the output.
    """
    if log_phi:
        return f" ({type(exc).__name__}: {short_message(exc)})"
    return f" ({type(exc).__name__})"
