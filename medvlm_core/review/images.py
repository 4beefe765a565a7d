"""The page image beside the items: the page rendered from the source document (as the run read it: EXIF
orientation applied, PDF pages rendered, TIFF frames split; ``inputs.images.load_pages``), as PNG.

The last few pages rendered are kept in memory (a reviewer goes back and forth); nothing is written to disk.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

from medvlm_core import errors
from medvlm_core.errors import DocumentError
from medvlm_core.inputs.images import load_pages
from medvlm_core.run.params import ImageOptions
from medvlm_core.storage import Storage

# Enough pixels to read small print when zoomed (a letter page at ~200 dpi), bounded for the browser.
MAX_PIXELS = 4_000_000
CACHED_PAGES = 8


def render_page(storage: Storage, image_uri: str, page: int, max_pixels: int = MAX_PIXELS) -> bytes:
    """One page of a document as PNG.

    Args:
        storage: reads the document.
        image_uri: the document's URI (the completion row's ``image_uri``).
        page: the 1-based page.
        max_pixels: the pixel budget (downscaled to fit, aspect kept).

    Returns:
        The PNG bytes.

    Raises:
        DocumentError: the document cannot be read or has no such page (the message names the file, never its
            content).
    """
    options = ImageOptions(max_pixels=max_pixels)
    data = storage.read_bytes(image_uri, max_bytes=options.max_bytes)
    for found in load_pages(data, image_uri, options, page=page):
        if found.image is None:
            break
        buffer = io.BytesIO()
        found.image.save(buffer, format="PNG", compress_level=3)
        return buffer.getvalue()
    raise DocumentError(errors.NOT_FOUND, f"{image_uri}: page {page} not found")


class PageImages:
    """Rendered pages, the last ``CACHED_PAGES`` kept in memory (thread-safe)."""

    def __init__(self, storage: Storage, size: int = CACHED_PAGES, max_pixels: int = MAX_PIXELS):
        self._storage, self._size, self._max_pixels = storage, size, max_pixels
        self._cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, image_uri: str, page: int) -> bytes:
        """A page as PNG, rendered or from memory.

        Args:
            image_uri: the document's URI.
            page: the 1-based page.

        Returns:
            The PNG bytes.
        """
        key = (image_uri, page)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        png = render_page(self._storage, image_uri, page, self._max_pixels)
        with self._lock:
            self._cache[key] = png
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return png
