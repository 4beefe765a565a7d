"""Vision projector ("mmproj") files: each family's vision encoder and projector, as llama.cpp's converters
lay them out (tensor names, ``clip.*`` keys, projector type).

The two original families (llava, qwen2vl) keep their own writer (``write_mmproj``) so that their files stay
byte-identical for a given seed; every later family has a ``write_<family>_mmproj`` built on the shared header
and block helpers.
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np

from medvlm_core.testing.tiny_model.sizes import (
    GEMMA3_IMAGE_SIZE,
    GEMMA3_PATCH_SIZE,
    GEMMA4_IMAGE_SIZE,
    GEMMA4_PATCH_SIZE,
    GEMMA4_POS_TABLE,
    HALF,
    IDEFICS3_IMAGE_SIZE,
    IDEFICS3_LONGEST_EDGE,
    IDEFICS3_PATCH_SIZE,
    IDEFICS3_SCALE_FACTOR,
    IMAGE_MEAN,
    IMAGE_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERNVL_IMAGE_SIZE,
    INTERNVL_MAX_TILES,
    INTERNVL_PATCH_SIZE,
    INTERNVL_SCALE_FACTOR,
    LLAVA_IMAGE_SIZE,
    LLAVA_PATCH_SIZE,
    LLAVANEXT_PINPOINTS,
    MINICPMV_IMAGE_SIZE,
    MINICPMV_PATCH_SIZE,
    MINICPMV_POS_BUCKETS,
    MINICPMV_QUERIES,
    MINICPMV_TEXT_EMBD,
    MINICPMV_VERSION,
    PIXTRAL_IMAGE_SIZE,
    PIXTRAL_MERGE,
    PIXTRAL_PATCH_SIZE,
    QWEN2VL_IMAGE_SIZE,
    QWEN2VL_MERGE,
    QWEN2VL_PATCH_SIZE,
    QWEN3VL_DEEPSTACK_LAYERS,
    QWEN3VL_IMAGE_SIZE,
    QWEN3VL_PATCH_SIZE,
    QWEN3VL_POS_GRID,
    QWEN25VL_WA_PATTERN,
    TEXT_EMBD,
    VISION_EMBD,
    VISION_FF,
    VISION_HEADS,
    VISION_LAYERS,
)
from medvlm_core.testing.tiny_model.weights import WEIGHT_STD, bias, matrix, ones, pos_embd, zeros


def write_mmproj(writer: gguf.GGUFWriter, family: str, rng: np.random.Generator) -> None:
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

    writer.add_tensor("v.patch_embd.weight", matrix(rng, VISION_EMBD, 3, patch, patch))
    if is_qwen:
        # Qwen2-VL's patch embedding is a 3-D convolution over two video
        # frames; llama.cpp stores it as one 2-D kernel per frame.
        writer.add_tensor("v.patch_embd.weight.1", matrix(rng, VISION_EMBD, 3, patch, patch))
    else:
        n_patches = (image_size // patch) ** 2
        # F32 like the real converters: it is concatenated to the F32
        # patch embeddings.
        writer.add_tensor("v.class_embd", rng.standard_normal(VISION_EMBD, dtype=np.float32) * WEIGHT_STD)
        writer.add_tensor("v.position_embd.weight", matrix(rng, n_patches + 1, VISION_EMBD))
        writer.add_tensor("v.pre_ln.weight", ones(VISION_EMBD))
        writer.add_tensor("v.pre_ln.bias", zeros(VISION_EMBD))

    for block in range(VISION_LAYERS):
        prefix = f"v.blk.{block}."
        writer.add_tensor(prefix + "ln1.weight", ones(VISION_EMBD))
        writer.add_tensor(prefix + "ln1.bias", zeros(VISION_EMBD))
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            writer.add_tensor(prefix + name + ".weight", matrix(rng, VISION_EMBD, VISION_EMBD))
            writer.add_tensor(prefix + name + ".bias", bias(rng, VISION_EMBD))
        writer.add_tensor(prefix + "ln2.weight", ones(VISION_EMBD))
        writer.add_tensor(prefix + "ln2.bias", zeros(VISION_EMBD))
        writer.add_tensor(prefix + "ffn_up.weight", matrix(rng, VISION_FF, VISION_EMBD))
        writer.add_tensor(prefix + "ffn_up.bias", bias(rng, VISION_FF))
        writer.add_tensor(prefix + "ffn_down.weight", matrix(rng, VISION_EMBD, VISION_FF))
        writer.add_tensor(prefix + "ffn_down.bias", bias(rng, VISION_EMBD))

    if is_qwen:
        # The merger concatenates each 2x2 block of patch features before
        # its MLP, hence the 4x wider input.
        merged = VISION_EMBD * QWEN2VL_MERGE * QWEN2VL_MERGE
        writer.add_tensor("v.post_ln.weight", ones(VISION_EMBD))
        writer.add_tensor("v.post_ln.bias", zeros(VISION_EMBD))
        writer.add_tensor("mm.0.weight", matrix(rng, merged, merged))
        writer.add_tensor("mm.0.bias", bias(rng, merged))
        writer.add_tensor("mm.2.weight", matrix(rng, TEXT_EMBD, merged))
        writer.add_tensor("mm.2.bias", bias(rng, TEXT_EMBD))
    else:
        hidden = TEXT_EMBD
        writer.add_tensor("mm.0.weight", matrix(rng, hidden, VISION_EMBD))
        writer.add_tensor("mm.0.bias", bias(rng, hidden))
        writer.add_tensor("mm.2.weight", matrix(rng, TEXT_EMBD, hidden))
        writer.add_tensor("mm.2.bias", bias(rng, TEXT_EMBD))


def vision_header(writer: gguf.GGUFWriter, name: str, projector: str, image_size: int, patch: int,
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


def vision_block(writer: gguf.GGUFWriter, rng: np.random.Generator, block: int, fused_qkv: bool = False,
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
    writer.add_tensor(prefix + "ln1.weight", ones(VISION_EMBD))
    if not rms_norm:
        writer.add_tensor(prefix + "ln1.bias", zeros(VISION_EMBD))
    if fused_qkv:
        writer.add_tensor(prefix + "attn_qkv.weight", matrix(rng, 3 * VISION_EMBD, VISION_EMBD))
        writer.add_tensor(prefix + "attn_qkv.bias", bias(rng, 3 * VISION_EMBD))
        names = ("attn_out",)
    else:
        names = ("attn_q", "attn_k", "attn_v", "attn_out")
    for name in names:
        writer.add_tensor(prefix + name + ".weight", matrix(rng, VISION_EMBD, VISION_EMBD))
        writer.add_tensor(prefix + name + ".bias", bias(rng, VISION_EMBD))
    writer.add_tensor(prefix + "ln2.weight", ones(VISION_EMBD))
    if not rms_norm:
        writer.add_tensor(prefix + "ln2.bias", zeros(VISION_EMBD))
    if gated:
        writer.add_tensor(prefix + "ffn_gate.weight", matrix(rng, VISION_FF, VISION_EMBD))
        writer.add_tensor(prefix + "ffn_gate.bias", bias(rng, VISION_FF))
    writer.add_tensor(prefix + "ffn_up.weight", matrix(rng, VISION_FF, VISION_EMBD))
    writer.add_tensor(prefix + "ffn_up.bias", bias(rng, VISION_FF))
    writer.add_tensor(prefix + "ffn_down.weight", matrix(rng, VISION_EMBD, VISION_FF))
    writer.add_tensor(prefix + "ffn_down.bias", bias(rng, VISION_EMBD))
    if layer_scale:
        writer.add_tensor(prefix + "ls1.weight", np.full(VISION_EMBD, 0.5, dtype=np.float32))
        writer.add_tensor(prefix + "ls2.weight", np.full(VISION_EMBD, 0.5, dtype=np.float32))


def _gemma4_vision_block(writer: gguf.GGUFWriter, rng: np.random.Generator, block: int) -> None:
    """A Gemma 4 ViT block: RMS norms, no biases, per-head QK norms, post-norms, gated FFN."""
    prefix = f"v.blk.{block}."
    head_dim = VISION_EMBD // VISION_HEADS
    writer.add_tensor(prefix + "ln1.weight", ones(VISION_EMBD))
    for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
        writer.add_tensor(prefix + name + ".weight", matrix(rng, VISION_EMBD, VISION_EMBD))
    writer.add_tensor(prefix + "attn_q_norm.weight", ones(head_dim))
    writer.add_tensor(prefix + "attn_k_norm.weight", ones(head_dim))
    writer.add_tensor(prefix + "attn_post_norm.weight", ones(VISION_EMBD))
    writer.add_tensor(prefix + "ln2.weight", ones(VISION_EMBD))
    writer.add_tensor(prefix + "ffn_gate.weight", matrix(rng, VISION_FF, VISION_EMBD))
    writer.add_tensor(prefix + "ffn_up.weight", matrix(rng, VISION_FF, VISION_EMBD))
    writer.add_tensor(prefix + "ffn_down.weight", matrix(rng, VISION_EMBD, VISION_FF))
    writer.add_tensor(prefix + "ffn_post_norm.weight", ones(VISION_EMBD))


def write_gemma4_mmproj(writer: gguf.GGUFWriter, name: str, rng: np.random.Generator) -> None:
    """Gemma 4's vision tower and embedder: ``gemma4v`` (x/y position tables, 2-D RoPE, 3x3 pooling)."""
    patch = GEMMA4_PATCH_SIZE
    vision_header(writer, name, "gemma4v", GEMMA4_IMAGE_SIZE, patch, TEXT_EMBD, HALF, HALF)
    writer.add_tensor("v.patch_embd.weight", matrix(rng, VISION_EMBD, 3, patch, patch))
    # Two lookup tables, x then y: numpy (2, rows, n_embd).
    writer.add_tensor("v.position_embd.weight", matrix(rng, 2, GEMMA4_POS_TABLE, VISION_EMBD))
    for block in range(VISION_LAYERS):
        vision_block(writer, rng, block, gemma4=True)
    writer.add_tensor("mm.input_projection.weight", matrix(rng, TEXT_EMBD, VISION_EMBD))


def write_qwen3vl_mmproj(writer: gguf.GGUFWriter, name: str, rng: np.random.Generator) -> None:
    """Qwen3-VL's vision tower: ``qwen3vl_merger`` with a patch bias, resized position embeddings and deepstack."""
    patch, text = QWEN3VL_PATCH_SIZE, TEXT_EMBD
    merged = VISION_EMBD * QWEN2VL_MERGE * QWEN2VL_MERGE
    vision_header(writer, name, "qwen3vl_merger", QWEN3VL_IMAGE_SIZE, patch, text, HALF, HALF)
    writer.add_uint32("clip.vision.spatial_merge_size", QWEN2VL_MERGE)
    # The 3-D patch convolution over two frames, one 2-D kernel per frame.
    writer.add_tensor("v.patch_embd.weight", matrix(rng, VISION_EMBD, 3, patch, patch))
    writer.add_tensor("v.patch_embd.weight.1", matrix(rng, VISION_EMBD, 3, patch, patch))
    writer.add_tensor("v.patch_embd.bias", bias(rng, VISION_EMBD))
    writer.add_tensor("v.position_embd.weight", pos_embd(rng, QWEN3VL_POS_GRID * QWEN3VL_POS_GRID))
    for block in range(VISION_LAYERS):
        vision_block(writer, rng, block, fused_qkv=True)
        if block in QWEN3VL_DEEPSTACK_LAYERS:
            # Deepstack merger: this block's output, 2x2-merged, projected to
            # the text width; the text model adds it after its layer i.
            prefix = f"v.deepstack.{block}."
            writer.add_tensor(prefix + "norm.weight", ones(merged))
            writer.add_tensor(prefix + "norm.bias", zeros(merged))
            writer.add_tensor(prefix + "fc1.weight", matrix(rng, merged, merged))
            writer.add_tensor(prefix + "fc1.bias", bias(rng, merged))
            writer.add_tensor(prefix + "fc2.weight", matrix(rng, text, merged))
            writer.add_tensor(prefix + "fc2.bias", bias(rng, text))
    # The merger's norm (before the 2x2 merge) and MLP.
    writer.add_tensor("v.post_ln.weight", ones(VISION_EMBD))
    writer.add_tensor("v.post_ln.bias", zeros(VISION_EMBD))
    writer.add_tensor("mm.0.weight", matrix(rng, merged, merged))
    writer.add_tensor("mm.0.bias", bias(rng, merged))
    writer.add_tensor("mm.2.weight", matrix(rng, text, merged))
    writer.add_tensor("mm.2.bias", bias(rng, text))


def write_gemma3_mmproj(writer: gguf.GGUFWriter, name: str, rng: np.random.Generator) -> None:
    """Gemma 3's SigLIP tower and projector: ``gemma3`` (average pooling, soft-embedding norm, input projection)."""
    patch = GEMMA3_PATCH_SIZE
    vision_header(writer, name, "gemma3", GEMMA3_IMAGE_SIZE, patch, TEXT_EMBD, HALF, HALF)
    writer.add_tensor("v.patch_embd.weight", matrix(rng, VISION_EMBD, 3, patch, patch))
    writer.add_tensor("v.patch_embd.bias", bias(rng, VISION_EMBD))
    writer.add_tensor("v.position_embd.weight", pos_embd(rng, (GEMMA3_IMAGE_SIZE // patch) ** 2))
    for block in range(VISION_LAYERS):
        vision_block(writer, rng, block)
    writer.add_tensor("v.post_ln.weight", ones(VISION_EMBD))
    writer.add_tensor("v.post_ln.bias", zeros(VISION_EMBD))
    writer.add_tensor("mm.soft_emb_norm.weight", ones(VISION_EMBD))
    # Stored (vision, text) in numpy order: clip.cpp transposes it before use.
    writer.add_tensor("mm.input_projection.weight", matrix(rng, VISION_EMBD, TEXT_EMBD))


def write_internvl_mmproj(writer: gguf.GGUFWriter, name: str, rng: np.random.Generator) -> None:
    """InternViT plus InternVL's MLP projector: ``internvl`` (class token, layer scale, pixel shuffle, tiling)."""
    patch, text = INTERNVL_PATCH_SIZE, TEXT_EMBD
    shuffled = VISION_EMBD * INTERNVL_SCALE_FACTOR * INTERNVL_SCALE_FACTOR
    vision_header(writer, name, "internvl", INTERNVL_IMAGE_SIZE, patch, text, IMAGENET_MEAN, IMAGENET_STD)
    writer.add_uint32("clip.vision.projector.scale_factor", INTERNVL_SCALE_FACTOR)
    writer.add_uint32("clip.vision.preproc_min_tiles", 1)
    writer.add_uint32("clip.vision.preproc_max_tiles", INTERNVL_MAX_TILES)
    writer.add_tensor("v.patch_embd.weight", matrix(rng, VISION_EMBD, 3, patch, patch))
    writer.add_tensor("v.patch_embd.bias", bias(rng, VISION_EMBD))
    writer.add_tensor("v.class_embd", rng.standard_normal(VISION_EMBD, dtype=np.float32) * WEIGHT_STD)
    writer.add_tensor("v.position_embd.weight", pos_embd(rng, (INTERNVL_IMAGE_SIZE // patch) ** 2 + 1))
    for block in range(VISION_LAYERS):
        vision_block(writer, rng, block, layer_scale=True)
    # mlp1: LayerNorm over the shuffled features, Linear, GELU, Linear.
    writer.add_tensor("mm.model.mlp.0.weight", ones(shuffled))
    writer.add_tensor("mm.model.mlp.0.bias", zeros(shuffled))
    writer.add_tensor("mm.model.mlp.1.weight", matrix(rng, text, shuffled))
    writer.add_tensor("mm.model.mlp.1.bias", bias(rng, text))
    writer.add_tensor("mm.model.mlp.3.weight", matrix(rng, text, text))
    writer.add_tensor("mm.model.mlp.3.bias", bias(rng, text))


def write_minicpmv_mmproj(writer: gguf.GGUFWriter, name: str, rng: np.random.Generator) -> None:
    """MiniCPM-V 2.6's SigLIP tower and perceiver resampler: ``resampler`` (``clip.minicpmv_version`` 3)."""
    patch, text = MINICPMV_PATCH_SIZE, MINICPMV_TEXT_EMBD
    vision_header(writer, name, "resampler", MINICPMV_IMAGE_SIZE, patch, text, HALF, HALF)
    writer.add_int32("clip.minicpmv_version", MINICPMV_VERSION)
    writer.add_uint32("clip.minicpmv_query_num", MINICPMV_QUERIES)
    writer.add_tensor("v.patch_embd.weight", matrix(rng, VISION_EMBD, 3, patch, patch))
    writer.add_tensor("v.patch_embd.bias", bias(rng, VISION_EMBD))
    # Looked up by row (70x70 buckets), so F16 is fine here and halves the file.
    writer.add_tensor("v.position_embd.weight", matrix(rng, MINICPMV_POS_BUCKETS ** 2, VISION_EMBD))
    for block in range(VISION_LAYERS):
        vision_block(writer, rng, block)
    writer.add_tensor("v.post_ln.weight", ones(VISION_EMBD))
    writer.add_tensor("v.post_ln.bias", zeros(VISION_EMBD))
    # The resampler: learned queries cross-attend to the projected patches
    # (keys get a 2-D sin/cos position code computed by clip.cpp).
    writer.add_tensor("resampler.query", rng.standard_normal((MINICPMV_QUERIES, text), dtype=np.float32) * WEIGHT_STD)
    writer.add_tensor("resampler.kv.weight", matrix(rng, text, VISION_EMBD))
    for part in ("q", "k", "v", "out"):
        writer.add_tensor(f"resampler.attn.{part}.weight", matrix(rng, text, text))
        writer.add_tensor(f"resampler.attn.{part}.bias", bias(rng, text))
    for part in ("q", "kv", "post"):
        writer.add_tensor(f"resampler.ln_{part}.weight", ones(text))
        writer.add_tensor(f"resampler.ln_{part}.bias", zeros(text))
    writer.add_tensor("resampler.proj.weight", matrix(rng, text, text))
    # Required by clip.cpp's loader but unused by its graph (the key position
    # code is computed on the fly): one row instead of the converter's 4900.
    writer.add_tensor("resampler.pos_embed_k", zeros(text).reshape(1, text))


def write_llavanext_mmproj(writer: gguf.GGUFWriter, name: str, rng: np.random.Generator) -> None:
    """LLaVA-1.6's CLIP tower and MLP: ``mlp`` with grid pinpoints (llava-uhd tiling) and an image newline."""
    patch, text = LLAVA_PATCH_SIZE, TEXT_EMBD
    vision_header(writer, name, "mlp", LLAVA_IMAGE_SIZE, patch, text, IMAGE_MEAN, IMAGE_STD)
    writer.add_array("clip.vision.image_grid_pinpoints", LLAVANEXT_PINPOINTS)
    writer.add_string("clip.vision.mm_patch_merge_type", "spatial_unpad")
    writer.add_tensor("v.patch_embd.weight", matrix(rng, VISION_EMBD, 3, patch, patch))
    writer.add_tensor("v.class_embd", rng.standard_normal(VISION_EMBD, dtype=np.float32) * WEIGHT_STD)
    writer.add_tensor("v.position_embd.weight", pos_embd(rng, (LLAVA_IMAGE_SIZE // patch) ** 2 + 1))
    writer.add_tensor("v.pre_ln.weight", ones(VISION_EMBD))
    writer.add_tensor("v.pre_ln.bias", zeros(VISION_EMBD))
    for block in range(VISION_LAYERS):
        vision_block(writer, rng, block)
    writer.add_tensor("mm.0.weight", matrix(rng, text, VISION_EMBD))
    writer.add_tensor("mm.0.bias", bias(rng, text))
    writer.add_tensor("mm.2.weight", matrix(rng, text, text))
    writer.add_tensor("mm.2.bias", bias(rng, text))
    writer.add_tensor("v.image_newline", rng.standard_normal(text, dtype=np.float32) * WEIGHT_STD)


def write_qwen25vl_mmproj(writer: gguf.GGUFWriter, name: str, rng: np.random.Generator) -> None:
    """Qwen2.5-VL's vision tower: ``qwen2.5vl_merger`` (RMS norms, SiLU-gated FFN, window attention)."""
    patch, text = QWEN2VL_PATCH_SIZE, TEXT_EMBD
    merged = VISION_EMBD * QWEN2VL_MERGE * QWEN2VL_MERGE
    vision_header(writer, name, "qwen2.5vl_merger", QWEN2VL_IMAGE_SIZE, patch, text, IMAGE_MEAN, IMAGE_STD, silu=True)
    writer.add_uint32("clip.vision.spatial_merge_size", QWEN2VL_MERGE)
    writer.add_uint32("clip.vision.n_wa_pattern", QWEN25VL_WA_PATTERN)
    writer.add_tensor("v.patch_embd.weight", matrix(rng, VISION_EMBD, 3, patch, patch))
    writer.add_tensor("v.patch_embd.weight.1", matrix(rng, VISION_EMBD, 3, patch, patch))
    for block in range(VISION_LAYERS):
        vision_block(writer, rng, block, rms_norm=True, gated=True)
    writer.add_tensor("v.post_ln.weight", ones(VISION_EMBD))  # the merger's RMS norm (ln_q)
    writer.add_tensor("mm.0.weight", matrix(rng, merged, merged))
    writer.add_tensor("mm.0.bias", bias(rng, merged))
    writer.add_tensor("mm.2.weight", matrix(rng, text, merged))
    writer.add_tensor("mm.2.bias", bias(rng, text))


def write_pixtral_mmproj(writer: gguf.GGUFWriter, name: str, rng: np.random.Generator) -> None:
    """Pixtral's ViT with Mistral Small 3.1's patch merger: ``pixtral`` (RMS norms, 2-D RoPE, gated SiLU FFN)."""
    patch, text = PIXTRAL_PATCH_SIZE, TEXT_EMBD
    merged = VISION_EMBD * PIXTRAL_MERGE * PIXTRAL_MERGE
    vision_header(writer, name, "pixtral", PIXTRAL_IMAGE_SIZE, patch, text, IMAGE_MEAN, IMAGE_STD, silu=True)
    writer.add_uint32("clip.vision.spatial_merge_size", PIXTRAL_MERGE)
    writer.add_tensor("v.patch_embd.weight", matrix(rng, VISION_EMBD, 3, patch, patch))
    writer.add_tensor("v.pre_ln.weight", ones(VISION_EMBD))  # ln_pre (RMS)
    for block in range(VISION_LAYERS):
        vision_block(writer, rng, block, rms_norm=True, gated=True)
    writer.add_tensor("mm.input_norm.weight", ones(VISION_EMBD))
    writer.add_tensor("mm.patch_merger.weight", matrix(rng, VISION_EMBD, merged))
    writer.add_tensor("mm.1.weight", matrix(rng, text, VISION_EMBD))
    writer.add_tensor("mm.1.bias", bias(rng, text))
    writer.add_tensor("mm.2.weight", matrix(rng, text, text))
    writer.add_tensor("mm.2.bias", bias(rng, text))
    # The embedding of [IMG_BREAK], appended by the projector to each row.
    writer.add_tensor("v.token_embd.img_break", rng.standard_normal(text, dtype=np.float32) * WEIGHT_STD)


def write_idefics3_mmproj(writer: gguf.GGUFWriter, name: str, rng: np.random.Generator) -> None:
    """SmolVLM / Idefics3's SigLIP tower and connector: ``idefics3`` (pixel shuffle, one linear projection)."""
    patch, text = IDEFICS3_PATCH_SIZE, TEXT_EMBD
    shuffled = VISION_EMBD * IDEFICS3_SCALE_FACTOR * IDEFICS3_SCALE_FACTOR
    vision_header(writer, name, "idefics3", IDEFICS3_IMAGE_SIZE, patch, text, HALF, HALF)
    writer.add_uint32("clip.vision.projector.scale_factor", IDEFICS3_SCALE_FACTOR)
    writer.add_uint32("clip.vision.preproc_image_size", IDEFICS3_LONGEST_EDGE)
    writer.add_tensor("v.patch_embd.weight", matrix(rng, VISION_EMBD, 3, patch, patch))
    writer.add_tensor("v.patch_embd.bias", bias(rng, VISION_EMBD))
    writer.add_tensor("v.position_embd.weight", pos_embd(rng, (IDEFICS3_IMAGE_SIZE // patch) ** 2))
    for block in range(VISION_LAYERS):
        vision_block(writer, rng, block)
    writer.add_tensor("v.post_ln.weight", ones(VISION_EMBD))
    writer.add_tensor("v.post_ln.bias", zeros(VISION_EMBD))
    writer.add_tensor("mm.model.fc.weight", matrix(rng, text, shuffled))


MMPROJ_WRITERS: dict[str, Callable[[gguf.GGUFWriter, str, np.random.Generator], None]] = {
    "qwen25vl": write_qwen25vl_mmproj,
    "idefics3": write_idefics3_mmproj,
    "pixtral": write_pixtral_mmproj,
    "qwen3vl": write_qwen3vl_mmproj,
    "gemma3": write_gemma3_mmproj,
    "gemma4": write_gemma4_mmproj,
    "internvl": write_internvl_mmproj,
    "minicpmv": write_minicpmv_mmproj,
}
