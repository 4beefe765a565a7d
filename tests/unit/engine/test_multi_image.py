"""Requests with several page images (a document in one prompt) and with none (a text-only prompt): the batched
engine's answers at temperature 0 equal llama-cpp-python's own multi-image chat completion, mixed in one batch
with single pages; a document's prompt is its pages' image tokens plus the text; a document too long for a
sequence is a context_overflow that gives the counts, and one that runs to the end of its sequence stops at its
KV cells (Qwen: more cells than positions). Also the memory plan's document functions."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

from medvlm_core import errors
from medvlm_core.engine import BatchedEngine, Request, VisionEngine
from medvlm_core.engine.encoding import overflow_counts
from medvlm_core.errors import DocumentError, RunError
from medvlm_core.inputs.images import to_data_uri
from medvlm_core.model import memory_plan
from medvlm_core.run.params import EngineConfig, GenerationParams
from medvlm_core.testing.demo_docs import DOCUMENTS, render_document

PARAMS = GenerationParams(max_tokens=12)
DOC_PROMPT = "Analyze this clinical document. List the diagnoses and the medications."


@pytest.fixture(scope="module")
def prefect_server():
    """Overrides the session's autouse Prefect test server: nothing here uses Prefect."""
    yield


@pytest.fixture(scope="module")
def pages():
    """Three document pages and two smaller plain pages (different sizes: different image token counts for Qwen;
    LLaVA resizes every page to one size). Half-size documents keep Qwen's image tokens few on a CPU."""
    docs = [render_document(d["title"], d["lines"]).resize((500, 650)) for d in DOCUMENTS.values()]
    small = []
    for i in range(2):
        image = Image.new("RGB", (300 + 60 * i, 420), (40 * i, 90, 200))
        ImageDraw.Draw(image).rectangle((20, 30 + 40 * i, 200, 90 + 40 * i), fill=(250, 20 * i, 60))
        small.append(image)
    return docs + small


def llama_cpp_completion(engine: VisionEngine, images, prompt: str, params: GenerationParams) -> dict:
    """A plain llama-cpp-python chat completion: one image_url part per image, then the text, temperature 0."""
    content = [{"type": "image_url", "image_url": {"url": to_data_uri(image)}} for image in images]
    return engine.llm.create_chat_completion(
        messages=[{"role": "user", "content": content + [{"type": "text", "text": prompt}]}],
        temperature=0, max_tokens=params.max_tokens, repeat_penalty=params.repeat_penalty, top_k=params.top_k,
        top_p=params.top_p, min_p=params.min_p, seed=params.seed,
    )


def mixed_requests(pages) -> list[Request]:
    """Documents of three pages (one in page order, one shuffled), single pages and text-only prompts, mixed."""
    return [
        Request("doc", tuple(pages[:3]), DOC_PROMPT, PARAMS),
        Request("page-3", pages[3], "Read the page.", PARAMS),
        Request("text", None, "Merge these page answers: aspirin; aspirin; metformin.", PARAMS),
        Request("doc-mixed", [pages[4], pages[0], pages[3]], DOC_PROMPT, PARAMS),
        Request("page-0", pages[0], "Read the page.", PARAMS),
        Request("text-2", (), "Summarise: no images.", PARAMS),
        Request("page-4", pages[4], "Read the page.", PARAMS),
    ]


@pytest.mark.parametrize("family, chat_format", [("llava", "llava-1-5"), ("llava", "mtmd"), ("qwen", "qwen2.5-vl")])
def test_documents_and_text_only_prompts_match_llama_cpp_python(request, pages, family, chat_format):
    """n_batch 32: every image goes into its slot in several slices, with decode steps of the others between."""
    model = request.getfixturevalue(f"tiny_{family}")
    config = EngineConfig(str(model.model_path), str(model.mmproj_path), n_ctx=4096, n_batch=32)
    engine = VisionEngine(config, chat_format).start()
    try:
        requests = mixed_requests(pages)
        reference = {r.key: llama_cpp_completion(engine, r.images, r.prompt, r.params) for r in requests}
        texts = {key: response["choices"][0]["message"]["content"] for key, response in reference.items()}
        assert len(set(texts.values())) > 2  # the images make a difference: the equality below is not vacuous
        # VisionEngine.generate is the same completion
        assert {r.key: engine.generate(r.image, r.prompt, r.params).text for r in requests} == texts
        for n_seq, overlap, workers in ((2, False, 1), (3, True, 2)):
            batched = BatchedEngine(engine, n_seq=n_seq, ctx_per_seq=2048, overlap=overlap, encode_workers=workers)
            try:
                got = dict(batched.generate_many(iter(requests)))
            finally:
                batched.close()
            assert {key: g.text for key, g in got.items()} == texts, (n_seq, overlap, workers)
            # usage.prompt_tokens is llama-cpp-python's count: tokens, or for Qwen's M-RoPE the positions
            assert {key: g.prompt_tokens for key, g in got.items()} == {
                key: response["usage"]["prompt_tokens"] for key, response in reference.items()}
            assert all(g.completion_tokens == PARAMS.max_tokens and g.finish_reason == "length" for g in got.values())
    finally:
        engine.close()


@pytest.mark.parametrize("family, chat_format", [("llava", "llava-1-5"), ("qwen", "qwen2.5-vl")])
def test_a_documents_prompt_is_its_pages_image_tokens_plus_the_text(request, pages, family, chat_format):
    """Counted two ways: KV cells (libmtmd's tokens, what must fit n_ctx) and the Generation's prompt_tokens, which
    for LLaVA are the same tokens and for Qwen (M-RoPE) llama-cpp-python's positions (an image takes fewer positions
    than tokens): each is additive on its own, and the two are not compared with each other."""
    model = request.getfixturevalue(f"tiny_{family}")
    engine = VisionEngine(EngineConfig(str(model.model_path), str(model.mmproj_path), n_ctx=4096), chat_format).start()
    batched = BatchedEngine(engine, n_seq=2, ctx_per_seq=4096, overlap=False)
    params = GenerationParams(max_tokens=1)
    document = (pages[0], pages[3], pages[4])
    try:
        def cells(images) -> int:
            encoded = batched._encoder.encode(Request(0, images, DOC_PROMPT, params))
            encoded.free(batched._mtmd)
            return encoded.n_tokens

        def positions(images) -> int:
            return dict(batched.generate_many([Request(0, images, DOC_PROMPT, params)]))[0].prompt_tokens

        for count in (cells, positions):
            text = count(None)
            per_page = [count(page) - text for page in document]  # each page's image tokens (with its marker's)
            assert min(per_page) > 0
            if family == "qwen":  # its image tokens follow the page's size
                assert len(set(per_page)) > 1
            assert count(document) == text + sum(per_page), count.__name__
        if family == "qwen":
            assert positions(document) < cells(document)
        else:
            assert positions(document) == cells(document)
    finally:
        batched.close()
        engine.close()


def test_a_document_too_long_for_a_sequence_is_a_context_overflow_with_the_counts(tiny_llava, pages):
    engine = VisionEngine(EngineConfig(str(tiny_llava.model_path), str(tiny_llava.mmproj_path), n_ctx=256),
                          "llava-1-5").start()
    batched = BatchedEngine(engine, n_seq=2, ctx_per_seq=256, overlap=True, encode_workers=1)
    try:
        requests = [Request("page", pages[0], "Read.", PARAMS), Request("doc", tuple(pages[:3]), "Read.", PARAMS),
                    Request("text", None, "Read.", PARAMS)]
        got = dict(batched.generate_many(iter(requests)))
        assert got["page"].completion_tokens == PARAMS.max_tokens and got["text"].completion_tokens > 0
        overflow = got["doc"]
        assert isinstance(overflow, DocumentError) and overflow.error_type == errors.CONTEXT_OVERFLOW
        needed, fits = overflow_counts(overflow)
        assert fits == 255 and needed > fits and "3 images" in overflow.message
        page_tokens = got["page"].prompt_tokens - got["text"].prompt_tokens
        assert needed == got["text"].prompt_tokens + 3 * page_tokens  # the three pages are the same size
        assert overflow_counts(overflow.message) == (needed, fits)  # what crosses the isolated engine's pipe

        with pytest.raises(DocumentError) as caught:  # the reference path says how many at least, and n_ctx
            engine.generate(tuple(pages[:3]), "Read.", PARAMS)
        assert caught.value.error_type == errors.CONTEXT_OVERFLOW
        at_least, n_ctx = overflow_counts(caught.value)
        assert n_ctx == 256 and at_least > n_ctx
    finally:
        batched.close()
        engine.close()
    assert overflow_counts(DocumentError(errors.INFERENCE_ERROR, "llama.cpp failed")) is None


def test_a_qwen_document_that_runs_to_the_end_of_its_sequence_stops_at_its_cells(tiny_qwen, pages):
    """M-RoPE images take fewer positions than KV cells: a sequence must stop when its cells run out ("length"),
    not when its positions would (llama.cpp then finds no KV cell and the whole batch's decode fails)."""
    engine = VisionEngine(EngineConfig(str(tiny_qwen.model_path), str(tiny_qwen.mmproj_path), n_ctx=1024),
                          "qwen2.5-vl").start()
    batched = BatchedEngine(engine, n_seq=2, ctx_per_seq=512, overlap=False)
    try:
        document = Request("doc", tuple(pages[:3]), "Read.", GenerationParams(max_tokens=-1))
        encoded = batched._encoder.encode(document)
        encoded.free(batched._mtmd)
        got = dict(batched.generate_many([document, Request("page", pages[3], "Read.", PARAMS)]))
        answer = got["doc"]
        assert not isinstance(answer, DocumentError), answer
        assert answer.finish_reason == "length" and answer.prompt_tokens < encoded.n_tokens  # positions < cells
        assert encoded.n_tokens + answer.completion_tokens == batched.ctx_per_seq  # every cell used, none more
        assert got["page"].completion_tokens == PARAMS.max_tokens
    finally:
        batched.close()
        engine.close()


def test_memory_plan_for_documents(tiny_qwen):
    config = EngineConfig(str(tiny_qwen.model_path), str(tiny_qwen.mmproj_path), n_ctx=2048, n_parallel=8,
                          n_gpu_layers=0, encode_workers=1)
    assert memory_plan.document_n_ctx(pages=3, image_tokens_per_page=400, text_tokens=60, max_tokens=512) == 1792
    # one page per request: exactly the page-scope plan
    page = memory_plan.plan_memory(config, budget_mb=4096)
    assert memory_plan.plan_document_memory(config, 1, 400, budget_mb=4096) == page
    assert memory_plan.document_host_mb(config, 1, 400, page_pixels=1_000_000) == 0
    # each page beyond the first adds its embeddings (and, isolated, its pixels) per request held
    one, two = (memory_plan.document_host_mb(config, n, 400, page_pixels=1_000_000) for n in (2, 3))
    assert one > 0 and two == pytest.approx(2 * one)
    assert memory_plan.document_host_mb(config.replace(isolate=False), 3, 400, page_pixels=1_000_000) < two
    # a host budget that holds the page plan of 8 sequences but not 8 sequences of 12-page documents: fewer
    host = memory_plan.document_host_mb(config, 12, 400, page_pixels=1_000_000)
    tight = page.needed_mb + host / 2
    plan = memory_plan.plan_document_memory(config, 12, 400, page_pixels=1_000_000, budget_mb=tight)
    assert page.n_parallel == 8 and 1 <= plan.n_parallel < 8 and plan.needed_mb <= tight
    # one sequence of pages fits, one of documents does not: the error says so
    alone = memory_plan.plan_memory(config.replace(n_parallel=1), budget_mb=4096).needed_mb
    with pytest.raises(RunError, match="12-page document"):
        memory_plan.plan_document_memory(config, 12, 400, page_pixels=1_000_000, budget_mb=alone + 1)
