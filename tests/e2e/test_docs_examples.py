"""The Python examples of the README and of the docs pages (``docs/*.md``), run as written (so they cannot rot).

Each ```python block runs as its own script in a user's project folder that holds the files the examples name
(``model.gguf``, ``mmproj.gguf``, ``scan-001.png``, ``manifest.csv``; ``s3://bucket/fax-17.pdf`` on the session's
SeaweedFS) and, to prove the ``medvlm`` namespace, its own ``tasks.py`` and ``flows/`` package. The scripts talk to
the session's Prefect test server. A block that appears word for word in several files (the README's examples are
also on the Getting started page) runs once; a failure names every file that holds it. Python snippets that are not
meant to run are fenced ```pycon or ```text.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from PIL import Image

from conftest import write_manifest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A fence opens at the start of a line with exactly ```python and closes at the next line-leading ```.
FENCE = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def _blocks() -> dict[str, list[str]]:
    """Each distinct block's code -> where it appears (``file #n``, n counting that file's python blocks from 1)."""
    found: dict[str, list[str]] = {}
    for page in PAGES:
        for number, code in enumerate(FENCE.findall(page.read_text(encoding="utf-8")), start=1):
            found.setdefault(code, []).append(f"{page.relative_to(ROOT)} #{number}")
    return found


BLOCKS = _blocks()

pytestmark = pytest.mark.e2e


@pytest.fixture
def project(tmp_path, tiny_llava, demo_docs, s3_server, s3):
    """A user's project folder with the examples' files, its own ``tasks.py`` and ``flows/``."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "model.gguf").symlink_to(tiny_llava.model_path)
    (folder / "mmproj.gguf").symlink_to(tiny_llava.mmproj_path)
    (folder / "documents").symlink_to(tmp_path / "documents")
    Image.open(tmp_path / "documents" / Path(demo_docs[0]["image_uri"]).name).save(folder / "scan-001.png")
    write_manifest(folder / "manifest.csv", demo_docs)
    # the invoke convention's tasks.py and a flows/ package of the user's own
    (folder / "tasks.py").write_text("def build(c):\n    pass\n")
    (folder / "flows").mkdir()
    (folder / "flows" / "__init__.py").write_text("")
    s3_server.create_bucket("bucket")
    pdf = tmp_path / "fax-17.pdf"
    pages = [Image.new("RGB", (400, 500), "white"), Image.new("RGB", (400, 500), "lightgray")]
    pages[0].save(pdf, save_all=True, append_images=pages[1:])
    s3.put(str(pdf), "bucket/fax-17.pdf")
    return folder


def run_example(folder: Path, number: int, code: str, where: list[str]) -> str:
    from prefect.settings import PREFECT_API_URL

    script = folder / f"example_{number}.py"
    script.write_text(code)
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    done = subprocess.run([sys.executable, script.name], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, (
        f"example in {', '.join(where)} failed:\n{code}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


def test_docs_have_the_examples():
    readme = FENCE.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    assert any("MedicalVisionLLM" in code for code in readme), "the README lost its Python API example"
    assert any("@flow" in code for code in readme), "the README lost its composed-flow example"
    assert len(BLOCKS) >= 3, "the docs lost their Python examples (API, composed flow, prefect-aws block)"


def test_docs_python_examples_run(project, demo_docs):
    for number, (code, where) in enumerate(BLOCKS.items()):
        out = run_example(project, number, code, where)
        if "MedicalVisionLLM" in code:
            # scan-001.png (1 page) and fax-17.pdf (2 pages), then the manifest's documents
            assert out.count("ok") >= 3 and "fax-17" in out, f"{', '.join(where)}:\n{out}"
            assert f"{len(demo_docs)} pages; 0 manifest rows refused" in out, f"{', '.join(where)}:\n{out}"
        if "@flow" in code:
            rows = ds.dataset(project / "out" / "completions", partitioning="hive").to_table().to_pylist()
            assert sorted(r["document_id"] for r in rows) == sorted(d["document_id"] for d in demo_docs), where
            assert out.strip().endswith(f"{{'ok': {len(demo_docs)}}}"), f"{', '.join(where)}:\n{out}"
