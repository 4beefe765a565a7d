"""Document decoding: formats, orientation, colour modes, pixel budget and the errors bad files give."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from medvlm_core import errors
from medvlm_core.errors import DocumentError
from medvlm_core.inputs.images import fit_to_budget, load_pages, sniff_format, to_data_uri
from medvlm_core.run.params import ImageOptions

OPTS = ImageOptions()


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def pages(data: bytes, options: ImageOptions = OPTS, page: int | None = None):
    return list(load_pages(data, "s3://bucket/doc", options, page=page))


def error_of(data: bytes, options: ImageOptions = OPTS, page: int | None = None) -> DocumentError:
    with pytest.raises(DocumentError) as info:
        pages(data, options, page)
    assert "s3://bucket/doc" in info.value.message  # the message names the file
    return info.value


def test_png_and_jpeg_decode_to_rgb_within_budget():
    im = Image.new("RGB", (2000, 3000), "white")
    for fmt in ("PNG", "JPEG"):
        [page] = pages(encode(im, fmt), ImageOptions(max_pixels=1_000_000))
        assert page.image.mode == "RGB"
        assert page.image.width * page.image.height <= 1_000_000
        assert abs(page.image.width / page.image.height - 2 / 3) < 0.01
        assert (page.source_width, page.source_height) == (2000, 3000)
        assert page.page == 1 and page.page_count == 1


def test_small_images_are_not_upscaled():
    [page] = pages(encode(Image.new("RGB", (300, 200)), "PNG"))
    assert page.image.size == (300, 200)
    assert fit_to_budget(300, 200, 10) != (300, 200)


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (400, 200), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    [page] = pages(encode(im, "JPEG", exif=exif.tobytes()))
    assert page.image.size == (200, 400)


def test_cmyk_16bit_palette_and_alpha_become_rgb():
    cmyk = Image.new("CMYK", (64, 64), (0, 0, 0, 0))  # no ink = white
    [p] = pages(encode(cmyk, "JPEG"))
    assert p.image.mode == "RGB" and p.image.getpixel((10, 10))[0] > 240

    arr = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    sixteen = Image.fromarray(arr)
    assert sixteen.mode.startswith("I;16")
    [p] = pages(encode(sixteen, "PNG"))
    values = np.asarray(p.image)[..., 0]
    assert p.image.mode == "RGB" and values.max() == 255 and values.min() == 0  # rescaled, not clipped

    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # fully transparent -> white page
    [p] = pages(encode(rgba, "PNG"))
    assert p.image.getpixel((5, 5)) == (255, 255, 255)

    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([10, 20, 30] * 256)
    [p] = pages(encode(pal, "GIF"))
    assert p.image.getpixel((1, 1)) == (10, 20, 30)


def test_multipage_tiff_expands_and_selects_pages():
    frames = [Image.new("RGB", (100, 120), c) for c in ("red", "green", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    data = buf.getvalue()
    got = pages(data)
    assert [p.page for p in got] == [1, 2, 3] and all(p.page_count == 3 for p in got)
    assert got[1].image.getpixel((5, 5)) == (0, 128, 0)
    [only] = pages(data, page=3)
    assert only.page == 3 and only.image.getpixel((5, 5)) == (0, 0, 255)
    assert error_of(data, page=4).error_type == errors.PAGE_OUT_OF_RANGE


def test_pdf_pages_render():
    pdfium = pytest.importorskip("pypdfium2")
    pdf = pdfium.PdfDocument.new()
    for _ in range(3):
        pdf.new_page(612, 792)
    buf = io.BytesIO()
    pdf.save(buf)
    got = pages(buf.getvalue(), ImageOptions(pdf_dpi=100))
    assert [p.page for p in got] == [1, 2, 3]
    assert got[0].image.size == (850, 1100)
    assert got[0].source_format == "pdf"


@pytest.mark.parametrize(
    "data, error_type",
    [
        (b"", errors.UNREADABLE_IMAGE),
        (b"Patient notes, plain text, saved as .jpg\n", errors.UNSUPPORTED_FORMAT),
        (encode(Image.new("RGB", (500, 500), "gray"), "PNG")[:200], errors.UNREADABLE_IMAGE),
        (b"%PDF-1.4 truncated", errors.UNREADABLE_IMAGE),
    ],
    ids=["zero-bytes", "text-as-jpg", "truncated-png", "truncated-pdf"],
)
def test_bad_files_give_stable_error_types(data, error_type):
    assert error_of(data).error_type == error_type


def test_decompression_bomb_header_is_refused_without_decoding():
    # A valid PNG header claiming 100k x 100k pixels, with a tiny body.
    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")
    err = error_of(png)
    assert err.error_type == errors.TOO_LARGE and "max_source_pixels" in err.message


def test_byte_and_page_limits():
    data = encode(Image.new("RGB", (10, 10)), "PNG")
    assert error_of(data, ImageOptions(max_bytes=10)).error_type == errors.TOO_LARGE
    frames = [Image.new("RGB", (10, 10))] * 3
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    err = error_of(buf.getvalue(), ImageOptions(max_pages=2))
    assert err.error_type == errors.TOO_LARGE and "max_pages" in err.message


def test_sniffing_uses_content_not_extension():
    assert sniff_format(encode(Image.new("RGB", (4, 4)), "WEBP"), "x.png") == "webp"
    assert sniff_format(encode(Image.new("RGB", (4, 4)), "BMP"), "x.jpg") == "bmp"


def test_data_uri_roundtrip():
    uri = to_data_uri(Image.new("RGB", (8, 8), "red"))
    assert uri.startswith("data:image/png;base64,")


def test_a_png_metadata_bomb_is_named_as_metadata_over_the_limit():
    """An oversized text chunk (the pixels are fine) is not reported as corrupt image data."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (PngImagePlugin.MAX_TEXT_CHUNK + 1), zip=True)  # compresses to ~2 KB
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), "white").save(buf, "PNG", pnginfo=info)
    err = error_of(buf.getvalue())
    assert err.error_type == errors.TOO_LARGE
    assert "metadata" in err.message and "safety limit" in err.message and "corrupt" not in err.message
