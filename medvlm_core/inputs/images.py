"""Document files to model-ready page images.

A document (PNG, JPEG, WebP, TIFF, PDF, BMP, GIF) is read from bytes, split into pages (TIFF frames, PDF
pages), oriented (EXIF), converted to 8-bit RGB (CMYK, 16-bit, palette and alpha handled explicitly) and
downscaled to the pixel budget. Every failure is a ``DocumentError`` with a stable ``error_type`` and a
message that names the file and the reason, never its content.
"""

from __future__ import annotations

import base64
import io
import math
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from medvlm_core import errors
from medvlm_core.errors import DocumentError
from medvlm_core.run.params import ImageOptions

# pdfium is not thread-safe: every pypdfium2 call in this process goes through this lock.
_PDFIUM_LOCK = threading.Lock()

# Magic bytes -> format name. Sniffing the content (not the extension) is what catches a text file
# named .jpg or a PDF named .png.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"%PDF-", "pdf"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
)

# Supported format -> the file extensions it goes by (how the nightly flow finds loose documents).
FORMAT_EXTENSIONS = {
    "png": (".png",),
    "jpeg": (".jpg", ".jpeg"),
    "webp": (".webp",),
    "tiff": (".tif", ".tiff"),
    "pdf": (".pdf",),
    "bmp": (".bmp",),
    "gif": (".gif",),
}
SUPPORTED_FORMATS = tuple(FORMAT_EXTENSIONS)
DOCUMENT_EXTENSIONS = tuple(ext for exts in FORMAT_EXTENSIONS.values() for ext in exts)


@dataclass
class PageImage:
    """One page ready for the model: 8-bit RGB within the pixel budget."""

    page: int  # 1-based
    page_count: int
    image: Image.Image | None  # None when the caller asked to skip this page (not decoded)
    source_width: int | None
    source_height: int | None
    source_format: str


def sniff_format(data: bytes, name: str) -> str:
    """The document format from its first bytes; ``unsupported_format`` / ``unreadable_image`` if none."""
    if not data:
        raise DocumentError(errors.UNREADABLE_IMAGE, f"{name}: empty file (0 bytes)")
    head = data[:16]
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    raise DocumentError(
        errors.UNSUPPORTED_FORMAT,
        f"{name}: not a supported document format (expected one of {', '.join(SUPPORTED_FORMATS)})",
    )


def fit_to_budget(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest size with the same aspect ratio and at most ``max_pixels`` pixels (never upscales)."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode: alpha composited on white, 16-bit and float rescaled, CMYK converted."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Pillow's own I -> L conversion clips at 255 instead of rescaling: a 16-bit scan would turn white.
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if mode.startswith("I;16") and hi <= 255 and lo >= 0:
            scaled = arr
        elif hi > lo:
            scaled = (arr - lo) * (255.0 / (hi - lo))
        else:
            scaled = np.zeros_like(arr)
        return Image.fromarray(scaled.clip(0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def _prepare(im: Image.Image, name: str, options: ImageOptions) -> Image.Image:
    """Orient, convert and downscale one decoded frame."""
    try:
        # In place: a page with no orientation tag (nearly all scans) is not copied (~4 MB at 1000x1300).
        ImageOps.exif_transpose(im, in_place=True)
    except Exception:
        # A malformed EXIF block must not cost the page: keep the stored orientation.
        pass
    im = to_rgb(im)
    size = fit_to_budget(im.width, im.height, options.max_pixels)
    if size != im.size:
        im = im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return im


def _check_pixels(width: int, height: int, name: str, options: ImageOptions) -> None:
    if width * height > options.max_source_pixels:
        raise DocumentError(
            errors.TOO_LARGE,
            f"{name}: image is {width}x{height} pixels, over the max_source_pixels limit "
            f"{options.max_source_pixels}",
        )


def _select_pages(page_count: int, page: int | None, name: str, options: ImageOptions) -> list[int]:
    """0-based page indexes to produce."""
    if page is not None:
        if page < 1 or page > page_count:
            raise DocumentError(
                errors.PAGE_OUT_OF_RANGE, f"{name}: page {page} requested, document has {page_count} page(s)"
            )
        return [page - 1]
    if page_count > options.max_pages:
        raise DocumentError(
            errors.TOO_LARGE, f"{name}: document has {page_count} pages, over the max_pages limit {options.max_pages}"
        )
    return list(range(page_count))


def _raster_pages(
    data: bytes, fmt: str, name: str, options: ImageOptions, page: int | None, skip: Callable[[int], bool] | None
) -> Iterator[PageImage]:
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below, and a damaged file's metadata warnings would only add
            # noise to the logs: the outcome (a page or an error row) says what happened.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)
            im = Image.open(io.BytesIO(data))
            # Phone cameras write MPO (a JPEG with extra pictures appended): treat it as the JPEG it is.
            detected = {"mpo": "jpeg"}.get((im.format or fmt).lower(), (im.format or fmt).lower())
            # Only TIFF frames are pages; GIF animation frames and MPO extras are not.
            frames = getattr(im, "n_frames", 1) if detected == "tiff" else 1
            indexes = _select_pages(frames, page, name, options)
            for index in indexes:
                if skip is not None and skip(index + 1):
                    yield PageImage(index + 1, frames, None, None, None, detected)
                    continue
                im.seek(index)
                width, height = im.size
                _check_pixels(width, height, name, options)
                if detected == "jpeg":
                    # Decode big scans at a reduced DCT scale: 10x faster than a full decode + resize.
                    im.draft("RGB", fit_to_budget(width, height, options.max_pixels))
                im.load()
                # A multi-frame file reuses ``im`` for the next frame: hand out a copy.
                frame = im.copy() if frames > 1 else im
                yield PageImage(
                    page=index + 1,
                    page_count=frames,
                    image=_prepare(frame, name, options),
                    source_width=width,
                    source_height=height,
                    source_format=detected,
                )
    except DocumentError:
        raise
    except Image.DecompressionBombError:
        raise DocumentError(
            errors.TOO_LARGE, f"{name}: image dimensions exceed the max_source_pixels limit {options.max_source_pixels}"
        ) from None
    except UnidentifiedImageError:
        raise DocumentError(errors.UNREADABLE_IMAGE, f"{name}: {fmt} header not recognised (corrupt file)") from None
    except ValueError as exc:
        if _metadata_over_limit(exc):
            raise DocumentError(
                errors.TOO_LARGE, f"{name}: its PNG metadata (text chunks) is over Pillow's safety limit "
                f"({PngImagePlugin.MAX_TEXT_CHUNK // 1024 // 1024} MiB a chunk); the image itself may be fine: strip "
                f"the metadata (for example `mogrify -strip FILE`) and submit it again"
            ) from None
        raise DocumentError(
            errors.UNREADABLE_IMAGE, f"{name}: {fmt} data is corrupt or truncated ({type(exc).__name__})"
        ) from None
    except Exception as exc:  # damaged files raise OSError, SyntaxError, KeyError, TypeError, struct.error...
        # Decoders of untrusted bytes fail in many ways; every one of them means "this file is damaged".
        raise DocumentError(
            errors.UNREADABLE_IMAGE, f"{name}: {fmt} data is corrupt or truncated ({type(exc).__name__})"
        ) from None


def _metadata_over_limit(exc: ValueError) -> bool:
    """Pillow refuses a PNG whose text chunks decompress past ``MAX_TEXT_CHUNK`` (or add up past
    ``MAX_TEXT_MEMORY``), a defence against metadata bombs: the pixels were never the problem."""
    text = str(exc)
    return "MAX_TEXT_CHUNK" in text or "MAX_TEXT_MEMORY" in text or "memory used in text chunks" in text


def _pdf_pages(
    data: bytes, name: str, options: ImageOptions, page: int | None, skip: Callable[[int], bool] | None
) -> Iterator[PageImage]:
    import pypdfium2 as pdfium

    with _PDFIUM_LOCK:
        try:
            doc = pdfium.PdfDocument(data)
        except pdfium.PdfiumError:
            raise DocumentError(errors.UNREADABLE_IMAGE, f"{name}: PDF is corrupt, truncated or encrypted") from None
        try:
            page_count = len(doc)
            if page_count == 0:
                raise DocumentError(errors.UNREADABLE_IMAGE, f"{name}: PDF has no pages")
            indexes = _select_pages(page_count, page, name, options)
            rendered = []
            for index in indexes:
                if skip is not None and skip(index + 1):
                    rendered.append((index, None, (None, None)))
                    continue
                try:
                    pdf_page = doc[index]
                except pdfium.PdfiumError:
                    raise DocumentError(errors.UNREADABLE_IMAGE, f"{name}: PDF page {index + 1} cannot be read") from None
                try:
                    width_pt, height_pt = pdf_page.get_size()
                    # Render straight at the budget when the DPI would overshoot it: no wasted pixels.
                    scale = options.pdf_dpi / 72.0
                    px = width_pt * scale * height_pt * scale
                    if px > options.max_pixels:
                        scale *= math.sqrt(options.max_pixels / px)
                    bitmap = pdf_page.render(scale=scale)
                    image = bitmap.to_pil()
                    source = (round(width_pt * options.pdf_dpi / 72), round(height_pt * options.pdf_dpi / 72))
                    rendered.append((index, image, source))
                except pdfium.PdfiumError:
                    raise DocumentError(errors.UNREADABLE_IMAGE, f"{name}: PDF page {index + 1} cannot be rendered") from None
                finally:
                    pdf_page.close()
        finally:
            doc.close()
    for index, image, (sw, sh) in rendered:
        yield PageImage(
            page=index + 1,
            page_count=page_count,
            image=None if image is None else _prepare(image, name, options),
            source_width=sw,
            source_height=sh,
            source_format="pdf",
        )


def load_pages(
    data: bytes,
    name: str,
    options: ImageOptions,
    page: int | None = None,
    skip: Callable[[int], bool] | None = None,
) -> Iterator[PageImage]:
    """Pages of a document as model-ready images, lazily. ``page`` (1-based) selects one page.

    Pages for which ``skip(page)`` is true are yielded with ``image=None`` and are not decoded (their
    results already exist).

    Raises DocumentError for the whole document (unsupported, corrupt, too large, page out of range).
    ``name`` is used in messages only (the file's URI).
    """
    if len(data) > options.max_bytes:
        raise DocumentError(errors.TOO_LARGE, f"{name}: file is {len(data)} bytes, over the max_bytes limit {options.max_bytes}")
    fmt = sniff_format(data, name)
    if fmt == "pdf":
        return _pdf_pages(data, name, options, page, skip)
    return _raster_pages(data, fmt, name, options, page, skip)


def to_data_uri(image: Image.Image) -> str:
    """PNG data URI of an image, the form llama-cpp-python's chat handlers accept."""
    buf = io.BytesIO()
    # Lossless keeps small print intact; compress_level 1 is ~5x faster than the default and the bytes
    # never leave the process.
    image.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
