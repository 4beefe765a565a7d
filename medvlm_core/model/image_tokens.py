"""How many tokens a page image costs a model, estimated from its vision projector's metadata (no model loaded).

Document scope (``run/documents.py``) uses this to decide whether all of a document's pages fit one prompt, and,
for projectors whose token count follows the image's size, how far to lower the pixels per page so they do.
The engine remains the judge: a request that does not fit its context is a ``context_overflow`` error, and
document scope then answers page by page (map-reduce).

* Qwen2-VL, Qwen2.5-VL, Qwen3-VL (``qwen2vl_merger``, ``qwen2.5vl_merger``, ``qwen3vl_merger``): dynamic
  resolution. libmtmd rounds each side to a multiple of ``patch_size * spatial_merge_size`` pixels and gives one
  token per such square: a 1000 x 1300 page at 28 px a square is 36 x 46 = 1,656 tokens. These are *adjustable*.
* LLaVA-1.5 style (``mlp``): a fixed ``(image_size / patch_size)^2`` tokens whatever the page.
* Others (Gemma 3, InternVL, MiniCPM-V tiling, ...): not estimated (the engine's answer decides).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from medvlm_core.model.files import read_gguf_metadata

_DYNAMIC = ("qwen2vl_merger", "qwen2.5vl_merger", "qwen25vl_merger", "qwen3vl_merger")


@dataclass(frozen=True)
class ImageTokens:
    """A projector's image token count.

    Attributes:
        projector_type: the mmproj's ``clip.projector_type``.
        square: for an adjustable projector, the side in pixels of the square one token covers.
        fixed: for a fixed projector, the tokens of any page.
    """

    projector_type: str
    square: int | None = None
    fixed: int | None = None

    @property
    def adjustable(self) -> bool:
        """Whether a page's tokens follow its pixels (lowering the pixels lowers the tokens)."""
        return self.square is not None

    @property
    def known(self) -> bool:
        """Whether pages' tokens can be estimated at all."""
        return self.square is not None or self.fixed is not None

    def estimate(self, width: int, height: int) -> int | None:
        """The tokens of a ``width`` x ``height`` page.

        Args:
            width: pixels.
            height: pixels.

        Returns:
            The estimate, or None when it cannot be made.
        """
        if self.square:
            return max(1, round(width / self.square)) * max(1, round(height / self.square))
        return self.fixed

    def pixels_for(self, tokens: int) -> int:
        """The pixel budget under which a page costs at most about ``tokens`` tokens (adjustable projectors).

        Args:
            tokens: tokens per page.

        Returns:
            Pixels (aspect kept by whoever resizes; rounding each side may add a row or column of squares, so
            the budget leaves one token's margin per side).
        """
        if not self.square:
            raise ValueError(f"the {self.projector_type} projector's tokens do not follow the page's pixels")
        side = max(1.0, math.sqrt(tokens) - 1.0)
        return int(side * side * self.square * self.square)


def image_tokens_of(mmproj_path: str) -> ImageTokens:
    """The image token count of a vision projector, from its GGUF metadata.

    Args:
        mmproj_path: the local mmproj GGUF.

    Returns:
        What is known of its tokens per page.
    """
    meta = read_gguf_metadata(mmproj_path)
    projector = str(meta.get("clip.projector_type") or ("mlp" if meta.get("clip.has_llava_projector") else ""))
    patch = meta.get("clip.vision.patch_size")
    if projector in _DYNAMIC and isinstance(patch, int):
        merge = meta.get("clip.vision.spatial_merge_size")
        return ImageTokens(projector, square=patch * (merge if isinstance(merge, int) and merge > 0 else 2))
    size = meta.get("clip.vision.image_size")
    if projector == "mlp" and isinstance(patch, int) and isinstance(size, int) and patch > 0:
        return ImageTokens(projector, fixed=(size // patch) ** 2)
    return ImageTokens(projector)
