"""Property-based tests: any bytes or manifest text ends as rows or one clear error, never a crash."""

from __future__ import annotations

import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from medvlm_core.errors import DocumentError, RunError
from medvlm_core.inputs.images import load_pages
from medvlm_core.inputs.manifest import COLUMNS, read_manifest
from medvlm_core.run.params import ImageOptions
from medvlm_core.storage import Storage
from support.reliability_report import record

OPTIONS = ImageOptions(max_pixels=200_000, max_source_pixels=4_000_000, max_pages=5)


def _seeds() -> list[bytes]:
    im = Image.new("RGB", (64, 48), "white")
    out = []
    for fmt in ("PNG", "JPEG", "TIFF", "GIF", "BMP", "WEBP"):
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        out.append(buf.getvalue())
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument.new()
    pdf.new_page(100, 100)
    buf = io.BytesIO()
    pdf.save(buf)
    out.append(buf.getvalue())
    return out


SEEDS = _seeds()


def _decode(data: bytes, check: str) -> None:
    record(check, inputs=1)
    try:
        for page in load_pages(data, "fuzz.bin", OPTIONS):
            assert page.image.mode == "RGB" and page.image.width * page.image.height <= OPTIONS.max_pixels
    except DocumentError as exc:
        assert exc.error_type and "fuzz.bin" in exc.message


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_any_bytes_decode_or_give_a_document_error(data):
    _decode(data, "fuzz: random bytes as a document")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
       st.integers(0, 10_000))
def test_corrupted_real_files_decode_or_give_a_document_error(seed, flips, cut):
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    _decode(bytes(data[: max(1, len(data) - cut % len(data))]), "fuzz: corrupted PNG/JPEG/TIFF/GIF/BMP/WebP/PDF")


cell = st.one_of(st.none(), st.text(max_size=12), st.sampled_from(["1", "0", "-1", "2.0", "a.png", "s3://b/k.png", "../x"]))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.fixed_dictionaries({c: cell for c in COLUMNS}), min_size=0, max_size=12))
def test_any_manifest_rows_end_as_rows_or_quarantine(tmp_path, records):
    import csv

    record("fuzz: manifest rows", inputs=len(records))
    path = tmp_path / "m.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(records)
    try:
        plan = read_manifest(str(path), Storage())
    except RunError as exc:
        assert "manifest" in str(exc)
        return
    lost = len(records) - len({r.row_number for r in plan.rows} | {q["row_number"] for q in plan.quarantined})
    record("fuzz: manifest rows", rows_lost=lost)
    assert len(plan.rows) + len(plan.quarantined) == plan.total_rows == len(records)
    assert len({r.row_number for r in plan.rows} | {q["row_number"] for q in plan.quarantined}) == len(records)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=600), st.sampled_from([".csv", ".jsonl", ".parquet"]))
def test_any_manifest_bytes_give_rows_or_one_clear_error(tmp_path, data, ext):
    record("fuzz: manifest files (bytes)", inputs=1)
    path = tmp_path / f"m{ext}"
    path.write_bytes(data)
    try:
        plan = read_manifest(str(path), Storage())
    except RunError as exc:
        assert str(path) in str(exc) or "manifest" in str(exc)
        return
    assert len(plan.rows) + len(plan.quarantined) == plan.total_rows
