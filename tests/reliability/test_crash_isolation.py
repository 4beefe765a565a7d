"""Native-crash isolation (medvlm_core.isolated): a real ``ggml_abort`` in the inference child process costs
only the culprit page (an ``engine_crash`` error row), or the culprit request when it holds a document's pages;
the other pages in flight are re-run alone and get the same answers as the in-process batched engine; too many
crashes fail the run loudly.

The crashes are llama.cpp's own abort, injected by a ``NativeAbort`` fault handed to the engine, which
passes it to its spawned child.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from medvlm_core import errors
from medvlm_core.engine import BatchedEngine, IsolatedEngine, Request, SharedStream, VisionEngine
from medvlm_core.engine.shared_pixels import (
    BlockPool,
    page_request,
    read_pages,
    read_pixels,
    release_block,
    shared_block_prefix,
)
from medvlm_core.errors import DocumentError, RunError
from medvlm_core.run.params import EngineConfig, GenerationParams
from medvlm_core.testing.faults import NativeAbort, Stall
from support.reliability_report import record

N_PAGES = 10
PROMPT = "Read the page."
PARAMS = GenerationParams(max_tokens=6)
CRASH = "the inference process died (SIGABRT) while processing this page"


@pytest.fixture(scope="module")
def prefect_server():
    """Overrides the session's autouse Prefect test server: nothing here uses Prefect."""
    yield


@pytest.fixture(autouse=True)
def no_backtrace(monkeypatch):
    """No gdb backtrace on abort (ggml would attach a debugger)."""
    monkeypatch.setenv("GGML_NO_BACKTRACE", "1")


@pytest.fixture(scope="module")
def pages():
    out = []
    for i in range(N_PAGES):
        image = Image.new("RGB", (200, 260), (25 * i, 90, 200 - 15 * i))
        ImageDraw.Draw(image).rectangle((10 + 8 * i, 20, 60 + 8 * i, 80 + 10 * i), fill=(255 - 20 * i, 30, 60))
        out.append(image)
    return out


@pytest.fixture(scope="module")
def config(tiny_llava):
    return EngineConfig(str(tiny_llava.model_path), str(tiny_llava.mmproj_path), n_ctx=1024, n_parallel=3)


@pytest.fixture(scope="module")
def expected(config, pages):
    """The pages' answers from the batched engine in this process (no isolation)."""
    engine = VisionEngine(config, "llava-1-5").start()
    batched = BatchedEngine(engine, n_seq=config.n_parallel, ctx_per_seq=config.n_ctx, overlap=config.overlap_encode)
    try:
        got = dict(batched.generate_many(Request(i, p, PROMPT, PARAMS) for i, p in enumerate(pages)))
    finally:
        batched.close()
        engine.close()
    assert all(not isinstance(r, DocumentError) for r in got.values())
    return {i: r.text for i, r in got.items()}


def requests(pages, n=N_PAGES):
    return (Request(("page", i), pages[i], PROMPT, PARAMS) for i in range(n))


def shared_blocks() -> set[str]:
    """This process's shared-memory blocks that exist now (POSIX shared memory lives in /dev/shm)."""
    if not Path("/dev/shm").is_dir():
        return set()
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(shared_block_prefix())}


def test_the_culprit_page_gets_an_engine_crash_error_and_the_others_their_answers(config, pages, expected):
    before = shared_blocks()
    with IsolatedEngine(config, "llava-1-5", fault=NativeAbort(on=frozenset({4}))) as engine:
        results = dict(engine.generate_many(requests(pages)))
        # every page's pixel block, the crashed ones' too, is back in the engine's pool (none leaked), ...
        pooled = shared_blocks() - before
        assert len(pooled) == engine.pixel_blocks.free == engine.pixel_blocks.created <= engine.window
        assert sorted(results) == [("page", i) for i in range(N_PAGES)]
        crashed = results.pop(("page", 4))
        assert isinstance(crashed, DocumentError)
        assert (crashed.error_type, crashed.message) == (errors.ENGINE_CRASH, CRASH)
        assert {key[1]: r.text for key, r in results.items()} == {i: t for i, t in expected.items() if i != 4}
        # one crash in the batch, one in the culprit's solo run: a new child after each
        assert (engine.crashes, engine.restarts) == (2, 2)
        assert engine.loaded
    assert shared_blocks() == before  # ... and closing the engine frees them
    record("native abort: culprit page, isolated engine", inputs=N_PAGES, faults={"SIGABRT": 2},
           rows_lost=N_PAGES - 1 - len(results))


def test_a_page_that_crashes_once_succeeds_alone_after_the_restart(config, pages, expected):
    pulled, finished = [], []

    def source():
        for request in requests(pages):
            assert len(pulled) - len(finished) <= engine.window  # lazy, bounded intake
            pulled.append(request.key)
            yield request

    with IsolatedEngine(config, "llava-1-5", fault=NativeAbort(once=frozenset({2}))) as engine:
        results = {}
        for key, result in engine.generate_many(source()):
            finished.append(key)
            results[key] = result
        assert {key[1]: r.text for key, r in results.items()} == expected
        assert (engine.crashes, engine.restarts) == (1, 1)
    record("native abort: innocent page, isolated engine", inputs=N_PAGES, faults={"SIGABRT": 1},
           rows_lost=N_PAGES - len(results))


def test_source_failure_early_stop_and_a_parent_without_llama_cpp(config, pages, expected, tmp_path):
    with IsolatedEngine(config, "llava-1-5") as engine:
        def failing():
            yield from requests(pages, 4)
            raise OSError("manifest source went away")

        got = {}
        with pytest.raises(OSError, match="went away"):
            for key, result in engine.generate_many(failing()):
                got[key] = result
        assert {key[1]: r.text for key, r in got.items()} == {i: expected[i] for i in range(4)}

        stream = engine.generate_many(requests(pages))
        next(stream)
        stream.close()  # pages still in flight: that child is ended, the next call starts another
        again = dict(engine.generate_many(requests(pages, 3)))
        assert {key[1]: r.text for key, r in again.items()} == {i: expected[i] for i in range(3)}
        assert engine.crashes == 0
    assert not engine.loaded
    with pytest.raises(RunError, match="not started"):
        list(engine.generate_many(requests(pages, 1)))

    # The parent never loads llama.cpp (on a GPU it would take VRAM next to the child's).
    script = textwrap.dedent(f"""
        import sys
        from PIL import Image
        from medvlm_core.run.params import EngineConfig, GenerationParams
        from medvlm_core.engine import IsolatedEngine, Request

        if __name__ == "__main__":
            config = EngineConfig({config.model_path!r}, {config.mmproj_path!r}, n_ctx=1024)
            with IsolatedEngine(config, "llava-1-5") as engine:
                out = list(engine.generate_many([Request(0, Image.new("RGB", (64, 64)), "Read.", GenerationParams(max_tokens=2))]))
            print(len(out), out[0][1].completion_tokens, "llama_cpp" in sys.modules)
    """)
    (tmp_path / "parent.py").write_text(script)
    proc = subprocess.run([sys.executable, str(tmp_path / "parent.py")], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1", "2", "False"]


def test_a_model_that_does_not_load_is_a_clear_run_error(config, tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a GGUF file\n" * 512)
    engine = IsolatedEngine(EngineConfig(str(garbage), config.mmproj_path, n_ctx=1024), "llava-1-5")
    with pytest.raises(RunError) as caught:
        engine.start()
    message = str(caught.value)
    assert str(garbage) in message
    assert "Traceback" not in message and "\n" not in message
    assert not engine.loaded
    engine.close()


def test_more_crashes_than_max_restarts_fail_the_run(config, pages):
    engine = IsolatedEngine(config, "llava-1-5", max_restarts=1, fault=NativeAbort(on=frozenset({0}))).start()
    got = {}
    try:
        with pytest.raises(RunError, match="keeps dying") as caught:
            for key, result in engine.generate_many(requests(pages)):
                got[key] = result
        # the culprit's row is handed out before the run fails
        assert isinstance(got[("page", 0)], DocumentError) and got[("page", 0)].error_type == errors.ENGINE_CRASH
        assert "SIGABRT" in str(caught.value) and engine.crashes == 2
        assert not engine.loaded
        with pytest.raises(RunError, match="keeps dying"):
            list(engine.generate_many(requests(pages, 1)))
    finally:
        engine.close()


@pytest.mark.parametrize("through", ["engine", "shared stream"])
def test_a_page_that_hangs_becomes_a_timeout_error_and_the_others_their_answers(config, pages, expected, through):
    """Through a SharedStream the parent polls the child every few ms once the caller has given its last page
    (``NOT_YET``): the hang deadline still counts the child's silence, not the polls."""
    quick = config.replace(page_timeout=4.0)
    with IsolatedEngine(quick, "llava-1-5", fault=Stall(on=frozenset({4}))) as engine:
        front = SharedStream(engine) if through == "shared stream" else engine
        try:
            results = dict(front.generate_many(requests(pages)))
        finally:
            if through == "shared stream":
                front.close()
        hung = results.pop(("page", 4))
        assert isinstance(hung, DocumentError) and hung.error_type == errors.TIMEOUT and "4 s" in hung.message
        assert {key[1]: r.text for key, r in results.items()} == {i: t for i, t in expected.items() if i != 4}
        assert engine.crashes == 2 and engine.loaded  # the hung child in the batch, then alone; a new one after each
    record(f"hung page (stalled child), isolated {'engine' if through == 'engine' else '+ stream'}", inputs=N_PAGES, faults={"stall": 2},
           rows_lost=N_PAGES - 1 - len(results))


def test_pixels_go_through_shared_memory_or_the_pipe_when_it_cannot_be_made(config, pages, expected, monkeypatch):
    from multiprocessing import shared_memory

    message, block = page_request(7, 0, Request("k", pages[0], PROMPT, PARAMS))
    try:
        assert message.pixels is None and message.shared == block.name  # the pipe carries only the block's name
        assert block.name in shared_blocks()  # named for this process
        assert read_pixels(message) == pages[0].tobytes()
    finally:
        release_block(block)
    assert block.name not in shared_blocks()

    def no_shared_memory(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shared_memory, "SharedMemory", no_shared_memory)
    with IsolatedEngine(config, "llava-1-5") as engine:
        results = dict(engine.generate_many(requests(pages, 4)))
    assert {key[1]: r.text for key, r in results.items()} == {i: expected[i] for i in range(4)}


def test_pixel_blocks_are_reused_from_page_to_page_and_freed_at_close(config, pages, expected):
    before = shared_blocks()
    pool = BlockPool(keep=2)
    first = pool.take(5)
    assert first.size >= 5 and first.name in shared_blocks()
    pool.give(first)
    assert pool.take(3).name == first.name  # the smallest free block that fits is reused
    big = pool.take(BlockPool.GRAIN + 1)  # a larger page: a new block
    assert big.size >= BlockPool.GRAIN + 1 and pool.created == 2
    extra = pool.take(1)
    for block in (first, big, extra):
        pool.give(block)  # the third is past `keep`: unlinked at once
    assert pool.free == 2 and len(shared_blocks() - before) == 2
    pool.close()
    pool.give(pool.take(1))  # given back after close: unlinked too
    assert shared_blocks() == before

    with IsolatedEngine(config, "llava-1-5") as engine:
        one = dict(engine.generate_many(requests(pages, 4)))
        made = engine.pixel_blocks.created
        two = dict(engine.generate_many(requests(pages, 4)))
        assert engine.pixel_blocks.created == made <= engine.window  # the second call reused the first call's blocks
    assert {key[1]: r.text for key, r in one.items()} == {key[1]: r.text for key, r in two.items()} == {
        i: expected[i] for i in range(4)}
    assert shared_blocks() == before


# Documents in one request: single pages, two three-page requests (intakes 2 and 5) and a text-only prompt.
DOCUMENT_AT = (2, 5)


def mixed_requests(pages) -> list[Request]:
    out = []
    for i in range(8):
        if i in DOCUMENT_AT:
            out.append(Request(("doc", i), tuple(pages[i:i + 3]), PROMPT, PARAMS))
        elif i == 6:
            out.append(Request(("text", i), None, "Merge: aspirin; aspirin.", PARAMS))
        else:
            out.append(Request(("page", i), pages[i], PROMPT, PARAMS))
    return out


@pytest.fixture(scope="module")
def expected_mixed(config, pages):
    """The mixed requests' answers from the batched engine in this process (no isolation)."""
    engine = VisionEngine(config, "llava-1-5").start()
    batched = BatchedEngine(engine, n_seq=config.n_parallel, ctx_per_seq=config.n_ctx, overlap=config.overlap_encode)
    try:
        got = dict(batched.generate_many(mixed_requests(pages)))
    finally:
        batched.close()
        engine.close()
    assert all(not isinstance(r, DocumentError) for r in got.values())
    assert got[("doc", 2)].prompt_tokens > got[("page", 1)].prompt_tokens  # three images in its prompt
    return {key: r.text for key, r in got.items()}


def test_a_document_request_that_crashes_costs_that_request_only(config, pages, expected_mixed):
    """The three-page request at intake 2 aborts the child every time (in its batch, then alone): an engine_crash
    for it; the others in flight (the other three-page request and the text-only prompt among them) are re-run
    alone and get their answers."""
    before = shared_blocks()
    with IsolatedEngine(config, "llava-1-5", fault=NativeAbort(on=frozenset({DOCUMENT_AT[0]}))) as engine:
        results = dict(engine.generate_many(mixed_requests(pages)))
        # every request's block (one per request, a document's three pages in one) is back in the pool
        assert len(shared_blocks() - before) == engine.pixel_blocks.free == engine.pixel_blocks.created
        crashed = results.pop(("doc", 2))
        assert isinstance(crashed, DocumentError)
        assert (crashed.error_type, crashed.message) == (
            errors.ENGINE_CRASH, "the inference process died (SIGABRT) while processing this request of 3 pages")
        assert {key: r.text for key, r in results.items()} == {
            key: text for key, text in expected_mixed.items() if key != ("doc", 2)}
        # one crash in the batch, one in the culprit's solo run: a new child after each
        assert (engine.crashes, engine.restarts) == (2, 2) and engine.loaded
        again = dict(engine.generate_many(mixed_requests(pages)[:2]))  # it goes on
        assert {key: r.text for key, r in again.items()} == {("page", i): expected_mixed[("page", i)] for i in (0, 1)}
    assert shared_blocks() == before
    record("native abort: culprit 3-page request, isolated engine", inputs=len(expected_mixed),
           faults={"SIGABRT": 2}, rows_lost=len(expected_mixed) - 1 - len(results))


def test_the_deadline_of_a_request_scales_with_its_pages(config, pages, expected_mixed):
    """A child silent for longer than one page's deadline but less than three pages' is not hung while a
    three-page request is in flight (a one-page request would have been: the hang test above)."""
    quick = config.replace(page_timeout=2.0)
    document = mixed_requests(pages)[DOCUMENT_AT[0]]
    with IsolatedEngine(quick, "llava-1-5", fault=Stall(once=frozenset({0}), seconds=2.5)) as engine:
        assert engine.request_timeout(PARAMS, 3) == 3 * engine.page_timeout(PARAMS) == 6.0
        assert engine.request_timeout(PARAMS, 0) == engine.request_timeout(PARAMS, 1) == 2.0  # text-only: one page
        results = dict(engine.generate_many([document]))
        assert results[document.key].text == expected_mixed[document.key] and engine.crashes == 0
    default = IsolatedEngine(config, "llava-1-5")  # not started: the arithmetic only
    assert default.request_timeout(PARAMS, 3) == 3 * (120.0 + 2.0 * PARAMS.max_tokens)


def test_a_documents_pages_go_in_one_block_or_through_the_pipe(pages, monkeypatch):
    from multiprocessing import shared_memory

    document = Request("k", (pages[0], pages[3].convert("P"), pages[7]), PROMPT, PARAMS)
    rgb = [image.convert("RGB") for image in document.images]
    message, block = page_request(1, 0, document)
    try:
        assert message.pixels is None and message.shared == block.name and message.images == 3
        assert message.sizes == tuple(image.size for image in rgb)
        got = read_pages(message)
        assert [(p.width, p.height, bytes(p.data)) for p in got] == [(i.width, i.height, i.tobytes()) for i in rgb]
        assert read_pixels(message) == b"".join(image.tobytes() for image in rgb)
    finally:
        release_block(block)
    assert block.name not in shared_blocks()
    text_only, none = page_request(2, 1, Request("t", None, PROMPT, PARAMS))
    assert none is None and text_only.sizes == () and read_pages(text_only) == ()

    def no_shared_memory(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shared_memory, "SharedMemory", no_shared_memory)
    message, block = page_request(3, 2, document)
    assert block is None and message.shared is None
    assert [bytes(p.data) for p in read_pages(message)] == [image.tobytes() for image in rgb]
