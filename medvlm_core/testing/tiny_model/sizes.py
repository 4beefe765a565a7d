"""The tiny models' dimensions: text decoder, vision encoders, each family's image and patch sizes, and the
image normalisation constants written into the projector files."""

from __future__ import annotations

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

# OpenAI CLIP normalisation constants, as written by llama.cpp's converters.
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

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

# LLaVA-1.6: resolutions a page is tiled at (multiples of the 32-pixel tile
# in the real list's shapes: 1x1, 1x2, 2x1, 2x2, 1x3, 3x1).
LLAVANEXT_PINPOINTS = [32, 32, 32, 64, 64, 32, 64, 64, 32, 96, 96, 32]
