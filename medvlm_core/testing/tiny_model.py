"""Tiny random-weight vision-language models in GGUF format, for tests.

`make_tiny_model` writes a pair of files that real llama.cpp (through
llama-cpp-python and its libmtmd bindings) loads and runs like a real
vision-language model:

* a text model GGUF (a 2-layer decoder with a 64-wide hidden state), and
* an "mmproj" GGUF (a 2-block vision encoder plus the projector that maps
  image patches into the text model's embedding space).

Two families are supported, matching the two code paths we care about in
llama.cpp:

* ``"llava"``: text architecture ``llama`` + ``clip`` projector ``mlp``
  (every image becomes 64 image tokens).
* ``"qwen2vl"``: text architecture ``qwen2vl`` (M-RoPE, QKV bias) +
  ``clip`` projector ``qwen2vl_merger`` (dynamic resolution: the number of
  image tokens grows with the image size).

Everything is built from scratch with ``gguf.GGUFWriter``: no downloads, no
network. The weights are random, so the generated text is gibberish, but it
is deterministic for a given seed and greedy decoding, and it is never
empty: the model (practically) never produces an end-of-sequence token (see
`_output_matrix`). Each file is a few hundred kilobytes and a chat completion
on an image takes well under a second on a CPU.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

__all__ = ["FAMILIES", "TinyModel", "make_tiny_model"]

FAMILIES = ("llava", "qwen2vl")
"""Model families `make_tiny_model` can generate."""


@dataclass(frozen=True)
class TinyModel:
    """Paths of a generated model pair."""

    family: str
    model_path: Path
    mmproj_path: Path


# --------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------

# Text decoder, shared by both families. head_dim = 64 / 4 = 16.
TEXT_EMBD = 64
TEXT_LAYERS = 2
TEXT_HEADS = 4
TEXT_KV_HEADS = 2  # grouped-query attention, as in the real models
TEXT_FF = 128
# Large enough that big document images (hundreds of image tokens for
# qwen2vl) fit if the caller asks for a large n_ctx; costs nothing on disk.
TEXT_CONTEXT = 8192
# M-RoPE sections (temporal, height, width, unused), in rotary pairs. They
# must add up to at most head_dim / 2 = 8.
QWEN2VL_ROPE_SECTIONS = [4, 2, 2, 0]

# Vision encoder. The feed-forward width must differ from the embedding
# width: clip.cpp swaps ffn_up/ffn_down of "legacy" files when the down
# projection's first dimension equals n_embd, which it would then always do.
VISION_EMBD = 32
VISION_FF = 64
VISION_HEADS = 2  # head_dim 16: qwen2vl's vision M-RoPE needs a multiple of 4
VISION_LAYERS = 2

# LLaVA resizes (and pads) every image to a 32x32 square: 8x8 = 64 patches,
# so 64 image tokens whatever the input size.
LLAVA_IMAGE_SIZE = 32
LLAVA_PATCH_SIZE = 4

# Qwen2-VL keeps the aspect ratio and emits one token per 2x2 block of
# patches. With 28-pixel patches a 1000x1300 page becomes 18x23 = 414 tokens;
# the real 14-pixel patches would give 1656 tokens, which nearly fills a
# 2048-token context and makes the vision attention 16 times more expensive.
QWEN2VL_PATCH_SIZE = 28
QWEN2VL_MERGE = 2
# Only a default for clip.cpp's warm-up pass; the real size comes from the
# image (between 8 and 4096 tokens, limits set inside clip.cpp).
QWEN2VL_IMAGE_SIZE = 560

# Standard deviation of the random weights: small enough that activations
# stay finite through the residual stream, large enough that the logits are
# not all (nearly) equal.
WEIGHT_STD = 0.05

# OpenAI CLIP normalisation constants, as written by llama.cpp's converters.
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

# A handful of BPE merges so that the merge code path is exercised; the
# merged token of each pair is appended to the vocabulary.
MERGES = [("Ġ", "t"), ("h", "e"), ("i", "n"), ("e", "r"), ("a", "n"), ("Ġ", "a"), ("o", "n"), ("r", "e")]

# Control tokens. The ChatML markers are used by the chat templates; the
# vision markers by Qwen2-VL's template and by libmtmd, which wraps each
# qwen2vl image in <|vision_start|> ... <|vision_end|> and must find them as
# single special tokens.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
BOS_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"  # what the Qwen instruct models stop on

# Plain ChatML. MTMDChatHandler renders the GGUF's template after replacing
# each image part with a text part holding libmtmd's media marker, so text
# parts are all a template needs to handle.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# chat_template of Qwen/Qwen2.5-VL-7B-Instruct, verbatim.
QWEN2VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, indexed by byte value.

    Byte-level BPE vocabularies (tokenizer model "gpt2") spell every byte as
    one of these characters, e.g. the space byte as "Ġ".
    """
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return [table[byte] for byte in range(256)]


@dataclass(frozen=True)
class _Vocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    # Tokens the model may generate: visible ASCII bytes and the merged
    # tokens. Every other token (control tokens, whitespace and non-ASCII
    # bytes) gets a zero row in the output projection.
    generatable: list[bool]

    def id_of(self, token: str) -> int:
        return self.tokens.index(token)


def _build_vocab() -> _Vocab:
    """The byte-level BPE vocabulary shared by both families.

    Ids 0-255 are the 256 byte tokens (id == byte value), then the merged
    tokens, then the control tokens.
    """
    byte_chars = _bytes_to_unicode()
    tokens = list(byte_chars)
    generatable = [0x21 <= byte <= 0x7E for byte in range(256)]
    for left, right in MERGES:
        tokens.append(left + right)
        generatable.append(True)
    tokens += SPECIAL_TOKENS
    generatable += [False] * len(SPECIAL_TOKENS)
    token_types = [int(gguf.TokenType.NORMAL)] * (len(tokens) - len(SPECIAL_TOKENS))
    token_types += [int(gguf.TokenType.CONTROL)] * len(SPECIAL_TOKENS)
    merges = [f"{left} {right}" for left, right in MERGES]
    return _Vocab(tokens, token_types, merges, generatable)


def _add_tokenizer(writer: gguf.GGUFWriter, vocab: _Vocab, chat_template: str) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.id_of(BOS_TOKEN))
    writer.add_eos_token_id(vocab.id_of(EOS_TOKEN))
    writer.add_pad_token_id(vocab.id_of(BOS_TOKEN))
    # Like Qwen: prompts start with <|im_start|>, not with a BOS token.
    writer.add_add_bos_token(False)
    writer.add_chat_template(chat_template)


# --------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------
#
# numpy shapes are (rows, columns) = (out_features, in_features); gguf
# stores the reversed shape, which is what llama.cpp expects.


def _matrix(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Random F16 weight tensor (matrices and convolution kernels)."""
    return (rng.standard_normal(shape, dtype=np.float32) * WEIGHT_STD).astype(np.float16)


def _bias(rng: np.random.Generator, n: int) -> np.ndarray:
    """Small random F32 bias vector."""
    return rng.standard_normal(n, dtype=np.float32) * (WEIGHT_STD / 2)


def _ones(n: int) -> np.ndarray:
    """F32 norm weight (norm layers start as the identity, as in training)."""
    return np.ones(n, dtype=np.float32)


def _zeros(n: int) -> np.ndarray:
    """F32 norm bias."""
    return np.zeros(n, dtype=np.float32)


def _output_matrix(rng: np.random.Generator, vocab: _Vocab) -> np.ndarray:
    """Output projection (vocab x n_embd) that can only emit generatable tokens.

    With random weights the argmax token is arbitrary, so it could be the
    end-of-sequence token and a completion would end up empty. Tokens whose
    row is all zeros always get a logit of exactly 0, while the other ~100
    tokens get logits of roughly +-0.4 (the hidden state is RMS-normalised to
    norm 8 and the weights have std 0.05); the largest of those is positive
    except with probability ~2^-100, so greedy decoding never picks a zeroed
    token. Zeroing also the whitespace and non-ASCII bytes keeps the output
    valid UTF-8 with visible characters, so the decoded text is not empty
    even after .strip().
    """
    weights = _matrix(rng, len(vocab.tokens), TEXT_EMBD)
    weights[~np.array(vocab.generatable)] = 0
    return weights


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def _write_text_model(writer: gguf.GGUFWriter, family: str, rng: np.random.Generator) -> None:
    """Hyperparameters, tokenizer and weights of the text decoder."""
    is_qwen = family == "qwen2vl"
    vocab = _build_vocab()
    kv_dim = TEXT_KV_HEADS * (TEXT_EMBD // TEXT_HEADS)

    writer.add_name(f"tiny-{family}")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(TEXT_CONTEXT)
    writer.add_embedding_length(TEXT_EMBD)
    writer.add_block_count(TEXT_LAYERS)
    writer.add_feed_forward_length(TEXT_FF)
    writer.add_head_count(TEXT_HEADS)
    writer.add_head_count_kv(TEXT_KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(len(vocab.tokens))
    if is_qwen:
        writer.add_rope_freq_base(1_000_000.0)
        writer.add_rope_dimension_sections(QWEN2VL_ROPE_SECTIONS)
    else:
        writer.add_rope_freq_base(10_000.0)
    _add_tokenizer(writer, vocab, QWEN2VL_TEMPLATE if is_qwen else CHATML_TEMPLATE)

    writer.add_tensor("token_embd.weight", _matrix(rng, len(vocab.tokens), TEXT_EMBD))
    writer.add_tensor("output_norm.weight", _ones(TEXT_EMBD))
    writer.add_tensor("output.weight", _output_matrix(rng, vocab))
    for layer in range(TEXT_LAYERS):
        prefix = f"blk.{layer}."
        writer.add_tensor(prefix + "attn_norm.weight", _ones(TEXT_EMBD))
        writer.add_tensor(prefix + "attn_q.weight", _matrix(rng, TEXT_EMBD, TEXT_EMBD))
        writer.add_tensor(prefix + "attn_k.weight", _matrix(rng, kv_dim, TEXT_EMBD))
        writer.add_tensor(prefix + "attn_v.weight", _matrix(rng, kv_dim, TEXT_EMBD))
        if is_qwen:
            writer.add_tensor(prefix + "attn_q.bias", _bias(rng, TEXT_EMBD))
            writer.add_tensor(prefix + "attn_k.bias", _bias(rng, kv_dim))
            writer.add_tensor(prefix + "attn_v.bias", _bias(rng, kv_dim))
        writer.add_tensor(prefix + "attn_output.weight", _matrix(rng, TEXT_EMBD, TEXT_EMBD))
        writer.add_tensor(prefix + "ffn_norm.weight", _ones(TEXT_EMBD))
        writer.add_tensor(prefix + "ffn_gate.weight", _matrix(rng, TEXT_FF, TEXT_EMBD))
        writer.add_tensor(prefix + "ffn_up.weight", _matrix(rng, TEXT_FF, TEXT_EMBD))
        writer.add_tensor(prefix + "ffn_down.weight", _matrix(rng, TEXT_EMBD, TEXT_FF))


def _write_mmproj(writer: gguf.GGUFWriter, family: str, rng: np.random.Generator) -> None:
    """Hyperparameters and weights of the vision encoder and projector."""
    is_qwen = family == "qwen2vl"
    image_size = QWEN2VL_IMAGE_SIZE if is_qwen else LLAVA_IMAGE_SIZE
    patch = QWEN2VL_PATCH_SIZE if is_qwen else LLAVA_PATCH_SIZE

    writer.add_name(f"tiny-{family}-mmproj")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", "qwen2vl_merger" if is_qwen else "mlp")
    writer.add_bool("clip.use_gelu", True)
    writer.add_uint32("clip.vision.image_size", image_size)
    writer.add_uint32("clip.vision.patch_size", patch)
    writer.add_uint32("clip.vision.embedding_length", VISION_EMBD)
    writer.add_uint32("clip.vision.feed_forward_length", VISION_FF)
    # Must equal the text model's n_embd: libmtmd refuses mismatched pairs.
    writer.add_uint32("clip.vision.projection_dim", TEXT_EMBD)
    writer.add_uint32("clip.vision.attention.head_count", VISION_HEADS)
    writer.add_uint32("clip.vision.block_count", VISION_LAYERS)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_array("clip.vision.image_mean", IMAGE_MEAN)
    writer.add_array("clip.vision.image_std", IMAGE_STD)
    if is_qwen:
        writer.add_uint32("clip.vision.spatial_merge_size", QWEN2VL_MERGE)

    writer.add_tensor("v.patch_embd.weight", _matrix(rng, VISION_EMBD, 3, patch, patch))
    if is_qwen:
        # Qwen2-VL's patch embedding is a 3-D convolution over two video
        # frames; llama.cpp stores it as one 2-D kernel per frame.
        writer.add_tensor("v.patch_embd.weight.1", _matrix(rng, VISION_EMBD, 3, patch, patch))
    else:
        n_patches = (image_size // patch) ** 2
        # F32 like the real converters: it is concatenated to the F32
        # patch embeddings.
        writer.add_tensor("v.class_embd", rng.standard_normal(VISION_EMBD, dtype=np.float32) * WEIGHT_STD)
        writer.add_tensor("v.position_embd.weight", _matrix(rng, n_patches + 1, VISION_EMBD))
        writer.add_tensor("v.pre_ln.weight", _ones(VISION_EMBD))
        writer.add_tensor("v.pre_ln.bias", _zeros(VISION_EMBD))

    for block in range(VISION_LAYERS):
        prefix = f"v.blk.{block}."
        writer.add_tensor(prefix + "ln1.weight", _ones(VISION_EMBD))
        writer.add_tensor(prefix + "ln1.bias", _zeros(VISION_EMBD))
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            writer.add_tensor(prefix + name + ".weight", _matrix(rng, VISION_EMBD, VISION_EMBD))
            writer.add_tensor(prefix + name + ".bias", _bias(rng, VISION_EMBD))
        writer.add_tensor(prefix + "ln2.weight", _ones(VISION_EMBD))
        writer.add_tensor(prefix + "ln2.bias", _zeros(VISION_EMBD))
        writer.add_tensor(prefix + "ffn_up.weight", _matrix(rng, VISION_FF, VISION_EMBD))
        writer.add_tensor(prefix + "ffn_up.bias", _bias(rng, VISION_FF))
        writer.add_tensor(prefix + "ffn_down.weight", _matrix(rng, VISION_EMBD, VISION_FF))
        writer.add_tensor(prefix + "ffn_down.bias", _bias(rng, VISION_EMBD))

    if is_qwen:
        # The merger concatenates each 2x2 block of patch features before
        # its MLP, hence the 4x wider input.
        merged = VISION_EMBD * QWEN2VL_MERGE * QWEN2VL_MERGE
        writer.add_tensor("v.post_ln.weight", _ones(VISION_EMBD))
        writer.add_tensor("v.post_ln.bias", _zeros(VISION_EMBD))
        writer.add_tensor("mm.0.weight", _matrix(rng, merged, merged))
        writer.add_tensor("mm.0.bias", _bias(rng, merged))
        writer.add_tensor("mm.2.weight", _matrix(rng, TEXT_EMBD, merged))
        writer.add_tensor("mm.2.bias", _bias(rng, TEXT_EMBD))
    else:
        hidden = TEXT_EMBD
        writer.add_tensor("mm.0.weight", _matrix(rng, hidden, VISION_EMBD))
        writer.add_tensor("mm.0.bias", _bias(rng, hidden))
        writer.add_tensor("mm.2.weight", _matrix(rng, TEXT_EMBD, hidden))
        writer.add_tensor("mm.2.bias", _bias(rng, TEXT_EMBD))


def _write_gguf(
    path: Path,
    arch: str,
    fill: Callable[[gguf.GGUFWriter, str, np.random.Generator], None],
    family: str,
    rng: np.random.Generator,
) -> None:
    """Write one GGUF file atomically: readers never see a partial file."""
    # The temporary file sits in the destination directory so that
    # os.replace is a rename on the same filesystem.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp_name, arch=arch)
        fill(writer, family, rng)
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


def make_tiny_model(out_dir: str | os.PathLike, family: str = "llava", seed: int = 0) -> TinyModel:
    """Generate a tiny random-weight vision-language model pair.

    Writes ``<out_dir>/tiny-<family>.gguf`` (the text model) and
    ``<out_dir>/tiny-<family>-mmproj.gguf`` (the vision projector), creating
    ``out_dir`` if needed and replacing existing files atomically. The same
    ``seed`` always gives byte-identical files.

    Load the pair with llama-cpp-python, e.g. for ``"llava"``::

        handler = Llava15ChatHandler(clip_model_path=str(model.mmproj_path))
        llm = Llama(model_path=str(model.model_path), chat_handler=handler, n_ctx=2048)

    Args:
        out_dir: Directory for the two files.
        family: One of `FAMILIES`: ``"llava"`` or ``"qwen2vl"``.
        seed: Non-negative seed of the random weights.

    Returns:
        The family and the paths of the two files.

    Raises:
        ValueError: If ``family`` is not one of `FAMILIES`.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = TinyModel(
        family=family,
        model_path=out / f"tiny-{family}.gguf",
        mmproj_path=out / f"tiny-{family}-mmproj.gguf",
    )
    text_arch = "qwen2vl" if family == "qwen2vl" else "llama"
    # One independent random stream per file, so that changing one file's
    # layout does not change the other's weights.
    _write_gguf(model.model_path, text_arch, _write_text_model, family, np.random.default_rng([seed, 0]))
    _write_gguf(model.mmproj_path, "clip", _write_mmproj, family, np.random.default_rng([seed, 1]))
    return model
