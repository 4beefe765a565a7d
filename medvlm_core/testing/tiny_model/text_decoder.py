"""Text decoder files: the hyperparameters, tokenizer and weights of each family's text model.

The two original families (llava, qwen2vl) keep their own writer (``write_text_model``) so that their files stay
byte-identical for a given seed; every later family is described by a ``TextSpec`` and written by
``write_decoder``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gguf
import numpy as np

from medvlm_core.testing.tiny_model.sizes import (
    GEMMA3_SLIDING_WINDOW,
    GEMMA4_SLIDING_WINDOW,
    MINICPMV_TEXT_EMBD,
    MINICPMV_TEXT_FF,
    QWEN2VL_ROPE_SECTIONS,
    QWEN3VL_DEEPSTACK_LAYERS,
    QWEN3VL_ROPE_SECTIONS,
    TEXT_CONTEXT,
    TEXT_EMBD,
    TEXT_FF,
    TEXT_HEADS,
    TEXT_KV_HEADS,
    TEXT_LAYERS,
)
from medvlm_core.testing.tiny_model.templates import (
    CHATML_TEMPLATE,
    GEMMA3_TEMPLATE,
    GEMMA4_TEMPLATE,
    INTERNVL_TEMPLATE,
    MISTRAL3_TEMPLATE,
    QWEN2VL_TEMPLATE,
    QWEN3VL_TEMPLATE,
    SMOLVLM_TEMPLATE,
)
from medvlm_core.testing.tiny_model.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    GEMMA3_SPECIAL_TOKENS,
    GEMMA4_SPECIAL_TOKENS,
    IDEFICS3_SPECIAL_TOKENS,
    MISTRAL3_SPECIAL_TOKENS,
    SPECIAL_TOKENS,
    Vocab,
    add_tokenizer,
    build_vocab,
)
from medvlm_core.testing.tiny_model.weights import bias, matrix, ones


def output_matrix(rng: np.random.Generator, vocab: Vocab, n_embd: int = TEXT_EMBD) -> np.ndarray:
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
    weights = matrix(rng, len(vocab.tokens), n_embd)
    weights[~np.array(vocab.generatable)] = 0
    return weights


def write_text_model(writer: gguf.GGUFWriter, family: str, rng: np.random.Generator, name: str | None = None,
                     template: str | None = None, reasoning: bool = False) -> None:
    """Hyperparameters, tokenizer and weights of the llava and qwen2vl text decoders."""
    is_qwen = family == "qwen2vl"
    vocab = build_vocab(reasoning=reasoning)
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
    add_tokenizer(writer, vocab, template if template is not None else (QWEN2VL_TEMPLATE if is_qwen else CHATML_TEMPLATE))

    writer.add_tensor("token_embd.weight", matrix(rng, len(vocab.tokens), TEXT_EMBD))
    writer.add_tensor("output_norm.weight", ones(TEXT_EMBD))
    writer.add_tensor("output.weight", output_matrix(rng, vocab))
    for layer in range(TEXT_LAYERS):
        prefix = f"blk.{layer}."
        writer.add_tensor(prefix + "attn_norm.weight", ones(TEXT_EMBD))
        writer.add_tensor(prefix + "attn_q.weight", matrix(rng, TEXT_EMBD, TEXT_EMBD))
        writer.add_tensor(prefix + "attn_k.weight", matrix(rng, kv_dim, TEXT_EMBD))
        writer.add_tensor(prefix + "attn_v.weight", matrix(rng, kv_dim, TEXT_EMBD))
        if is_qwen:
            writer.add_tensor(prefix + "attn_q.bias", bias(rng, TEXT_EMBD))
            writer.add_tensor(prefix + "attn_k.bias", bias(rng, kv_dim))
            writer.add_tensor(prefix + "attn_v.bias", bias(rng, kv_dim))
        writer.add_tensor(prefix + "attn_output.weight", matrix(rng, TEXT_EMBD, TEXT_EMBD))
        writer.add_tensor(prefix + "ffn_norm.weight", ones(TEXT_EMBD))
        writer.add_tensor(prefix + "ffn_gate.weight", matrix(rng, TEXT_FF, TEXT_EMBD))
        writer.add_tensor(prefix + "ffn_up.weight", matrix(rng, TEXT_FF, TEXT_EMBD))
        writer.add_tensor(prefix + "ffn_down.weight", matrix(rng, TEXT_EMBD, TEXT_FF))


@dataclass(frozen=True)
class TextSpec:
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


TEXT_SPECS = {
    "qwen3vl": TextSpec(
        arch="qwen3vl", template=QWEN3VL_TEMPLATE, qk_norm=True, rope_base=5_000_000.0,
        rope_sections=QWEN3VL_ROPE_SECTIONS, n_deepstack=len(QWEN3VL_DEEPSTACK_LAYERS),
    ),
    "gemma3": TextSpec(
        arch="gemma3", template=GEMMA3_TEMPLATE, qk_norm=True, post_norms=True,
        sliding_window=GEMMA3_SLIDING_WINDOW, specials=GEMMA3_SPECIAL_TOKENS,
        bos="<bos>", eos="<end_of_turn>", add_bos=True,
    ),
    "gemma4": TextSpec(
        arch="gemma4", template=GEMMA4_TEMPLATE, qk_norm=True, post_norms=True,
        sliding_window=GEMMA4_SLIDING_WINDOW, specials=GEMMA4_SPECIAL_TOKENS,
        bos="<bos>", eos="<turn|>", add_bos=True,
    ),
    "internvl": TextSpec(
        arch="qwen2", template=INTERNVL_TEMPLATE, qkv_bias=True,
        specials=SPECIAL_TOKENS + ["<img>", "</img>", "<IMG_CONTEXT>"],
    ),
    "minicpmv": TextSpec(
        arch="qwen2", template=CHATML_TEMPLATE, n_embd=MINICPMV_TEXT_EMBD, n_ff=MINICPMV_TEXT_FF, qkv_bias=True,
        specials=SPECIAL_TOKENS + ["<image>", "</image>", "<slice>", "</slice>", "<unk>"],
    ),
    "pixtral": TextSpec(
        arch="llama", template=MISTRAL3_TEMPLATE, rope_base=1_000_000_000.0, specials=MISTRAL3_SPECIAL_TOKENS,
        bos="<s>", eos="</s>", add_bos=True,
    ),
    # libmtmd looks "\n\n" up as one token (it opens the global image).
    "idefics3": TextSpec(
        arch="llama", template=SMOLVLM_TEMPLATE, rope_base=100_000.0, specials=IDEFICS3_SPECIAL_TOKENS,
        bos="<|im_start|>", eos="<end_of_utterance>", extra_merges=(("Ċ", "Ċ"),),
    ),
}


def write_decoder(writer: gguf.GGUFWriter, spec: TextSpec, rng: np.random.Generator, name: str,
                  template: str, reasoning: bool) -> None:
    """Hyperparameters, tokenizer and weights of a new family's text decoder."""
    vocab = build_vocab(spec.specials, reasoning, spec.extra_merges)
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
    add_tokenizer(writer, vocab, template, bos=spec.bos, eos=spec.eos, add_bos=spec.add_bos, pad=pad)

    n = spec.n_embd
    writer.add_tensor("token_embd.weight", matrix(rng, len(vocab.tokens), n))
    writer.add_tensor("output_norm.weight", ones(n))
    writer.add_tensor("output.weight", output_matrix(rng, vocab, n))
    if is_gemma4:
        # Frequency factors of the full-attention layers' proportional RoPE.
        writer.add_tensor("rope_freqs.weight", ones(head_dim // 2))
    for layer in range(TEXT_LAYERS):
        prefix = f"blk.{layer}."
        writer.add_tensor(prefix + "attn_norm.weight", ones(n))
        writer.add_tensor(prefix + "attn_q.weight", matrix(rng, n, n))
        writer.add_tensor(prefix + "attn_k.weight", matrix(rng, kv_dim, n))
        writer.add_tensor(prefix + "attn_v.weight", matrix(rng, kv_dim, n))
        if spec.qkv_bias:
            writer.add_tensor(prefix + "attn_q.bias", bias(rng, n))
            writer.add_tensor(prefix + "attn_k.bias", bias(rng, kv_dim))
            writer.add_tensor(prefix + "attn_v.bias", bias(rng, kv_dim))
        if spec.qk_norm:
            writer.add_tensor(prefix + "attn_q_norm.weight", ones(head_dim))
            writer.add_tensor(prefix + "attn_k_norm.weight", ones(head_dim))
        writer.add_tensor(prefix + "attn_output.weight", matrix(rng, n, n))
        if spec.post_norms:
            writer.add_tensor(prefix + "post_attention_norm.weight", ones(n))
        writer.add_tensor(prefix + "ffn_norm.weight", ones(n))
        writer.add_tensor(prefix + "ffn_gate.weight", matrix(rng, spec.n_ff, n))
        writer.add_tensor(prefix + "ffn_up.weight", matrix(rng, spec.n_ff, n))
        writer.add_tensor(prefix + "ffn_down.weight", matrix(rng, n, spec.n_ff))
        if spec.post_norms:
            writer.add_tensor(prefix + "post_ffw_norm.weight", ones(n))
