"""The byte-level BPE vocabulary every family shares, each family's control tokens, and the ``tokenizer.*``
keys of a text model file."""

from __future__ import annotations

from dataclasses import dataclass

import gguf

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

# Gemma 4's control tokens (turn markers, image markers, the thought channel).
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

# SmolVLM's control tokens, with the tile-position tokens of grids up to 4x4
# (libmtmd writes "<fake_token_around_image><row_R_col_C>" before each tile).
IDEFICS3_SPECIAL_TOKENS = (
    ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<fake_token_around_image>",
     "<global-img>", "<image>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]
)

# Mistral Small 3.1's control tokens (Pixtral / Mistral3).
MISTRAL3_SPECIAL_TOKENS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]",
]


def bytes_to_unicode() -> list[str]:
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
class Vocab:
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


def build_vocab(specials: list[str] = SPECIAL_TOKENS, reasoning: bool = False,
                extra_merges: tuple[tuple[str, str], ...] = ()) -> Vocab:
    """A byte-level BPE vocabulary (the same for every family but its control tokens).

    Ids 0-255 are the 256 byte tokens (id == byte value), then the merged
    tokens, then the control tokens, then (for a reasoning model) ``<think>``
    and ``</think>`` as user-defined tokens, as in Qwen3's vocabulary.
    """
    byte_chars = bytes_to_unicode()
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
    return Vocab(tokens, token_types, merges, generatable)


def add_tokenizer(writer: gguf.GGUFWriter, vocab: Vocab, chat_template: str, bos: str = BOS_TOKEN,
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
