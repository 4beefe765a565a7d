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
`text_decoder.output_matrix`). Each file is a few hundred kilobytes and a chat completion
on an image takes well under a second on a CPU.
"""

from medvlm_core.testing.tiny_model.families import FAMILIES, REASONING_FAMILIES, TinyModel, make_tiny_model
from medvlm_core.testing.tiny_model.templates import thinking_template

__all__ = ["FAMILIES", "REASONING_FAMILIES", "TinyModel", "make_tiny_model", "thinking_template"]
