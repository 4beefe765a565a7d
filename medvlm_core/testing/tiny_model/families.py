"""``make_tiny_model``: which files each family gets, written atomically, from one seed."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from medvlm_core.testing.tiny_model.templates import CHATML_TEMPLATE, QWEN2VL_TEMPLATE, thinking_template
from medvlm_core.testing.tiny_model.text_decoder import TEXT_SPECS, write_decoder, write_text_model
from medvlm_core.testing.tiny_model.vision import (
    MMPROJ_WRITERS,
    write_llavanext_mmproj,
    write_mmproj,
    write_qwen25vl_mmproj,
)

FAMILIES = (
    "llava", "llavanext", "qwen2vl", "qwen25vl", "qwen3vl", "gemma3", "gemma4", "internvl", "minicpmv", "idefics3", "pixtral",
)
"""Model families `make_tiny_model` can generate."""


@dataclass(frozen=True)
class TinyModel:
    """Paths of a generated model pair."""

    family: str
    model_path: Path
    mmproj_path: Path
    reasoning: bool = False


REASONING_FAMILIES = tuple(f for f in FAMILIES if f not in ("llavanext", "gemma3", "gemma4", "idefics3", "pixtral"))
"""Families with a ChatML template, so a reasoning (``<think>``) variant (not LLaVA-1.6: no template at all)."""


def _write_gguf(path: Path, arch: str, fill: Callable[[gguf.GGUFWriter], None]) -> None:
    """Write one GGUF file atomically: readers never see a partial file."""
    # The temporary file sits in the destination directory so that
    # os.replace is a rename on the same filesystem.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp_name, arch=arch)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        # mkstemp creates the file readable by its owner only.
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def make_tiny_model(
    out_dir: str | os.PathLike,
    family: str = "llava",
    seed: int = 0,
    *,
    chat_template: str | None = None,
    reasoning: bool = False,
) -> TinyModel:
    """Generate a tiny random-weight vision-language model pair.

    Writes ``<out_dir>/tiny-<family>.gguf`` (the text model) and
    ``<out_dir>/tiny-<family>-mmproj.gguf`` (the vision projector), creating
    ``out_dir`` if needed and replacing existing files atomically. The same
    arguments always give byte-identical files. The reasoning variant is
    written as ``tiny-<family>-reasoning.gguf`` (and ``-mmproj.gguf``), so it
    can sit next to the plain one; its mmproj equals the plain family's.

    Load the pair with llama-cpp-python, e.g. for ``"llava"``::

        handler = Llava15ChatHandler(clip_model_path=str(model.mmproj_path))
        llm = Llama(model_path=str(model.model_path), chat_handler=handler, n_ctx=2048)

    Args:
        out_dir: Directory for the two files.
        family: One of `FAMILIES` (``"llava"``, ``"llavanext"``, ``"qwen2vl"``, ``"qwen25vl"``,
            ``"qwen3vl"``, ``"gemma3"``, ``"gemma4"``, ``"internvl"``, ``"minicpmv"``,
            ``"idefics3"``, ``"pixtral"``).
        seed: Non-negative seed of the random weights.
        chat_template: A Jinja chat template that replaces the family's
            default ``tokenizer.chat_template`` (e.g. a custom layout, or one
            that opens ``<think>`` in the generation prompt); ``""`` writes
            none (as classic LLaVA conversions).
        reasoning: Write the reasoning variant: ``<think>``/``</think>`` in the
            vocabulary and a Qwen3-thinking-style template whose generation
            prompt ends with ``<|im_start|>assistant\\n<think>\\n`` (see
            `thinking_template`); ``chat_template``, when given, still wins.
            Only for `REASONING_FAMILIES` (ChatML templates).

    Returns:
        The family and the paths of the two files.

    Raises:
        ValueError: If ``family`` is not one of `FAMILIES`, or ``reasoning``
            is asked of a family without a ChatML template (Gemma 3 and 4,
            SmolVLM, Pixtral).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    if reasoning and family not in REASONING_FAMILIES:
        raise ValueError(f"no reasoning variant of {family!r}: it needs a ChatML template ({', '.join(REASONING_FAMILIES)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"tiny-{family}-reasoning" if reasoning else f"tiny-{family}"
    model = TinyModel(
        family=family,
        model_path=out / f"{stem}.gguf",
        mmproj_path=out / f"{stem}-mmproj.gguf",
        reasoning=reasoning,
    )
    # One independent random stream per file, so that changing one file's
    # layout does not change the other's weights.
    text_rng, vision_rng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    mmproj_name = f"tiny-{family}-mmproj"
    if family in ("llava", "llavanext", "qwen2vl", "qwen25vl"):
        # Qwen2.5-VL's text model is Qwen2-VL's (architecture qwen2vl), LLaVA-1.6's is LLaVA's.
        text_family = "qwen2vl" if family.startswith("qwen") else "llava"
        template = chat_template
        if template is None and reasoning:
            template = thinking_template(QWEN2VL_TEMPLATE if text_family == "qwen2vl" else CHATML_TEMPLATE)
        if template is None and family == "llavanext":
            template = ""  # no tokenizer.chat_template
        text_arch = "llama" if text_family == "llava" else "qwen2vl"
        _write_gguf(model.model_path, text_arch,
                    lambda w: write_text_model(w, text_family, text_rng, stem, template, reasoning))
        if family == "qwen25vl":
            _write_gguf(model.mmproj_path, "clip", lambda w: write_qwen25vl_mmproj(w, mmproj_name, vision_rng))
        elif family == "llavanext":
            _write_gguf(model.mmproj_path, "clip", lambda w: write_llavanext_mmproj(w, mmproj_name, vision_rng))
        else:
            _write_gguf(model.mmproj_path, "clip", lambda w: write_mmproj(w, family, vision_rng))
        return model
    spec = TEXT_SPECS[family]
    template = chat_template
    if template is None:
        template = thinking_template(spec.template) if reasoning else spec.template
    _write_gguf(model.model_path, spec.arch, lambda w: write_decoder(w, spec, text_rng, stem, template, reasoning))
    _write_gguf(model.mmproj_path, "clip", lambda w: MMPROJ_WRITERS[family](w, mmproj_name, vision_rng))
    return model
