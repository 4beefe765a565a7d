"""Small threading helpers shared by the stages that run on background threads."""

from __future__ import annotations

import queue
import threading
from typing import Any


def put_unless_stopped(out: "queue.Queue[Any]", item: Any, stop: threading.Event, poll_s: float = 0.1) -> bool:
    """Put ``item`` on a bounded queue, waiting for room, unless ``stop`` is set meanwhile.

    A producer thread must never block forever on a full queue whose consumer went away: it checks ``stop``
    every ``poll_s`` seconds.

    Args:
        out: the queue.
        item: what to put.
        stop: set by the consumer when it stops taking items.
        poll_s: how often ``stop`` is checked while the queue is full.

    Returns:
        True if the item was put, False if ``stop`` was set first.
    """
    while not stop.is_set():
        try:
            out.put(item, timeout=poll_s)
            return True
        except queue.Full:
            continue
    return False
