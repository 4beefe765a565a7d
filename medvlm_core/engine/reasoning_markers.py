"""A reasoning model's thinking block (``think_open`` ... ``think_close``), kept apart from the answer while a
page is decoded.

The block may be opened by the prompt itself (Qwen3-style templates end with the open marker) or by the model
as its first words (``find_open``); it ends where the model writes the close marker (``find_close``) or where the
reasoning budget runs out (``close_thinking`` writes the marker for it). From the block's end the answer's
grammar, if any, applies (``end_thinking`` gives the sequence a fresh chain with it).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from medvlm_core.engine.sampling import Sampling
from medvlm_core.engine.slot import Slot


def find_open(slot: Slot) -> None:
    """While nothing but whitespace and a prefix of think_open was generated, watch for the block to open.

    Args:
        slot: the page, its latest token just appended.
    """
    marker = slot.request.params.think_open.encode("utf-8")
    text = bytes(slot.pieces).lstrip()
    if text.startswith(marker):
        slot.thinking, slot.may_open = True, False
        slot.think_start = len(slot.pieces) - len(text) + len(marker)
        slot.scores.clear()  # the marker is not part of the answer
    elif not marker.startswith(text):
        slot.may_open = False  # the answer began


def find_close(slot: Slot, sampling: Sampling) -> None:
    """End the thinking block where the model wrote think_close.

    Args:
        slot: the page, in its thinking block, its latest token just appended.
        sampling: where the answer's sampler chain comes from.
    """
    marker = slot.request.params.think_close.encode("utf-8")
    at = slot.pieces.find(marker, slot.think_start)
    if at >= 0:
        end_thinking(slot, at, at + len(marker), sampling)


def close_thinking(slot: Slot, tokenize: Callable[..., list[int]], sampling: Sampling) -> None:
    """The reasoning budget is spent: append the closing marker as if the model had written it (its tokens are
    fed to the model next, unsampled).

    Args:
        slot: the page, in its thinking block.
        tokenize: the model's tokenizer (``Llama.tokenize``).
        sampling: where the answer's sampler chain comes from.
    """
    closing = f"\n{slot.request.params.think_close}\n\n"
    tokens = tokenize(closing.encode("utf-8"), add_bos=False, special=True)
    at = len(slot.pieces)
    slot.pieces += closing.encode("utf-8")
    slot.generated += len(tokens)
    slot.pending, slot.forced = tokens[0], deque(tokens[1:])
    slot.budget_hit = True
    end_thinking(slot, at, len(slot.pieces), sampling)


def end_thinking(slot: Slot, think_end: int, answer_start: int, sampling: Sampling) -> None:
    """Leave the thinking block: the answer starts; under a schema its grammar applies from here.

    Args:
        slot: the page.
        think_end: where the thinking text ends in ``slot.pieces`` (the close marker's start).
        answer_start: where the answer begins (after the marker).
        sampling: where the answer's sampler chain comes from.
    """
    slot.thinking = False
    slot.think_end, slot.answer_start = think_end, answer_start
    if slot.request.schema is not None:  # the answer is constrained from here: a fresh chain with the grammar
        sampling.free(slot.sampler)
        slot.sampler = sampling.chain(slot.request.params, slot.request.schema)
