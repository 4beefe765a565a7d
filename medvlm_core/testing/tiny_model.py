"""Tiny random-weight vision-language models in GGUF format, for tests.

`make_tiny_model` writes a pair of files that real llama.cpp (through
llama-cpp-python and its libmtmd bindings) loads and runs like a real
vision-language model:

* a text model GGUF (a 2-layer decoder with a 64-wide hidden state, 128 for
  MiniCPM-V), and
* an "mmproj" GGUF (a 2-block vision encoder plus the projector that maps
  image patches into the text model's embedding space).

Each family follows the GGUF layout that llama.cpp's converters write for the
real models (tensor names, metadata keys, projector type), so the same code
paths in llama.cpp's ``clip.cpp`` / libmtmd run as for the real model:

* ``"llava"``: text architecture ``llama`` + ``clip`` projector ``mlp``
  (every image becomes 64 image tokens).
* ``"llavanext"``: the llava text model without a chat template (as the
  LLaVA-1.6 conversions ship) + projector ``mlp`` with
  ``image_grid_pinpoints`` (llava-uhd tiling: a page becomes a grid of
  64-token tiles plus the overview) and an ``image_newline`` embedding.
* ``"qwen2vl"``: text architecture ``qwen2vl`` (M-RoPE, QKV bias) +
  ``clip`` projector ``qwen2vl_merger`` (dynamic resolution: the number of
  image tokens grows with the image size).
* ``"qwen25vl"``: the same text model + projector ``qwen2.5vl_merger``
  (RMS norms, SiLU-gated FFN, window attention), as Qwen2.5-VL files are.
* ``"qwen3vl"``: text architecture ``qwen3vl`` (interleaved M-RoPE, QK norm,
  deepstack inputs) + projector ``qwen3vl_merger`` (fused QKV, learned
  position embeddings resized to the image, one deepstack merger).
* ``"gemma3"``: text architecture ``gemma3`` (QK norm, post-norms, sliding
  window) + projector ``gemma3`` (SigLIP, 4x4 average pooling, 16 tokens).
* ``"gemma4"``: text architecture ``gemma4`` (a sliding-window and a
  full-attention layer, proportional RoPE) + projector ``gemma4v`` (2-D
  RoPE ViT with learned x/y position tables, 3x3 pooling, variable size).
* ``"internvl"``: text architecture ``qwen2`` + projector ``internvl``
  (InternViT with layer scale, pixel shuffle, dynamic tiling: each page
  becomes up to 6 tiles plus a thumbnail, 16 tokens each).
* ``"minicpmv"``: text architecture ``qwen2`` (128 wide: the resampler's
  attention heads are 128 wide) + projector ``resampler`` (MiniCPM-V 2.6:
  llava-uhd slicing, 16 query tokens per slice).
* ``"idefics3"``: text architecture ``llama`` + projector ``idefics3``
  (SmolVLM / Idefics3: SigLIP, pixel shuffle, a grid of tiles plus the
  global image, each tile behind ``<row_R_col_C>`` tokens).
* ``"pixtral"``: text architecture ``llama`` + projector ``pixtral`` in its
  Mistral Small 3.1 form (2-D RoPE ViT, 2x2 patch merger, an
  ``[IMG_BREAK]`` embedding after each row of image tokens).

``reasoning=True`` gives the variant whose chat template opens a thinking
block in the generation prompt (``<|im_start|>assistant\\n<think>\\n``, as
Qwen3 thinking models do), and ``chat_template=`` replaces the template.

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
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

__all__ = ["FAMILIES", "REASONING_FAMILIES", "TinyModel", "make_tiny_model", "thinking_template"]

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


# --------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------

# Text decoder, shared by the families (MiniCPM-V doubles the width, see
# MINICPMV_TEXT_EMBD). head_dim = 64 / 4 = 16.
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
    """A tokenizer vocabulary and which of its tokens the model may emit."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    # Tokens the model may generate: visible ASCII bytes and the merged
    # tokens. Every other token (control tokens, whitespace and non-ASCII
    # bytes) gets a zero row in the output projection.
    generatable: list[bool]

    def id_of(self, token: str) -> int:
        """The id of ``token``."""
        return self.tokens.index(token)


def _build_vocab(specials: list[str] = SPECIAL_TOKENS, reasoning: bool = False,
                 extra_merges: tuple[tuple[str, str], ...] = ()) -> _Vocab:
    """A byte-level BPE vocabulary (the same for every family but its control tokens).

    Ids 0-255 are the 256 byte tokens (id == byte value), then the merged
    tokens, then the control tokens, then (for a reasoning model) ``<think>``
    and ``</think>`` as user-defined tokens, as in Qwen3's vocabulary.
    """
    byte_chars = _bytes_to_unicode()
    tokens = list(byte_chars)
    generatable = [0x21 <= byte <= 0x7E for byte in range(256)]
    for left, right in MERGES:
        tokens.append(left + right)
        generatable.append(True)
    # Family-specific merges (whitespace runs such as "\n\n"): never emitted.
    for left, right in extra_merges:
        tokens.append(left + right)
        generatable.append(False)
    tokens += specials
    generatable += [False] * len(specials)
    token_types = [int(gguf.TokenType.NORMAL)] * (len(tokens) - len(specials))
    token_types += [int(gguf.TokenType.CONTROL)] * len(specials)
    if reasoning:
        tokens += ["<think>", "</think>"]
        generatable += [False, False]
        token_types += [int(gguf.TokenType.USER_DEFINED)] * 2
    merges = [f"{left} {right}" for left, right in MERGES + list(extra_merges)]
    return _Vocab(tokens, token_types, merges, generatable)


def _add_tokenizer(writer: gguf.GGUFWriter, vocab: _Vocab, chat_template: str, bos: str = BOS_TOKEN,
                   eos: str = EOS_TOKEN, add_bos: bool = False, pad: str | None = None) -> None:
    """The ``tokenizer.*`` keys: the vocabulary, its special token ids and the chat template."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.id_of(bos))
    writer.add_eos_token_id(vocab.id_of(eos))
    writer.add_pad_token_id(vocab.id_of(pad or bos))
    # Like Qwen: prompts start with <|im_start|>, not with a BOS token
    # (Gemma's start with <bos>, added by the tokenizer).
    writer.add_add_bos_token(add_bos)
    if chat_template:  # "" = a model without a template (classic LLaVA conversions)
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


def _output_matrix(rng: np.random.Generator, vocab: _Vocab, n_embd: int = TEXT_EMBD) -> np.ndarray:
    """Output projection (vocab x n_embd) that can only emit generatable tokens.

    With random weights the argmax token is arbitrary, so it could be the
    end-of-sequence token and a completion would end up empty. Tokens whose
    row is all zeros always get a logit of exactly 0, while the other ~100
    tokens get logits of roughly +-0.4 (the hidden state is RMS-normalised to
    norm sqrt(n_embd) = 8 and the weights have std 0.05); the largest of those is positive
    except with probability ~2^-100, so greedy decoding never picks a zeroed
    token. Zeroing also the whitespace and non-ASCII bytes keeps the output
    valid UTF-8 with visible characters, so the decoded text is not empty
    even after .strip().
    """
    weights = _matrix(rng, len(vocab.tokens), n_embd)
    weights[~np.array(vocab.generatable)] = 0
    return weights


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def _write_text_model(writer: gguf.GGUFWriter, family: str, rng: np.random.Generator, name: str | None = None,
                      template: str | None = None, reasoning: bool = False) -> None:
    """Hyperparameters, tokenizer and weights of the llava and qwen2vl text decoders."""
    is_qwen = family == "qwen2vl"
    vocab = _build_vocab(reasoning=reasoning)
    kv_dim = TEXT_KV_HEADS * (TEXT_EMBD // TEXT_HEADS)

    writer.add_name(name or f"tiny-{family}")
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
    _add_tokenizer(writer, vocab, template if template is not None else (QWEN2VL_TEMPLATE if is_qwen else CHATML_TEMPLATE))

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
    """Hyperparameters and weights of the llava and qwen2vl vision encoders and projectors."""
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


# --------------------------------------------------------------------------
# Families added after llava and qwen2vl
# --------------------------------------------------------------------------
#
# Every new family writes its files through the generic helpers below; the
# two original families keep their own writers above so that their files stay
# byte-identical for a given seed.

# What a generation prompt ends with in ChatML, and what a Qwen3 thinking
# model's template (Qwen3-*-Thinking, QwQ) writes there instead.
CHATML_GENERATION_PROMPT = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
THINKING_GENERATION_PROMPT = "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"

# Qwen3-VL-Instruct's layout (no default system turn, vision tokens in place
# of each image part), without its tool-calling branches.
QWEN3VL_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{% if message['role'] == 'assistant' and '</think>' in message['content'] %}"
    "{{ message['content'].split('</think>')[-1].lstrip('\n') }}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    + CHATML_GENERATION_PROMPT
)

# InternVL 2.5 / 3 (ChatML with InternVL's default system turn).
INTERNVL_SYSTEM = "You are InternVL, a multimodal large language model."
INTERNVL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + INTERNVL_SYSTEM + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    + CHATML_GENERATION_PROMPT
)

# google/gemma-3-4b-it's template, without its role-alternation checks.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% else %}{% set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' %}{% endif %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# google/gemma-4-31B-it's layout (thinking off: the generation prompt holds
# an empty thought channel), without its tool-calling branches.
GEMMA4_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "<|turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|image|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n"
    "{% if not enable_thinking | default(false) %}<|channel>thought\n<channel|>{% endif %}{% endif %}"
)
GEMMA4_SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>", "<|channel>", "<channel|>",
]

# Gemma's control tokens (SentencePiece in the real model; a byte-level BPE
# here, which llama.cpp runs the same way).
GEMMA3_SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]

# HuggingFaceTB/SmolVLM-Instruct's template (with string contents handled).
SMOLVLM_TEMPLATE = (
    "<|im_start|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# SmolVLM's control tokens, with the tile-position tokens of grids up to 4x4
# (libmtmd writes "<fake_token_around_image><row_R_col_C>" before each tile).
IDEFICS3_SPECIAL_TOKENS = (
    ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<fake_token_around_image>",
     "<global-img>", "<image>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]
)

# Mistral Small 3.1's template (Pixtral / Mistral3), without tool calls.
MISTRAL3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ message['content'] }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for block in message['content'] %}"
    "{% if block['type'] == 'text' %}{{ block['text'] }}"
    "{% elif block['type'] in ['image', 'image_url'] %}[IMG]{% endif %}"
    "{% endfor %}{% endif %}[/INST]"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
MISTRAL3_SPECIAL_TOKENS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]",
]

# Qwen2.5-VL: the qwen2vl sizes, with window attention in every block but
# each n-th (full attention in block 1 of 2; the real models: 7, 15, 23, 31).
QWEN25VL_WA_PATTERN = 2

# Qwen3-VL: patches of 16 pixels in the real model; 28 here for the same
# reason as qwen2vl (a page stays at a few hundred tokens). The learned
# position embeddings are a square grid that clip.cpp resizes (bilinear) to
# the image's patch grid; deepstack taps the output of vision block 0.
QWEN3VL_PATCH_SIZE = 28
QWEN3VL_IMAGE_SIZE = 560
QWEN3VL_POS_GRID = 8
QWEN3VL_DEEPSTACK_LAYERS = (0,)
QWEN3VL_ROPE_SECTIONS = [4, 2, 2, 0]

# Gemma 3: SigLIP at a fixed square input; clip.cpp average-pools the patch
# grid by 4 (the default of every Gemma 3 size): 16x16 patches -> 16 tokens.
GEMMA3_IMAGE_SIZE = 64
GEMMA3_PATCH_SIZE = 4
GEMMA3_SLIDING_WINDOW = 512

# Gemma 4: 16-pixel patches in the real model, 28 here; clip.cpp pools 3x3
# patches into a token (84 pixels): a letter page is about 12x15 tokens.
GEMMA4_PATCH_SIZE = 28
GEMMA4_IMAGE_SIZE = 896
# Rows of each learned position table (x and y; 10240 in the real model): a
# patch column or row index past it would read out of bounds, so room for
# pages of extreme aspect ratio. F16, looked up by row.
GEMMA4_POS_TABLE = 512
GEMMA4_SLIDING_WINDOW = 512

# InternVL: 32-pixel tiles of 8x8 patches, pixel shuffle by 2 -> 16 tokens
# per tile; a page is cut into up to 6 tiles plus a thumbnail.
INTERNVL_IMAGE_SIZE = 32
INTERNVL_PATCH_SIZE = 4
INTERNVL_SCALE_FACTOR = 2
INTERNVL_MAX_TILES = 6

# MiniCPM-V 2.6 (clip.minicpmv_version 3): the resampler's attention heads
# are 128 wide (hard-coded in clip.cpp), so the text model is 128 wide. Each
# slice (and the overview) becomes 16 query tokens; the SigLIP position
# embeddings are the 70x70 bucket grid clip.cpp indexes.
MINICPMV_TEXT_EMBD = 128
MINICPMV_TEXT_FF = 128
MINICPMV_IMAGE_SIZE = 32
MINICPMV_PATCH_SIZE = 4
MINICPMV_VERSION = 3
MINICPMV_QUERIES = 16
MINICPMV_POS_BUCKETS = 70

# SmolVLM: 32-pixel tiles (8x8 patches), pixel shuffle by 2 -> 16 tokens per
# tile; a page is first resized to a longest edge of 64 pixels, so a letter
# page is a 2x2 grid of tiles plus the global image: 80 image tokens.
IDEFICS3_IMAGE_SIZE = 32
IDEFICS3_PATCH_SIZE = 4
IDEFICS3_SCALE_FACTOR = 2
IDEFICS3_LONGEST_EDGE = 64

# Pixtral (Mistral Small 3.1): 28-pixel patches here (16 in the real model),
# merged 2x2, plus one [IMG_BREAK] per row but the last: a letter page is
# 18x23 + 22 = 436 image tokens.
PIXTRAL_PATCH_SIZE = 28
PIXTRAL_IMAGE_SIZE = 1540
PIXTRAL_MERGE = 2

# SigLIP / Qwen3-VL / MiniCPM-V normalisation; InternVL uses ImageNet's.
HALF = [0.5, 0.5, 0.5]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class _TextSpec:
    """Shape and vocabulary of a family's text decoder."""

    arch: str
    template: str
    n_embd: int = TEXT_EMBD
    n_ff: int = TEXT_FF
    qkv_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False  # Gemma: norms after attention and after the FFN
    rope_base: float = 1_000_000.0
    rope_sections: list[int] | None = None
    n_deepstack: int = 0
    sliding_window: int | None = None
    specials: list[str] = field(default_factory=lambda: list(SPECIAL_TOKENS))
    bos: str = BOS_TOKEN
    eos: str = EOS_TOKEN
    add_bos: bool = False
    extra_merges: tuple[tuple[str, str], ...] = ()


_TEXT_SPECS = {
    "qwen3vl": _TextSpec(
        arch="qwen3vl", template=QWEN3VL_TEMPLATE, qk_norm=True, rope_base=5_000_000.0,
        rope_sections=QWEN3VL_ROPE_SECTIONS, n_deepstack=len(QWEN3VL_DEEPSTACK_LAYERS),
    ),
    "gemma3": _TextSpec(
        arch="gemma3", template=GEMMA3_TEMPLATE, qk_norm=True, post_norms=True,
        sliding_window=GEMMA3_SLIDING_WINDOW, specials=GEMMA3_SPECIAL_TOKENS,
        bos="<bos>", eos="<end_of_turn>", add_bos=True,
    ),
    "gemma4": _TextSpec(
        arch="gemma4", template=GEMMA4_TEMPLATE, qk_norm=True, post_norms=True,
        sliding_window=GEMMA4_SLIDING_WINDOW, specials=GEMMA4_SPECIAL_TOKENS,
        bos="<bos>", eos="<turn|>", add_bos=True,
    ),
    "internvl": _TextSpec(
        arch="qwen2", template=INTERNVL_TEMPLATE, qkv_bias=True,
        specials=SPECIAL_TOKENS + ["<img>", "</img>", "<IMG_CONTEXT>"],
    ),
    "minicpmv": _TextSpec(
        arch="qwen2", template=CHATML_TEMPLATE, n_embd=MINICPMV_TEXT_EMBD, n_ff=MINICPMV_TEXT_FF, qkv_bias=True,
        specials=SPECIAL_TOKENS + ["<image>", "</image>", "<slice>", "</slice>", "<unk>"],
    ),
    "pixtral": _TextSpec(
        arch="llama", template=MISTRAL3_TEMPLATE, rope_base=1_000_000_000.0, specials=MISTRAL3_SPECIAL_TOKENS,
        bos="<s>", eos="</s>", add_bos=True,
    ),
    # libmtmd looks "\n\n" up as one token (it opens the global image).
    "idefics3": _TextSpec(
        arch="llama", template=SMOLVLM_TEMPLATE, rope_base=100_000.0, specials=IDEFICS3_SPECIAL_TOKENS,
        bos="<|im_start|>", eos="<end_of_utterance>", extra_merges=(("Ċ", "Ċ"),),
    ),
}


def thinking_template(template: str) -> str:
    """The reasoning variant of a ChatML chat template: its generation prompt opens a thinking block.

    Args:
        template: a template that ends its generation prompt with ``<|im_start|>assistant\\n``.

    Returns:
        The same template whose generation prompt is ``<|im_start|>assistant\\n<think>\\n``, as the
        templates of Qwen3 thinking models write it.

    Raises:
        ValueError: if the template has no ChatML generation prompt to extend.
    """
    if CHATML_GENERATION_PROMPT not in template:
        raise ValueError("the reasoning variant needs a ChatML template (<|im_start|>assistant generation prompt)")
    return template.replace(CHATML_GENERATION_PROMPT, THINKING_GENERATION_PROMPT)


def _write_decoder(writer: gguf.GGUFWriter, spec: _TextSpec, rng: np.random.Generator, name: str,
                   template: str, reasoning: bool) -> None:
    """Hyperparameters, tokenizer and weights of a new family's text decoder."""
    vocab = _build_vocab(spec.specials, reasoning, spec.extra_merges)
    head_dim = spec.n_embd // TEXT_HEADS
    kv_dim = TEXT_KV_HEADS * head_dim

    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(TEXT_CONTEXT)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(TEXT_LAYERS)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(TEXT_HEADS)
    writer.add_head_count_kv(TEXT_KV_HEADS)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(len(vocab.tokens))
    writer.add_rope_freq_base(spec.rope_base)
    if spec.rope_sections is not None:
        writer.add_rope_dimension_sections(spec.rope_sections)
    if spec.n_deepstack:
        # The text model takes (1 + n) * n_embd wide image embeddings: the
        # main one plus one per deepstack layer, added after decoder layer i.
        writer.add_uint32(f"{spec.arch}.n_deepstack_layers", spec.n_deepstack)
    if spec.sliding_window is not None:
        writer.add_sliding_window(spec.sliding_window)
        writer.add_rope_freq_base_swa(10_000.0)
    is_gemma4 = spec.arch == "gemma4"
    if is_gemma4:
        # Layer 0 slides, layer 1 attends globally (5:1 in the real models);
        # no per-layer input embeddings (as the 31B model).
        writer.add_array("gemma4.attention.sliding_window_pattern", [True, False])
        writer.add_uint32("gemma4.attention.key_length_swa", head_dim)
        writer.add_uint32("gemma4.attention.value_length_swa", head_dim)
        writer.add_uint32("gemma4.embedding_length_per_layer_input", 0)
        writer.add_float32("gemma4.final_logit_softcapping", 30.0)
    pad = "<pad>" if "<pad>" in spec.specials else None
    _add_tokenizer(writer, vocab, template, bos=spec.bos, eos=spec.eos, add_bos=spec.add_bos, pad=pad)

    n = spec.n_embd
    writer.add_tensor("token_embd.weight", _matrix(rng, len(vocab.tokens), n))
    writer.add_tensor("output_norm.weight", _ones(n))
    writer.add_tensor("output.weight", _output_matrix(rng, vocab, n))
    if is_gemma4:
        # Frequency factors of the full-attention layers' proportional RoPE.
        writer.add_tensor("rope_freqs.weight", _ones(head_dim // 2))
    for layer in range(TEXT_LAYERS):
        prefix = f"blk.{layer}."
        writer.add_tensor(prefix + "attn_norm.weight", _ones(n))
        writer.add_tensor(prefix + "attn_q.weight", _matrix(rng, n, n))
        writer.add_tensor(prefix + "attn_k.weight", _matrix(rng, kv_dim, n))
        writer.add_tensor(prefix + "attn_v.weight", _matrix(rng, kv_dim, n))
        if spec.qkv_bias:
            writer.add_tensor(prefix + "attn_q.bias", _bias(rng, n))
            writer.add_tensor(prefix + "attn_k.bias", _bias(rng, kv_dim))
            writer.add_tensor(prefix + "attn_v.bias", _bias(rng, kv_dim))
        if spec.qk_norm:
            writer.add_tensor(prefix + "attn_q_norm.weight", _ones(head_dim))
            writer.add_tensor(prefix + "attn_k_norm.weight", _ones(head_dim))
        writer.add_tensor(prefix + "attn_output.weight", _matrix(rng, n, n))
        if spec.post_norms:
            writer.add_tensor(prefix + "post_attention_norm.weight", _ones(n))
        writer.add_tensor(prefix + "ffn_norm.weight", _ones(n))
        writer.add_tensor(prefix + "ffn_gate.weight", _matrix(rng, spec.n_ff, n))
        writer.add_tensor(prefix + "ffn_up.weight", _matrix(rng, spec.n_ff, n))
        writer.add_tensor(prefix + "ffn_down.weight", _matrix(rng, n, spec.n_ff))
        if spec.post_norms:
            writer.add_tensor(prefix + "post_ffw_norm.weight", _ones(n))


def _pos_embd(rng: np.random.Generator, n: int, width: int = VISION_EMBD) -> np.ndarray:
    """F32 learned position embeddings: clip.cpp adds (or interpolates) them in F32, and ggml aborts on F16 there."""
    return rng.standard_normal((n, width), dtype=np.float32) * WEIGHT_STD


def _vision_header(writer: gguf.GGUFWriter, name: str, projector: str, image_size: int, patch: int,
                   projection_dim: int, mean: list[float], std: list[float], silu: bool = False) -> None:
    """The ``clip.*`` keys every vision projector file carries (FFN activation GELU, or SiLU)."""
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", projector)
    writer.add_bool("clip.use_silu" if silu else "clip.use_gelu", True)
    writer.add_uint32("clip.vision.image_size", image_size)
    writer.add_uint32("clip.vision.patch_size", patch)
    writer.add_uint32("clip.vision.embedding_length", VISION_EMBD)
    writer.add_uint32("clip.vision.feed_forward_length", VISION_FF)
    writer.add_uint32("clip.vision.projection_dim", projection_dim)
    writer.add_uint32("clip.vision.attention.head_count", VISION_HEADS)
    writer.add_uint32("clip.vision.block_count", VISION_LAYERS)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_array("clip.vision.image_mean", mean)
    writer.add_array("clip.vision.image_std", std)


def _vision_block(writer: gguf.GGUFWriter, rng: np.random.Generator, block: int, fused_qkv: bool = False,
                  layer_scale: bool = False, rms_norm: bool = False, gated: bool = False, gemma4: bool = False) -> None:
    """One pre-norm ViT block: ``v.blk.N.*``.

    Options: fused ``attn_qkv`` (Qwen3-VL), ``ls1``/``ls2`` layer scale
    (InternViT), RMS norms without bias and a gated FFN (Qwen2.5-VL), and
    Gemma 4's per-head QK norms and post-attention / post-FFN norms.
    """
    if gemma4:
        _gemma4_vision_block(writer, rng, block)
        return
    prefix = f"v.blk.{block}."
    writer.add_tensor(prefix + "ln1.weight", _ones(VISION_EMBD))
    if not rms_norm:
        writer.add_tensor(prefix + "ln1.bias", _zeros(VISION_EMBD))
    if fused_qkv:
        writer.add_tensor(prefix + "attn_qkv.weight", _matrix(rng, 3 * VISION_EMBD, VISION_EMBD))
        writer.add_tensor(prefix + "attn_qkv.bias", _bias(rng, 3 * VISION_EMBD))
        names = ("attn_out",)
    else:
        names = ("attn_q", "attn_k", "attn_v", "attn_out")
    for name in names:
        writer.add_tensor(prefix + name + ".weight", _matrix(rng, VISION_EMBD, VISION_EMBD))
        writer.add_tensor(prefix + name + ".bias", _bias(rng, VISION_EMBD))
    writer.add_tensor(prefix + "ln2.weight", _ones(VISION_EMBD))
    if not rms_norm:
        writer.add_tensor(prefix + "ln2.bias", _zeros(VISION_EMBD))
    if gated:
        writer.add_tensor(prefix + "ffn_gate.weight", _matrix(rng, VISION_FF, VISION_EMBD))
        writer.add_tensor(prefix + "ffn_gate.bias", _bias(rng, VISION_FF))
    writer.add_tensor(prefix + "ffn_up.weight", _matrix(rng, VISION_FF, VISION_EMBD))
    writer.add_tensor(prefix + "ffn_up.bias", _bias(rng, VISION_FF))
    writer.add_tensor(prefix + "ffn_down.weight", _matrix(rng, VISION_EMBD, VISION_FF))
    writer.add_tensor(prefix + "ffn_down.bias", _bias(rng, VISION_EMBD))
    if layer_scale:
        writer.add_tensor(prefix + "ls1.weight", np.full(VISION_EMBD, 0.5, dtype=np.float32))
        writer.add_tensor(prefix + "ls2.weight", np.full(VISION_EMBD, 0.5, dtype=np.float32))


def _gemma4_vision_block(writer: gguf.GGUFWriter, rng: np.random.Generator, block: int) -> None:
    """A Gemma 4 ViT block: RMS norms, no biases, per-head QK norms, post-norms, gated FFN."""
    prefix = f"v.blk.{block}."
    head_dim = VISION_EMBD // VISION_HEADS
    writer.add_tensor(prefix + "ln1.weight", _ones(VISION_EMBD))
    for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
        writer.add_tensor(prefix + name + ".weight", _matrix(rng, VISION_EMBD, VISION_EMBD))
    writer.add_tensor(prefix + "attn_q_norm.weight", _ones(head_dim))
    writer.add_tensor(prefix + "attn_k_norm.weight", _ones(head_dim))
    writer.add_tensor(prefix + "attn_post_norm.weight", _ones(VISION_EMBD))
    writer.add_tensor(prefix + "ln2.weight", _ones(VISION_EMBD))
    writer.add_tensor(prefix + "ffn_gate.weight", _matrix(rng, VISION_FF, VISION_EMBD))
    writer.add_tensor(prefix + "ffn_up.weight", _matrix(rng, VISION_FF, VISION_EMBD))
    writer.add_tensor(prefix + "ffn_down.weight", _matrix(rng, VISION_EMBD, VISION_FF))
    writer.add_tensor(prefix + "ffn_post_norm.weight", _ones(VISION_EMBD))


def _write_gemma4_mmproj(writer: gguf.GGUFWriter, name: str, rng: np.random.Generator) -> None:
    """Gemma 4's vision tower and embedder: ``gemma4v`` (x/y position tables, 2-D RoPE, 3x3 pooling)."""
    patch = GEMMA4_PATCH_SIZE
    _vision_header(writer, name, "gemma4v", GEMMA4_IMAGE_SIZE, patch, TEXT_EMBD, HALF, HALF)
    writer.add_tensor("v.patch_embd.weight", _matrix(rng, VISION_EMBD, 3, patch, patch))
    # Two lookup tables, x then y: numpy (2, rows, n_embd).
    writer.add_tensor("v.position_embd.weight", _matrix(rng, 2, GEMMA4_POS_TABLE, VISION_EMBD))
    for block in range(VISION_LAYERS):
        _vision_block(writer, rng, block, gemma4=True)
    writer.add_tensor("mm.input_projection.weight", _matrix(rng, TEXT_EMBD, VISION_EMBD))


def _write_qwen3vl_mmproj(writer: gguf.GGUFWriter, name: str, rng: np.random.Generator) -> None:
    """Qwen3-VL's vision tower: ``qwen3vl_merger`` with a patch bias, resized position embeddings and deepstack."""
    patch, text = QWEN3VL_PATCH_SIZE, TEXT_EMBD
    merged = VISION_EMBD * QWEN2VL_MERGE * QWEN2VL_MERGE
    _vision_header(writer, name, "qwen3vl_merger", QWEN3VL_IMAGE_SIZE, patch, text, HALF, HALF)
    writer.add_uint32("clip.vision.spatial_merge_size", QWEN2VL_MERGE)
    # The 3-D patch convolution over two frames, one 2-D kernel per frame.
    writer.add_tensor("v.patch_embd.weight", _matrix(rng, VISION_EMBD, 3, patch, patch))
    writer.add_tensor("v.patch_embd.weight.1", _matrix(rng, VISION_EMBD, 3, patch, patch))
    writer.add_tensor("v.patch_embd.bias", _bias(rng, VISION_EMBD))
    writer.add_tensor("v.position_embd.weight", _pos_embd(rng, QWEN3VL_POS_GRID * QWEN3VL_POS_GRID))
    for block in range(VISION_LAYERS):
        _vision_block(writer, rng, block, fused_qkv=True)
        if block in QWEN3VL_DEEPSTACK_LAYERS:
            # Deepstack merger: this block's output, 2x2-merged, projected to
            # the text width; the text model adds it after its layer i.
            prefix = f"v.deepstack.{block}."
            writer.add_tensor(prefix + "norm.weight", _ones(merged))
            writer.add_tensor(prefix + "norm.bias", _zeros(merged))
            writer.add_tensor(prefix + "fc1.weight", _matrix(rng, merged, merged))
            writer.add_tensor(prefix + "fc1.bias", _bias(rng, merged))
            writer.add_tensor(prefix + "fc2.weight", _matrix(rng, text, merged))
            writer.add_tensor(prefix + "fc2.bias", _bias(rng, text))
    # The merger's norm (before the 2x2 merge) and MLP.
    writer.add_tensor("v.post_ln.weight", _ones(VISION_EMBD))
    writer.add_tensor("v.post_ln.bias", _zeros(VISION_EMBD))
    writer.add_tensor("mm.0.weight", _matrix(rng, merged, merged))
    writer.add_tensor("mm.0.bias", _bias(rng, merged))
    writer.add_tensor("mm.2.weight", _matrix(rng, text, merged))
    writer.add_tensor("mm.2.bias", _bias(rng, text))


def _write_gemma3_mmproj(writer: gguf.GGUFWriter, name: str, rng: np.random.Generator) -> None:
    """Gemma 3's SigLIP tower and projector: ``gemma3`` (average pooling, soft-embedding norm, input projection)."""
    patch = GEMMA3_PATCH_SIZE
    _vision_header(writer, name, "gemma3", GEMMA3_IMAGE_SIZE, patch, TEXT_EMBD, HALF, HALF)
    writer.add_tensor("v.patch_embd.weight", _matrix(rng, VISION_EMBD, 3, patch, patch))
    writer.add_tensor("v.patch_embd.bias", _bias(rng, VISION_EMBD))
    writer.add_tensor("v.position_embd.weight", _pos_embd(rng, (GEMMA3_IMAGE_SIZE // patch) ** 2))
    for block in range(VISION_LAYERS):
        _vision_block(writer, rng, block)
    writer.add_tensor("v.post_ln.weight", _ones(VISION_EMBD))
    writer.add_tensor("v.post_ln.bias", _zeros(VISION_EMBD))
    writer.add_tensor("mm.soft_emb_norm.weight", _ones(VISION_EMBD))
    # Stored (vision, text) in numpy order: clip.cpp transposes it before use.
    writer.add_tensor("mm.input_projection.weight", _matrix(rng, VISION_EMBD, TEXT_EMBD))


def _write_internvl_mmproj(writer: gguf.GGUFWriter, name: str, rng: np.random.Generator) -> None:
    """InternViT plus InternVL's MLP projector: ``internvl`` (class token, layer scale, pixel shuffle, tiling)."""
    patch, text = INTERNVL_PATCH_SIZE, TEXT_EMBD
    shuffled = VISION_EMBD * INTERNVL_SCALE_FACTOR * INTERNVL_SCALE_FACTOR
    _vision_header(writer, name, "internvl", INTERNVL_IMAGE_SIZE, patch, text, IMAGENET_MEAN, IMAGENET_STD)
    writer.add_uint32("clip.vision.projector.scale_factor", INTERNVL_SCALE_FACTOR)
    writer.add_uint32("clip.vision.preproc_min_tiles", 1)
    writer.add_uint32("clip.vision.preproc_max_tiles", INTERNVL_MAX_TILES)
    writer.add_tensor("v.patch_embd.weight", _matrix(rng, VISION_EMBD, 3, patch, patch))
    writer.add_tensor("v.patch_embd.bias", _bias(rng, VISION_EMBD))
    writer.add_tensor("v.class_embd", rng.standard_normal(VISION_EMBD, dtype=np.float32) * WEIGHT_STD)
    writer.add_tensor("v.position_embd.weight", _pos_embd(rng, (INTERNVL_IMAGE_SIZE // patch) ** 2 + 1))
    for block in range(VISION_LAYERS):
        _vision_block(writer, rng, block, layer_scale=True)
    # mlp1: LayerNorm over the shuffled features, Linear, GELU, Linear.
    writer.add_tensor("mm.model.mlp.0.weight", _ones(shuffled))
    writer.add_tensor("mm.model.mlp.0.bias", _zeros(shuffled))
    writer.add_tensor("mm.model.mlp.1.weight", _matrix(rng, text, shuffled))
    writer.add_tensor("mm.model.mlp.1.bias", _bias(rng, text))
    writer.add_tensor("mm.model.mlp.3.weight", _matrix(rng, text, text))
    writer.add_tensor("mm.model.mlp.3.bias", _bias(rng, text))


def _write_minicpmv_mmproj(writer: gguf.GGUFWriter, name: str, rng: np.random.Generator) -> None:
    """MiniCPM-V 2.6's SigLIP tower and perceiver resampler: ``resampler`` (``clip.minicpmv_version`` 3)."""
    patch, text = MINICPMV_PATCH_SIZE, MINICPMV_TEXT_EMBD
    _vision_header(writer, name, "resampler", MINICPMV_IMAGE_SIZE, patch, text, HALF, HALF)
    writer.add_int32("clip.minicpmv_version", MINICPMV_VERSION)
    writer.add_uint32("clip.minicpmv_query_num", MINICPMV_QUERIES)
    writer.add_tensor("v.patch_embd.weight", _matrix(rng, VISION_EMBD, 3, patch, patch))
    writer.add_tensor("v.patch_embd.bias", _bias(rng, VISION_EMBD))
    # Looked up by row (70x70 buckets), so F16 is fine here and halves the file.
    writer.add_tensor("v.position_embd.weight", _matrix(rng, MINICPMV_POS_BUCKETS ** 2, VISION_EMBD))
    for block in range(VISION_LAYERS):
        _vision_block(writer, rng, block)
    writer.add_tensor("v.post_ln.weight", _ones(VISION_EMBD))
    writer.add_tensor("v.post_ln.bias", _zeros(VISION_EMBD))
    # The resampler: learned queries cross-attend to the projected patches
    # (keys get a 2-D sin/cos position code computed by clip.cpp).
    writer.add_tensor("resampler.query", rng.standard_normal((MINICPMV_QUERIES, text), dtype=np.float32) * WEIGHT_STD)
    writer.add_tensor("resampler.kv.weight", _matrix(rng, text, VISION_EMBD))
    for part in ("q", "k", "v", "out"):
        writer.add_tensor(f"resampler.attn.{part}.weight", _matrix(rng, text, text))
        writer.add_tensor(f"resampler.attn.{part}.bias", _bias(rng, text))
    for part in ("q", "kv", "post"):
        writer.add_tensor(f"resampler.ln_{part}.weight", _ones(text))
        writer.add_tensor(f"resampler.ln_{part}.bias", _zeros(text))
    writer.add_tensor("resampler.proj.weight", _matrix(rng, text, text))
    # Required by clip.cpp's loader but unused by its graph (the key position
    # code is computed on the fly): one row instead of the converter's 4900.
    writer.add_tensor("resampler.pos_embed_k", _zeros(text).reshape(1, text))


# LLaVA-1.6: resolutions a page is tiled at (multiples of the 32-pixel tile
# in the real list's shapes: 1x1, 1x2, 2x1, 2x2, 1x3, 3x1).
LLAVANEXT_PINPOINTS = [32, 32, 32, 64, 64, 32, 64, 64, 32, 96, 96, 32]


def _write_llavanext_mmproj(writer: gguf.GGUFWriter, name: str, rng: np.random.Generator) -> None:
    """LLaVA-1.6's CLIP tower and MLP: ``mlp`` with grid pinpoints (llava-uhd tiling) and an image newline."""
    patch, text = LLAVA_PATCH_SIZE, TEXT_EMBD
    _vision_header(writer, name, "mlp", LLAVA_IMAGE_SIZE, patch, text, IMAGE_MEAN, IMAGE_STD)
    writer.add_array("clip.vision.image_grid_pinpoints", LLAVANEXT_PINPOINTS)
    writer.add_string("clip.vision.mm_patch_merge_type", "spatial_unpad")
    writer.add_tensor("v.patch_embd.weight", _matrix(rng, VISION_EMBD, 3, patch, patch))
    writer.add_tensor("v.class_embd", rng.standard_normal(VISION_EMBD, dtype=np.float32) * WEIGHT_STD)
    writer.add_tensor("v.position_embd.weight", _pos_embd(rng, (LLAVA_IMAGE_SIZE // patch) ** 2 + 1))
    writer.add_tensor("v.pre_ln.weight", _ones(VISION_EMBD))
    writer.add_tensor("v.pre_ln.bias", _zeros(VISION_EMBD))
    for block in range(VISION_LAYERS):
        _vision_block(writer, rng, block)
    writer.add_tensor("mm.0.weight", _matrix(rng, text, VISION_EMBD))
    writer.add_tensor("mm.0.bias", _bias(rng, text))
    writer.add_tensor("mm.2.weight", _matrix(rng, text, text))
    writer.add_tensor("mm.2.bias", _bias(rng, text))
    writer.add_tensor("v.image_newline", rng.standard_normal(text, dtype=np.float32) * WEIGHT_STD)


def _write_qwen25vl_mmproj(writer: gguf.GGUFWriter, name: str, rng: np.random.Generator) -> None:
    """Qwen2.5-VL's vision tower: ``qwen2.5vl_merger`` (RMS norms, SiLU-gated FFN, window attention)."""
    patch, text = QWEN2VL_PATCH_SIZE, TEXT_EMBD
    merged = VISION_EMBD * QWEN2VL_MERGE * QWEN2VL_MERGE
    _vision_header(writer, name, "qwen2.5vl_merger", QWEN2VL_IMAGE_SIZE, patch, text, IMAGE_MEAN, IMAGE_STD, silu=True)
    writer.add_uint32("clip.vision.spatial_merge_size", QWEN2VL_MERGE)
    writer.add_uint32("clip.vision.n_wa_pattern", QWEN25VL_WA_PATTERN)
    writer.add_tensor("v.patch_embd.weight", _matrix(rng, VISION_EMBD, 3, patch, patch))
    writer.add_tensor("v.patch_embd.weight.1", _matrix(rng, VISION_EMBD, 3, patch, patch))
    for block in range(VISION_LAYERS):
        _vision_block(writer, rng, block, rms_norm=True, gated=True)
    writer.add_tensor("v.post_ln.weight", _ones(VISION_EMBD))  # the merger's RMS norm (ln_q)
    writer.add_tensor("mm.0.weight", _matrix(rng, merged, merged))
    writer.add_tensor("mm.0.bias", _bias(rng, merged))
    writer.add_tensor("mm.2.weight", _matrix(rng, text, merged))
    writer.add_tensor("mm.2.bias", _bias(rng, text))


def _write_pixtral_mmproj(writer: gguf.GGUFWriter, name: str, rng: np.random.Generator) -> None:
    """Pixtral's ViT with Mistral Small 3.1's patch merger: ``pixtral`` (RMS norms, 2-D RoPE, gated SiLU FFN)."""
    patch, text = PIXTRAL_PATCH_SIZE, TEXT_EMBD
    merged = VISION_EMBD * PIXTRAL_MERGE * PIXTRAL_MERGE
    _vision_header(writer, name, "pixtral", PIXTRAL_IMAGE_SIZE, patch, text, IMAGE_MEAN, IMAGE_STD, silu=True)
    writer.add_uint32("clip.vision.spatial_merge_size", PIXTRAL_MERGE)
    writer.add_tensor("v.patch_embd.weight", _matrix(rng, VISION_EMBD, 3, patch, patch))
    writer.add_tensor("v.pre_ln.weight", _ones(VISION_EMBD))  # ln_pre (RMS)
    for block in range(VISION_LAYERS):
        _vision_block(writer, rng, block, rms_norm=True, gated=True)
    writer.add_tensor("mm.input_norm.weight", _ones(VISION_EMBD))
    writer.add_tensor("mm.patch_merger.weight", _matrix(rng, VISION_EMBD, merged))
    writer.add_tensor("mm.1.weight", _matrix(rng, text, VISION_EMBD))
    writer.add_tensor("mm.1.bias", _bias(rng, text))
    writer.add_tensor("mm.2.weight", _matrix(rng, text, text))
    writer.add_tensor("mm.2.bias", _bias(rng, text))
    # The embedding of [IMG_BREAK], appended by the projector to each row.
    writer.add_tensor("v.token_embd.img_break", rng.standard_normal(text, dtype=np.float32) * WEIGHT_STD)


def _write_idefics3_mmproj(writer: gguf.GGUFWriter, name: str, rng: np.random.Generator) -> None:
    """SmolVLM / Idefics3's SigLIP tower and connector: ``idefics3`` (pixel shuffle, one linear projection)."""
    patch, text = IDEFICS3_PATCH_SIZE, TEXT_EMBD
    shuffled = VISION_EMBD * IDEFICS3_SCALE_FACTOR * IDEFICS3_SCALE_FACTOR
    _vision_header(writer, name, "idefics3", IDEFICS3_IMAGE_SIZE, patch, text, HALF, HALF)
    writer.add_uint32("clip.vision.projector.scale_factor", IDEFICS3_SCALE_FACTOR)
    writer.add_uint32("clip.vision.preproc_image_size", IDEFICS3_LONGEST_EDGE)
    writer.add_tensor("v.patch_embd.weight", _matrix(rng, VISION_EMBD, 3, patch, patch))
    writer.add_tensor("v.patch_embd.bias", _bias(rng, VISION_EMBD))
    writer.add_tensor("v.position_embd.weight", _pos_embd(rng, (IDEFICS3_IMAGE_SIZE // patch) ** 2))
    for block in range(VISION_LAYERS):
        _vision_block(writer, rng, block)
    writer.add_tensor("v.post_ln.weight", _ones(VISION_EMBD))
    writer.add_tensor("v.post_ln.bias", _zeros(VISION_EMBD))
    writer.add_tensor("mm.model.fc.weight", _matrix(rng, text, shuffled))


_MMPROJ_WRITERS: dict[str, Callable[[gguf.GGUFWriter, str, np.random.Generator], None]] = {
    "qwen25vl": _write_qwen25vl_mmproj,
    "idefics3": _write_idefics3_mmproj,
    "pixtral": _write_pixtral_mmproj,
    "qwen3vl": _write_qwen3vl_mmproj,
    "gemma3": _write_gemma3_mmproj,
    "gemma4": _write_gemma4_mmproj,
    "internvl": _write_internvl_mmproj,
    "minicpmv": _write_minicpmv_mmproj,
}

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
                    lambda w: _write_text_model(w, text_family, text_rng, stem, template, reasoning))
        if family == "qwen25vl":
            _write_gguf(model.mmproj_path, "clip", lambda w: _write_qwen25vl_mmproj(w, mmproj_name, vision_rng))
        elif family == "llavanext":
            _write_gguf(model.mmproj_path, "clip", lambda w: _write_llavanext_mmproj(w, mmproj_name, vision_rng))
        else:
            _write_gguf(model.mmproj_path, "clip", lambda w: _write_mmproj(w, family, vision_rng))
        return model
    spec = _TEXT_SPECS[family]
    template = chat_template
    if template is None:
        template = thinking_template(spec.template) if reasoning else spec.template
    _write_gguf(model.model_path, spec.arch, lambda w: _write_decoder(w, spec, text_rng, stem, template, reasoning))
    _write_gguf(model.mmproj_path, "clip", lambda w: _MMPROJ_WRITERS[family](w, mmproj_name, vision_rng))
    return model
