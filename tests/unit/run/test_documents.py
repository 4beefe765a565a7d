"""Document scope (``medvlm_core.run.documents``): one answer per document from all its pages, with real llama.cpp
on generated models (LLaVA-style: a fixed 64 image tokens a page; Qwen-style: tokens that follow the pixels)."""

from __future__ import annotations

import pyarrow.dataset as ds
import pytest

from conftest import batch, write_manifest
from medvlm_core.analytics import query
from medvlm_core.api import MedicalVisionLLM
from medvlm_core.evals.scoring import evaluate
from medvlm_core.run.documents import document_chunks, group_documents
from medvlm_core.storage import Storage
from medvlm_core.testing.demo_docs import render_document, write_demo_multipage

SMALL = 160_000  # pixels a page: Qwen-style tiny model ~ 7 x 9 = 63 image tokens a page


def read(output, table: str) -> list[dict]:
    return ds.dataset(output / table, format="parquet", partitioning="hive").to_table().to_pylist()


def tiff(path, count: int, changed: int | None = None):
    """A ``count``-page TIFF of distinct pages (page ``changed`` drawn differently)."""
    pages = [render_document(f"Page {i + 1}" + (" (amended)" if i + 1 == changed else ""), [f"line {i}"] * 3,
                             size=(500, 650)) for i in range(count)]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    return path


@pytest.fixture
def three_pages(tmp_path):
    """The demo's three-page discharge summary (a PDF) and its manifest."""
    record = write_demo_multipage(tmp_path / "documents")
    return write_manifest(tmp_path / "m.csv", [record]), record


def test_a_three_page_pdf_is_answered_in_one_prompt(tmp_path, tiny_llava, three_pages):
    manifest, record = three_pages
    first_page = write_manifest(tmp_path / "p1.csv", [dict(record, document_id="first-page", page=1)])
    common = dict(max_tokens=6, n_ctx=2048, seed=3, temperature=0.0)
    with MedicalVisionLLM.load(str(tiny_llava.model_path), str(tiny_llava.mmproj_path), scope="document",
                               **common) as vlm:
        [doc] = vlm.transform(str(manifest)).completions.to_pylist()
        [one] = vlm.transform(str(first_page)).completions.to_pylist()
    with MedicalVisionLLM.load(str(tiny_llava.model_path), str(tiny_llava.mmproj_path), **common) as vlm:
        pages = vlm.transform(str(manifest)).completions.to_pylist()
    assert (doc["scope"], doc["page"], doc["pages"], doc["method"], doc["status"]) == (
        "document", None, [1, 2, 3], "single_prompt", "ok")
    assert doc["document_id"] == record["document_id"] and doc["image_token_budget"] is None
    assert (one["pages"], one["page_count"]) == ([1], 3)
    assert [p["scope"] for p in pages] == ["page"] * 3
    # the same prompt with three pages' images instead of one: two more pages of 64 image tokens each
    assert 2 * 64 <= doc["prompt_tokens"] - one["prompt_tokens"] <= 2 * 64 + 8, (doc["prompt_tokens"],
                                                                               one["prompt_tokens"])


def test_a_long_tiff_is_answered_by_map_reduce_reusing_page_rows(tmp_path, tiny_llava):
    path = tiff(tmp_path / "long.tif", 12)
    manifest = write_manifest(tmp_path / "m.csv", [{"document_id": "long", "image_uri": str(path)}])
    out = tmp_path / "out"
    files = dict(model=str(tiny_llava.model_path), mmproj=str(tiny_llava.mmproj_path), prompt="Read.")
    first = batch(str(manifest), str(out), max_tokens=6, **files)
    assert first["pages_ok"] == 12
    # 12 x 64 image tokens do not fit 512: each page (already answered: reused), then a consolidation
    second = batch(str(manifest), str(out), max_tokens=6, n_ctx=512, scope="document", **files)
    rows = read(out, "completions")
    pages = [r for r in rows if r["scope"] == "page"]
    [doc] = [r for r in rows if r["scope"] == "document"]
    assert sorted(r["page"] for r in pages) == list(range(1, 13))  # no page answered twice
    assert (doc["method"], doc["status"], doc["pages"]) == ("map_reduce", "ok", list(range(1, 13))), doc["error_message"]
    assert (second["skipped_pages"], second["pages_ok"], second["reconciled"]) == (12, 0, True)
    [run] = [r for r in read(out, "runs") if r["run_id"] == second["run_id"]]
    assert (run["scope"], run["documents_ok"], run["documents_error"]) == ("document", 1, 0)

    # a rerun adds no row; a changed page gives a new document key (and its pages new page keys)
    third = batch(str(manifest), str(out), max_tokens=6, n_ctx=512, scope="document", **files)
    assert len(read(out, "completions")) == len(rows) and third["skipped_rows"] == 1
    tiff(path, 12, changed=2)
    batch(str(manifest), str(out), max_tokens=6, n_ctx=512, scope="document", **files)
    docs = [r for r in read(out, "completions") if r["scope"] == "document"]
    assert len(docs) == 2 and docs[0]["result_key"] != docs[1]["result_key"]
    current = query(str(out), "select scope, count(*) as n from completions_current "
                              "where document_id = 'long' group by scope order by scope", Storage()).to_pylist()
    assert current == [{"scope": "document", "n": 1}, {"scope": "page", "n": 12}]
    [status] = query(str(out), "select * from document_status where document_id = 'long'", Storage()).to_pylist()
    assert (status["pages"], status["ok"], status["document_answers"], status["document_ok"]) == (12, 12, 1, 1)

    # a gold row with an empty page labels the whole document: scored against the document answer of a
    # document-scope run, and against all the page answers together in a page-scope run
    gold = write_manifest(tmp_path / "gold.csv", [{"document_id": "long", "page": "", "table": "diagnoses",
                                                   "name": "pneumonia"}])
    for run_id in (second["run_id"], first["run_id"]):
        [scores] = evaluate(str(out), str(gold), Storage(), run_ids=[run_id]).systems
        [result] = scores.page_results
        assert (result.document_id, result.page, result.status) == ("long", 0, "ok")
        assert scores.pages == {"ok": [1, 1]}


def test_a_reduce_that_does_not_fit_is_done_in_a_tree(tmp_path, tiny_llava):
    path = tiff(tmp_path / "long.tif", 12)
    manifest = write_manifest(tmp_path / "m.csv", [{"document_id": "long", "image_uri": str(path)}])
    out = tmp_path / "out"
    summary = batch(str(manifest), str(out), model=str(tiny_llava.model_path), mmproj=str(tiny_llava.mmproj_path),
                    prompt="Read.", max_tokens=40, n_ctx=600, scope="document", document_method="map_reduce")
    [doc] = [r for r in read(out, "completions") if r["scope"] == "document"]
    pages = [r for r in read(out, "completions") if r["scope"] == "page"]
    assert len(pages) == 12 and summary["pages_ok"] == 12
    assert (doc["method"], doc["status"]) == ("map_reduce", "ok"), doc["error_message"]
    # the page answers alone (one token each at least a byte, plus their labels) exceed what one consolidation
    # prompt can hold beside its answer: the document was consolidated in parts first
    assert sum(p["completion_tokens"] for p in pages) + 12 * 8 > 600 - 40


def test_the_reduce_tree_consolidates_halves_until_they_fit():
    """The rounds of a reduce, on an engine that refuses prompts of more than two parts (a fake engine: the
    real one is in the test above)."""
    from medvlm_core.engine.types import Generation
    from medvlm_core.errors import DocumentError
    from medvlm_core.inputs.manifest import ManifestRow
    from medvlm_core.inputs.prompts import Prompt
    from medvlm_core.run.documents import Document, _reduce

    asked = []

    class TwoParts:
        def generate_many(self, requests):
            for r in requests:
                parts = r.prompt.count("\n\nPage")  # "Page 3:" and "Pages 1-4:" labels
                asked.append(parts)
                if parts > 2:
                    yield r.key, DocumentError("context_overflow", "does not fit")
                else:
                    yield r.key, Generation(f"<{parts}>", "stop", 10, 2, 1.0)

    doc = Document([ManifestRow(1, "d", "/d.tif")], Prompt("custom", "Read."), numbers=list(range(1, 9)))
    doc.answers = {p: f"answer {p}" for p in doc.numbers}
    doc.key = "k" * 64
    spec = _spec()
    [row] = list(_reduce(TwoParts(), [doc], spec, None))
    assert row["status"] == "ok" and row["completion"] == "<2>"
    # 8 parts do not fit: each half (4: does not fit either, so its quarters, then the two quarters' answers)
    # is consolidated, then the two halves' answers together
    assert asked == [8, 4, 2, 2, 2, 4, 2, 2, 2, 2]


def _spec():
    from medvlm_core.inputs.prompts import Prompt
    from medvlm_core.model.files import ModelIdentity
    from medvlm_core.output.paths import OutputLayout
    from medvlm_core.run.params import EngineConfig, EngineOptions, GenerationParams, ImageOptions
    from medvlm_core.run.spec import RunSpec

    return RunSpec("r1", OutputLayout.of("/tmp/out"), EngineConfig.of("/m.gguf", "/p.gguf", EngineOptions()),
                   ModelIdentity("m", "a" * 64, "b" * 64, "llava-1-5"), GenerationParams(), ImageOptions(),
                   Prompt("custom", "Read."), "{}")


def test_the_image_token_budget_is_lowered_to_make_a_document_fit(tmp_path, tiny_qwen):
    path = tiff(tmp_path / "doc.tif", 3)
    manifest = write_manifest(tmp_path / "m.csv", [{"document_id": "doc", "image_uri": str(path)}])
    files = (str(tiny_qwen.model_path), str(tiny_qwen.mmproj_path))
    # three 500 x 650 pages: 9 x 12 = 108 image tokens each at 56 px a token, 324 with the text's ~130 do not fit
    # 400; at 75 tokens a page (376 x 489 pixels, 7 x 9 = 63 tokens) they do
    with MedicalVisionLLM.load(*files, scope="document", prompt="Read.", max_tokens=4, n_ctx=2048) as vlm:
        [roomy] = vlm.transform(str(manifest)).completions.to_pylist()
    with MedicalVisionLLM.load(*files, scope="document", prompt="Read.", max_tokens=4, n_ctx=400) as vlm:
        [tight] = vlm.transform(str(manifest)).completions.to_pylist()
    assert (roomy["method"], roomy["image_token_budget"], roomy["status"]) == ("single_prompt", None, "ok")
    assert (tight["method"], tight["status"]) == ("single_prompt", "ok")
    assert tight["image_token_budget"] is not None and tight["image_token_budget"] >= 64
    assert tight["prompt_tokens"] < roomy["prompt_tokens"] and tight["prompt_tokens"] + 4 <= 400


def test_a_document_over_the_page_limit_is_an_error_row_naming_it(tmp_path, tiny_llava):
    path = tiff(tmp_path / "long.tif", 4)
    manifest = write_manifest(tmp_path / "m.csv", [{"document_id": "long", "image_uri": str(path)}])
    with MedicalVisionLLM.load(str(tiny_llava.model_path), str(tiny_llava.mmproj_path), scope="document",
                               max_tokens=4, max_document_pages=3) as vlm:
        [row] = vlm.transform(str(manifest)).completions.to_pylist()
    assert (row["status"], row["error_type"], row["scope"]) == ("error", "too_large", "document")
    assert "max_document_pages limit 3" in row["error_message"]


def test_the_pages_rows_name_are_the_documents_pages(tmp_path, tiny_llava):
    path = tiff(tmp_path / "long.tif", 5)
    records = [{"document_id": "long", "image_uri": str(path), "page": p} for p in (4, 2)]
    manifest = write_manifest(tmp_path / "m.csv", records)
    with MedicalVisionLLM.load(str(tiny_llava.model_path), str(tiny_llava.mmproj_path), scope="document",
                               max_tokens=4) as vlm:
        [row] = vlm.transform(str(manifest)).completions.to_pylist()
    assert (row["status"], row["pages"], row["page_count"]) == ("ok", [2, 4], 5)


def test_a_documents_rows_stay_in_one_chunk():
    from medvlm_core.inputs.manifest import ManifestRow

    rows = [ManifestRow(row_number=i + 1, document_id=d, image_uri=f"{d}.tif", page=i + 1)
            for i, d in enumerate("aabbbac")]
    assert [[r.row_number for r in g] for g in group_documents(rows)] == [[1, 2, 6], [3, 4, 5], [7]]
    chunks = document_chunks(rows, 2)
    assert [[r.document_id for r in c] for c in chunks] == [["a", "a", "a"], ["b", "b", "b"], ["c"]]
    assert sorted(r.row_number for c in chunks for r in c) == list(range(1, 8))


def test_image_tokens_are_estimated_from_the_projector(tiny_llava):
    from medvlm_core.model.image_tokens import ImageTokens, image_tokens_of

    assert image_tokens_of(str(tiny_llava.mmproj_path)) == ImageTokens("mlp", fixed=64)
    assert ImageTokens("qwen2vl_merger", square=56).estimate(560, 840) == 150
    assert ImageTokens("qwen2vl_merger", square=56).estimate(*_fit(ImageTokens("qwen2vl_merger", square=56)
                                                                   .pixels_for(100), 560, 840)) <= 100


def _fit(pixels: int, width: int, height: int) -> tuple[int, int]:
    from medvlm_core.inputs.images import fit_to_budget

    return fit_to_budget(width, height, pixels)


def test_structured_items_keep_their_evidence_pages_once():
    from medvlm_core.output.structured import document_items, with_page_evidence

    schema = with_page_evidence({"type": "object", "properties": {"medications": {
        "type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}}}})
    assert schema["properties"]["medications"]["items"]["properties"]["pages"]["type"] == "array"
    answer = {"medications": [{"name": "metformin", "pages": [2, 9]}, {"name": "apixaban"},
                              {"name": "metformin", "pages": [3]}, {"name": "metoprolol", "pages": [0, 3, 3]}]}
    items, confidence = document_items(answer, [1, 2, 3], {("medications", 0): 0.9, ("medications", 1): 0.5,
                                                            ("medications", 3): 0.7})
    assert items["medications"] == [{"name": "metformin", "pages": [2, 3]}, {"name": "apixaban", "pages": None},
                                    {"name": "metoprolol", "pages": [3]}]
    assert confidence == {("medications", 0): 0.9, ("medications", 1): 0.5, ("medications", 2): 0.7}


def test_page_scope_is_unchanged_by_default(tmp_path, tiny_llava, demo_docs):
    manifest = write_manifest(tmp_path / "m.csv", demo_docs)
    with MedicalVisionLLM.load(str(tiny_llava.model_path), str(tiny_llava.mmproj_path), max_tokens=3) as vlm:
        rows = vlm.transform(str(manifest)).completions.to_pylist()
    assert {(r["scope"], r["method"], r["pages"]) for r in rows} == {("page", None, None)}


def test_a_documents_page_answers_stand_for_it_in_a_page_scope_run():
    from medvlm_core.evals.answers import Answer
    from medvlm_core.evals.scores import document_answer

    pages = [Answer("d", 1, "ok", None, "k1", "r", "one"), Answer("d", 2, "error", "timeout", "k2", "r", None)]
    merged, parts = document_answer("d", pages, {})
    assert (merged.page, merged.status, merged.error_type, parts) == (0, "error", "timeout", pages)
    whole = Answer("d", None, "ok", None, "kd", "r", "all")
    assert document_answer("d", pages, {"d": whole}) == (whole, [whole])
    assert document_answer("e", [], {}) == (None, [])


def test_structured_at_document_scope_gives_one_answer_with_evidence_pages(tmp_path, tiny_llava, vitals_extraction):
    path = tiff(tmp_path / "doc.tif", 3)
    manifest = write_manifest(tmp_path / "m.csv", [{"document_id": "doc", "image_uri": str(path)}])
    with MedicalVisionLLM.load(str(tiny_llava.model_path), str(tiny_llava.mmproj_path), scope="document",
                               extraction=str(vitals_extraction), max_tokens=120, n_ctx=2048) as vlm:
        result = vlm.transform(str(manifest))
    [doc] = result.completions.to_pylist()
    assert (doc["scope"], doc["method"], doc["status"]) == ("document", "single_prompt", "ok"), doc["error_message"]
    items = result.tables["vitals"].to_pylist()
    assert items and {(i["result_key"], i["page"]) for i in items} == {(doc["result_key"], None)}
    for item in items:  # evidence within the document's pages, or none
        assert item["pages"] is None or set(item["pages"]) <= {1, 2, 3}
    contents = [(i["name"], i["value"]) for i in items]
    assert len(contents) == len(set(contents))  # a repeated item is kept once
