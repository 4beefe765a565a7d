"""Documents as they really arrive: a messy manifest and real problem files through the real `medvlm run`.

Every manifest row must end as a result row, an error row or a quarantine row, each with the outcome a
person would expect, with no traceback and exit status 0.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from PIL import Image

from conftest import write_manifest

MEDVLM = str(Path(sys.executable).with_name("medvlm"))


def bomb_png() -> bytes:
    """A valid PNG header claiming 100,000 x 100,000 pixels, with a tiny body."""
    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    head = chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + head + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def problem_files(tmp_path):
    d = tmp_path / "files"
    d.mkdir()
    page = Image.new("RGB", (600, 800), "white")
    buf = io.BytesIO()
    page.save(buf, format="PNG")
    (d / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "notes.jpg").write_text("Patient states pain 7/10. This is a text file, not a JPEG.\n")
    Image.new("CMYK", (500, 700), (0, 0, 0, 10)).save(d / "cmyk.jpg", format="JPEG")
    Image.fromarray((np.arange(300 * 400, dtype=np.uint32).reshape(400, 300) % 65535).astype(np.uint16)).save(d / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # the phone was held sideways: display rotated 90 degrees
    Image.new("RGB", (800, 600), "white").save(d / "phone.jpg", format="JPEG", exif=exif.tobytes())
    frames = [Image.new("RGB", (400, 500), c) for c in ("white", "lightgray", "gray")]
    frames[0].save(d / "fax.tiff", save_all=True, append_images=frames[1:], compression="tiff_deflate")
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument.new()
    for _ in range(3):
        pdf.new_page(612, 792)
    pdf.save(str(d / "referral.pdf"))
    (d / "bomb.png").write_bytes(bomb_png())
    page.save(d / "good.png")
    return d


def test_messy_manifest_and_problem_files(tmp_path, problem_files, tiny_llava):
    good_sha = hashlib.sha256((problem_files / "good.png").read_bytes()).hexdigest()
    rows = [
        # -- files that are processed (ok) --
        {"document_id": "cmyk", "image_uri": "files/cmyk.jpg"},
        {"document_id": "deep", "image_uri": "files/deep.png"},
        {"document_id": "phone", "image_uri": "files/phone.jpg"},
        {"document_id": "fax", "image_uri": "files/fax.tiff"},
        {"document_id": "fax", "image_uri": "files/fax.tiff", "page": 2},
        {"document_id": "referral", "image_uri": "files/referral.pdf"},
        {"document_id": "good", "image_uri": "files/good.png", "sha256": good_sha, "prompt_id": "transcribe"},
        # -- files that become error rows --
        {"document_id": "truncated", "image_uri": "files/truncated.png"},
        {"document_id": "empty", "image_uri": "files/empty.png"},
        {"document_id": "notes", "image_uri": "files/notes.jpg"},
        {"document_id": "bomb", "image_uri": "files/bomb.png"},
        {"document_id": "missing", "image_uri": "files/missing.png"},
        {"document_id": "tampered", "image_uri": "files/good.png", "sha256": "0" * 64},
        {"document_id": "fax", "image_uri": "files/fax.tiff", "page": 5},
        # -- rows that are quarantined --
        {"document_id": "cmyk", "image_uri": "files/cmyk.jpg"},  # exact duplicate of row 1
        {"document_id": "no-uri"},  # image_uri missing in this row
        {"document_id": "web", "image_uri": "https://example.org/scan.png"},
        {"document_id": "prompt", "image_uri": "files/good.png", "prompt_id": "summarise_everything"},
        {"document_id": "hash", "image_uri": "files/good.png", "sha256": "abc123"},
        {"document_id": "zero", "image_uri": "files/good.png", "page": 0},
    ]
    manifest = write_manifest(tmp_path / "manifest.jsonl", rows)
    out = tmp_path / "out"

    check = subprocess.run([MEDVLM, "validate", str(manifest)], capture_output=True, text=True, timeout=120)
    assert check.returncode == 1, check.stderr
    assert "20 rows, 14 valid, 6 would be quarantined" in check.stdout
    assert "Patient states" not in check.stdout

    proc = subprocess.run(
        [MEDVLM, "run", "--manifest", str(manifest), "--output", str(out), "--model", str(tiny_llava.model_path),
         "--mmproj", str(tiny_llava.mmproj_path), "--max-tokens", "3", "--n-ctx", "4096", "--chunk-size", "4"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr

    results = ds.dataset(out / "completions", partitioning="hive").to_table().to_pylist()
    outcome = {}
    for r in results:
        outcome.setdefault((r["document_id"], r["manifest_row"]), []).append(
            (r["page"], r["status"], r["error_type"])
        )
    ok = "ok", None
    assert outcome == {
        ("cmyk", 1): [(1, *ok)],
        ("deep", 2): [(1, *ok)],
        ("phone", 3): [(1, *ok)],
        ("fax", 4): [(1, *ok), (2, *ok), (3, *ok)],
        ("fax", 5): [(2, *ok)],
        ("referral", 6): [(1, *ok), (2, *ok), (3, *ok)],
        ("good", 7): [(1, *ok)],
        ("truncated", 8): [(None, "error", "unreadable_image")],
        ("empty", 9): [(None, "error", "unreadable_image")],
        ("notes", 10): [(None, "error", "unsupported_format")],
        ("bomb", 11): [(None, "error", "too_large")],
        ("missing", 12): [(None, "error", "not_found")],
        ("tampered", 13): [(None, "error", "sha256_mismatch")],
        ("fax", 14): [(5, "error", "page_out_of_range")],
    }
    by_doc = {r["document_id"]: r for r in results}
    assert (by_doc["phone"]["image_width"], by_doc["phone"]["image_height"]) == (600, 800)  # EXIF applied
    assert by_doc["referral"]["image_format"] == "pdf"
    assert {r["image_format"] for r in results if r["manifest_row"] == 4} == {"tiff"}
    assert "bomb.png" in by_doc["bomb"]["error_message"] and "max_source_pixels" in by_doc["bomb"]["error_message"]
    assert "notes.jpg" in by_doc["notes"]["error_message"]
    assert by_doc["good"]["image_sha256"] == good_sha

    quarantine = ds.dataset(out / "quarantine", partitioning="hive").to_table().to_pylist()
    reasons = {q["row_number"]: q["reason"] for q in quarantine}
    assert reasons == {
        15: "row 15: exact duplicate of row 1 (same document_id and page)",
        16: "row 16: image_uri is missing",
        17: "row 17: image_uri must be s3://..., file://..., an absolute path or a path relative to the manifest",
        18: "row 18: prompt_id is not in the prompt library",
        19: "row 19: sha256 must be 64 hexadecimal characters",
        20: "row 20: page must be an integer >= 1",
    }
    assert json.loads(next(q["row_json"] for q in quarantine if q["row_number"] == 17))["document_id"] == "web"

    [run] = ds.dataset(out / "runs", partitioning="hive").to_table().to_pylist()
    assert (run["manifest_rows"], run["quarantined_rows"], run["processed_rows"], run["skipped_rows"]) == (20, 6, 14, 0)
    assert (run["pages_ok"], run["pages_error"], run["reconciled"]) == (11, 7, True)
    assert run["manifest_rows"] == run["quarantined_rows"] + run["processed_rows"] + run["skipped_rows"]
