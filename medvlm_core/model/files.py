"""Model files: GGUF metadata, the chat format a model family needs, and cached file hashes.

The chat format decides how image and text are laid out for the model. It is picked from the mmproj's
``clip.projector_type`` (and whether the text GGUF carries its own chat template), and can always be
forced with an explicit ``chat_format``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvlm_core.errors import RunError

# GGUF value types (gguf spec): scalar type id -> struct format.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

# Chat formats medvlm knows -> the llama-cpp-python handler class (llama_cpp.llama_chat_format) that lays
# out image and text for each; medvlm_core.engine loads the handler by this name.
CHAT_HANDLERS = {
    "llava-1-5": "Llava15ChatHandler",
    "llava-1-6": "Llava16ChatHandler",
    "qwen2.5-vl": "Qwen25VLChatHandler",
    "minicpm-v-2.6": "MiniCPMv26ChatHandler",
    "moondream2": "MoondreamChatHandler",
    "nanollava": "NanoLlavaChatHandler",
    "llama-3-vision-alpha": "Llama3VisionAlphaChatHandler",
    "obsidian": "ObsidianChatHandler",
    # generic: renders the text GGUF's own tokenizer.chat_template (Gemma 3, Qwen3-VL, ...)
    "mtmd": "MTMDChatHandler",
}
CHAT_FORMATS = tuple(CHAT_HANDLERS)

# Projector types whose layout a llama-cpp-python handler hard-codes (the GGUF's template is not used).
_PROJECTOR_FORMATS = {
    "qwen2vl_merger": "qwen2.5-vl",
    "qwen2.5vl_merger": "qwen2.5-vl",
    "qwen25vl_merger": "qwen2.5-vl",
    "resampler": "minicpm-v-2.6",  # MiniCPM-V 2.6 / MiniCPM-o 2.6
}
# Families llama-cpp-python has no handler for: only the model's own template ("mtmd") lays them out.
_TEMPLATE_ONLY_PROJECTORS = {
    "gemma3": "Gemma 3",
    "qwen3vl_merger": "Qwen3-VL",
    "internvl": "InternVL",
    "idefics3": "SmolVLM / Idefics3",
    "gemma4v": "Gemma 4",
    "pixtral": "Pixtral / Mistral Small",
    "llama4": "Llama 4",
    "lfm2": "LFM2-VL",
}
# A template that opens (or strips) a <think> block is a reasoning model's (Qwen3 thinking, QwQ, R1-style
# fine-tunes): only rendering the template itself keeps its generation prompt.
_THINK_MARKER = "<think>"


def read_gguf_metadata(path: str | os.PathLike, skip_arrays: bool = True) -> dict[str, Any]:
    """The key/value metadata of a GGUF file (tensor data is not read).

    Large arrays (a 150k-token vocabulary) are skipped unless ``skip_arrays`` is False, which keeps this
    fast on real models. Raises RunError naming the file if it is not a readable GGUF.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise RunError(f"{path}: not a GGUF file (bad magic bytes)")
            version, n_tensors, n_kv = struct.unpack("<IQQ", _read_exact(f, 20, path))
            if version not in (2, 3) or n_kv > 100_000:
                raise RunError(f"{path}: unsupported or corrupt GGUF header (version {version})")
            meta: dict[str, Any] = {"__n_tensors__": n_tensors}
            for _ in range(n_kv):
                key = _read_string(f, path)
                (vtype,) = struct.unpack("<I", _read_exact(f, 4, path))
                meta[key] = _read_value(f, vtype, path, skip_arrays)
            return meta
    except FileNotFoundError:
        raise RunError(f"{path}: model file not found") from None
    except IsADirectoryError:
        raise RunError(f"{path}: is a directory, expected a GGUF file") from None
    except (struct.error, UnicodeDecodeError, MemoryError, OverflowError):
        raise RunError(f"{path}: corrupt GGUF metadata") from None


def _read_exact(f, n: int, path: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise RunError(f"{path}: truncated GGUF file")
    return data


def _read_string(f, path: str) -> str:
    (n,) = struct.unpack("<Q", _read_exact(f, 8, path))
    if n > 64 * 1024 * 1024:
        raise RunError(f"{path}: corrupt GGUF metadata (string of {n} bytes)")
    return _read_exact(f, n, path).decode("utf-8")


def _read_value(f, vtype: int, path: str, skip_arrays: bool) -> Any:
    if vtype == _STRING:
        return _read_string(f, path)
    if vtype == _ARRAY:
        (item_type,) = struct.unpack("<I", _read_exact(f, 4, path))
        (count,) = struct.unpack("<Q", _read_exact(f, 8, path))
        if item_type in _SCALARS:
            size = struct.calcsize(_SCALARS[item_type])
            data = _read_exact(f, size * count, path)
            if skip_arrays and count > 64:
                return None
            return list(struct.unpack(f"<{count}{_SCALARS[item_type]}", data))
        values = [_read_value(f, item_type, path, skip_arrays) for _ in range(count)]
        return None if skip_arrays and count > 64 else values
    fmt = _SCALARS.get(vtype)
    if fmt is None:
        raise RunError(f"{path}: corrupt GGUF metadata (value type {vtype})")
    return struct.unpack("<" + fmt, _read_exact(f, struct.calcsize(fmt), path))[0]


@dataclass(frozen=True)
class ModelIdentity:
    """Which model produced a row: the audit trail of every result."""

    model_name: str
    model_sha256: str
    mmproj_sha256: str
    chat_format: str


@dataclass(frozen=True)
class ModelInfo:
    """What medvlm needs to know about a text GGUF + mmproj GGUF pair."""

    model_name: str
    architecture: str
    projector_type: str
    has_chat_template: bool
    context_length: int | None
    # True when the text GGUF's template is a reasoning model's (it mentions <think>).
    thinking_template: bool = False
    # True when the mmproj tiles images at several resolutions (clip.vision.image_grid_pinpoints: LLaVA-1.6).
    grid_pinpoints: bool = False


def inspect_model(model_path: str, mmproj_path: str) -> ModelInfo:
    """Read both files' metadata and check they are a text model and a vision projector.

    Raises RunError with one clear message when a file is missing, not a GGUF, or of the wrong kind
    (for example a text GGUF given as the mmproj).
    """
    text = read_gguf_metadata(model_path)
    proj = read_gguf_metadata(mmproj_path)
    arch = text.get("general.architecture")
    if not arch or arch == "clip":
        raise RunError(f"{model_path}: is not a text model GGUF (general.architecture={arch!r}); pass the language model as --model")
    if proj.get("general.architecture") != "clip" or not proj.get("clip.has_vision_encoder", False):
        raise RunError(
            f"{mmproj_path}: is not a vision projector (mmproj) GGUF "
            f"(general.architecture={proj.get('general.architecture')!r}); pass the mmproj file as --mmproj"
        )
    projector = proj.get("clip.projector_type") or ("mlp" if proj.get("clip.has_llava_projector") else "unknown")
    name = text.get("general.name") or Path(model_path).stem
    ctx = text.get(f"{arch}.context_length")
    template = text.get("tokenizer.chat_template")
    return ModelInfo(
        model_name=str(name),
        architecture=str(arch),
        projector_type=str(projector),
        has_chat_template=bool(template),
        context_length=int(ctx) if isinstance(ctx, int) else None,
        thinking_template=isinstance(template, str) and _THINK_MARKER in template,
        # the key's presence is enough (long arrays are skipped when reading)
        grid_pinpoints="clip.vision.image_grid_pinpoints" in proj,
    )


def choose_chat_format(info: ModelInfo, requested: str | None = None) -> str:
    """The chat format for this model: ``requested`` if given (validated), else picked from its metadata.

    The rules, in order: a reasoning template (one that mentions ``<think>``) is rendered as it is
    (``mtmd``), since a fixed handler layout would drop its thinking prompt; a projector type with a
    llama-cpp-python handler gets that handler (``qwen2vl_merger`` -> ``qwen2.5-vl``, ``resampler`` ->
    ``minicpm-v-2.6``); any other model with a chat template gets ``mtmd`` (Gemma 3, Qwen3-VL, InternVL,
    LLaVA conversions with a template); a LLaVA-style projector without a template gets ``llava-1-6`` when it
    tiles images (``image_grid_pinpoints``: LLaVA-1.6 / NeXT), else ``llava-1-5``.

    Args:
        info: the model pair's metadata (`inspect_model`).
        requested: an explicit chat format (one of `CHAT_FORMATS`), or None to pick one.

    Returns:
        A key of `CHAT_HANDLERS`.

    Raises:
        RunError: for an unknown ``requested`` format, or a model whose format cannot be told.
    """
    if requested:
        if requested not in CHAT_FORMATS:
            raise RunError(f"unknown chat format {requested!r}; known: {', '.join(CHAT_FORMATS)}")
        return requested
    if info.has_chat_template and info.thinking_template:
        return "mtmd"
    if info.projector_type in _PROJECTOR_FORMATS:
        return _PROJECTOR_FORMATS[info.projector_type]
    # The model's own template is the most faithful layout when it has one (Gemma 3, Qwen3-VL, LLaVA-NeXT
    # conversions with templates); classic LLaVA-1.5 conversions ship none and use the Vicuna layout.
    if info.has_chat_template:
        return "mtmd"
    if info.projector_type in ("mlp", "mlp_norm", "ldp", "ldpv2"):
        return "llava-1-6" if info.grid_pinpoints else "llava-1-5"
    if info.projector_type in _TEMPLATE_ONLY_PROJECTORS:
        raise RunError(
            f"{_TEMPLATE_ONLY_PROJECTORS[info.projector_type]} (projector type {info.projector_type!r}) is laid out "
            f"only by its own chat template (chat format 'mtmd'), and this model's GGUF carries none; use a "
            f"conversion with tokenizer.chat_template, or pass --chat-format with one of {', '.join(CHAT_FORMATS)}"
        )
    raise RunError(
        f"cannot tell the chat format for projector type {info.projector_type!r} (the model has no chat "
        f"template); pass --chat-format with one of {', '.join(CHAT_FORMATS)}"
    )


_HASH_LOCK = threading.Lock()


def file_sha256(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """Hex sha256 of a file, cached by (path, size, mtime) so an 8 GB model is hashed once per host."""
    path = os.path.realpath(os.fspath(path))
    stat = os.stat(path)
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = Path(cache_dir) / "sha256-cache.json" if cache_dir else None
    with _HASH_LOCK:
        cache = _load_cache(cache_file)
        if key in cache:
            return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 * 1024 * 1024), b""):
            digest.update(block)
    value = digest.hexdigest()
    if cache_file is not None:
        with _HASH_LOCK:
            cache = _load_cache(cache_file)
            cache[key] = value
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
            os.replace(tmp, cache_file)
    return value


def _load_cache(cache_file: Path | None) -> dict[str, str]:
    if cache_file is None or not cache_file.exists():
        return {}
    try:
        return json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}  # a damaged cache only costs a re-hash


def identify_model(
    model_path: str, mmproj_path: str, requested_chat_format: str | None, cache_dir: str | os.PathLike | None
) -> ModelIdentity:
    """Check the GGUF pair, pick the chat format and hash both files (hashes cached per host)."""
    info = inspect_model(model_path, mmproj_path)
    return ModelIdentity(
        model_name=info.model_name,
        model_sha256=file_sha256(model_path, cache_dir),
        mmproj_sha256=file_sha256(mmproj_path, cache_dir),
        chat_format=choose_chat_format(info, requested_chat_format),
    )
