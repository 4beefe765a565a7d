"""Tiny model generation, GGUF inspection, chat format choice and cached hashing."""

from __future__ import annotations

import hashlib
import json

import pytest

from medvlm_core.errors import RunError
from medvlm_core.model.files import ModelInfo, choose_chat_format, file_sha256, inspect_model, read_gguf_metadata
from medvlm_core.testing.tiny_model import make_tiny_model


def test_tiny_models_are_deterministic(tmp_path, tiny_llava):
    again = make_tiny_model(tmp_path, family="llava")
    assert again.model_path.read_bytes() == tiny_llava.model_path.read_bytes()
    assert again.mmproj_path.read_bytes() == tiny_llava.mmproj_path.read_bytes()
    other = make_tiny_model(tmp_path / "s1", family="llava", seed=1)
    assert other.model_path.read_bytes() != tiny_llava.model_path.read_bytes()
    with pytest.raises(ValueError, match="bogus"):
        make_tiny_model(tmp_path, family="bogus")


def test_inspect_reads_family_and_refuses_wrong_files(tmp_path, tiny_llava, tiny_qwen):
    llava = inspect_model(str(tiny_llava.model_path), str(tiny_llava.mmproj_path))
    assert (llava.architecture, llava.projector_type, llava.has_chat_template) == ("llama", "mlp", True)
    qwen = inspect_model(str(tiny_qwen.model_path), str(tiny_qwen.mmproj_path))
    assert (qwen.architecture, qwen.projector_type) == ("qwen2vl", "qwen2vl_merger")
    assert choose_chat_format(qwen) == "qwen2.5-vl"
    assert choose_chat_format(llava) == "mtmd"  # it carries its own template
    # a text GGUF given as the mmproj, and the reverse
    with pytest.raises(RunError, match="not a vision projector"):
        inspect_model(str(tiny_llava.model_path), str(tiny_llava.model_path))
    with pytest.raises(RunError, match="not a text model"):
        inspect_model(str(tiny_llava.mmproj_path), str(tiny_llava.mmproj_path))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 zip, not gguf")
    with pytest.raises(RunError, match="not a GGUF file"):
        read_gguf_metadata(junk)
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(tiny_llava.model_path.read_bytes()[:100])
    with pytest.raises(RunError, match="truncated|corrupt"):
        read_gguf_metadata(truncated)
    with pytest.raises(RunError, match="not found"):
        read_gguf_metadata(tmp_path / "missing.gguf")


def test_chat_format_rules():
    base = dict(model_name="m", architecture="llama", context_length=None)
    assert choose_chat_format(ModelInfo(projector_type="mlp", has_chat_template=False, **base)) == "llava-1-5"
    assert choose_chat_format(ModelInfo(projector_type="gemma3", has_chat_template=True, **base)) == "mtmd"
    assert choose_chat_format(ModelInfo(projector_type="mlp", has_chat_template=True, **base), "llava-1-6") == "llava-1-6"
    with pytest.raises(RunError, match="pass --chat-format"):
        choose_chat_format(ModelInfo(projector_type="weird", has_chat_template=False, **base))
    with pytest.raises(RunError, match="unknown chat format"):
        choose_chat_format(ModelInfo(projector_type="mlp", has_chat_template=True, **base), "nope")


def test_file_hash_is_cached_per_size_and_mtime(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"abc")
    cache = tmp_path / "cache"
    assert file_sha256(f, cache) == hashlib.sha256(b"abc").hexdigest()
    assert len(json.loads((cache / "sha256-cache.json").read_text())) == 1
    f.write_bytes(b"abcd")  # new size -> new key, no stale hash
    assert file_sha256(f, cache) == hashlib.sha256(b"abcd").hexdigest()
