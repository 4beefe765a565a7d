"""Random weight tensors, the same draws for a given generator state.

numpy shapes are (rows, columns) = (out_features, in_features); gguf stores the reversed shape, which is what
llama.cpp expects.
"""

from __future__ import annotations

import numpy as np

from medvlm_core.testing.tiny_model.sizes import VISION_EMBD

# Standard deviation of the random weights: small enough that activations
# stay finite through the residual stream, large enough that the logits are
# not all (nearly) equal.
WEIGHT_STD = 0.05


def matrix(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Random F16 weight tensor (matrices and convolution kernels)."""
    return (rng.standard_normal(shape, dtype=np.float32) * WEIGHT_STD).astype(np.float16)


def bias(rng: np.random.Generator, n: int) -> np.ndarray:
    """Small random F32 bias vector."""
    return rng.standard_normal(n, dtype=np.float32) * (WEIGHT_STD / 2)


def ones(n: int) -> np.ndarray:
    """F32 norm weight (norm layers start as the identity, as in training)."""
    return np.ones(n, dtype=np.float32)


def zeros(n: int) -> np.ndarray:
    """F32 norm bias."""
    return np.zeros(n, dtype=np.float32)


def pos_embd(rng: np.random.Generator, n: int, width: int = VISION_EMBD) -> np.ndarray:
    """F32 learned position embeddings: clip.cpp adds (or interpolates) them in F32, and ggml aborts on F16 there."""
    return rng.standard_normal((n, width), dtype=np.float32) * WEIGHT_STD
