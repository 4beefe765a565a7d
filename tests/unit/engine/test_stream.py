"""One batch alive across chunks (``SharedStream``): overlapping ``generate_many`` calls share one running
stream of the engine, each gets exactly its own answers (equal to the single path), and a caller's failure or
early stop stays its own."""

from __future__ import annotations

import threading
import time

import pyarrow.dataset as ds
import pytest
from PIL import Image

from conftest import batch, write_manifest
from medvlm_core.engine import BatchedEngine, IsolatedEngine, Request, VisionEngine
from medvlm_core.engine.registry import close_shared_engines, current_shared_engine
from medvlm_core.engine.stream import SharedStream
from medvlm_core.run.params import EngineConfig, GenerationParams
from medvlm_core.testing.demo_docs import DOCUMENTS, render_document
from medvlm_core.testing.faults import NativeAbort

PARAMS = GenerationParams(max_tokens=12)


@pytest.fixture(scope="module")
def pages():
    docs = [render_document(d["title"], d["lines"]) for d in DOCUMENTS.values()]
    return docs + [Image.new("RGB", (260 + 30 * i, 380), (25 * i, 110, 190)) for i in range(5)]


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def chunk(first: int, pages, hold_until=None):
    """A chunk's requests (keys ``first``, ``first + 1``, ...); ``hold_until`` keeps it giving until it holds."""
    for i, page in enumerate(pages):
        yield Request(first + i, page, "Read the page.", PARAMS)
    if hold_until is not None:
        wait_for(hold_until, "the next chunk to join")


def run_overlapping(stream: SharedStream, chunks: list[list]) -> list[dict]:
    """Run the chunks as overlapping callers, in order: each holds its last page back until the next has joined."""
    results: list[dict] = [{} for _ in chunks]
    errors: list[BaseException] = []
    joined_before = stream.calls

    def consume(index: int) -> None:
        more = index + 1 < len(chunks)
        next_joined = (lambda: stream.calls >= joined_before + index + 2) if more else None
        try:
            for key, result in stream.generate_many(chunk(100 * index, chunks[index], next_joined)):
                assert key not in results[index]
                results[index][key] = result
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = []
    for index in range(len(chunks)):
        thread = threading.Thread(target=consume, args=(index,))
        thread.start()
        threads.append(thread)
        wait_for(lambda: stream.calls >= joined_before + index + 1, f"chunk {index} to join")
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    return results


@pytest.mark.parametrize("family, chat_format, workers", [("llava", "llava-1-5", 1), ("qwen", "qwen2.5-vl", 3)])
def test_overlapping_chunks_share_one_batch_and_keep_the_answers(request, pages, family, chat_format, workers):
    model = request.getfixturevalue(f"tiny_{family}")
    engine = VisionEngine(EngineConfig(str(model.model_path), str(model.mmproj_path), n_ctx=4096), chat_format).start()
    try:
        single = [engine.generate(p, "Read the page.", PARAMS).text for p in pages]
        batched = BatchedEngine(engine, n_seq=4, ctx_per_seq=2048, encode_workers=workers)
        stream = SharedStream(batched)
        try:
            chunks = [pages[0:3], pages[3:5], pages[5:]]
            results = run_overlapping(stream, chunks)
            # each caller got exactly its own pages, answered as the single path answers them
            for index, part in enumerate(chunks):
                assert sorted(results[index]) == [100 * index + i for i in range(len(part))]
            got = [r.text for part in results for _, r in sorted(part.items())]
            assert got == single
            # one engine stream for the three chunks: no drain between them
            assert (stream.calls, stream.streams_started) == (3, 1)
            assert stream.callers == 0
            # a later call (the stream it joins may or may not have ended by then) is answered the same
            again = dict(stream.generate_many(chunk(0, pages[:2])))
            assert [again[0].text, again[1].text] == single[:2]
            assert stream.calls == 4 and stream.callers == 0
        finally:
            stream.close()
            batched.close()
    finally:
        engine.close()


def test_a_callers_failure_or_early_stop_stays_its_own(tiny_llava, pages):
    engine = VisionEngine(EngineConfig(str(tiny_llava.model_path), str(tiny_llava.mmproj_path), n_ctx=2048),
                          "llava-1-5").start()
    batched = BatchedEngine(engine, n_seq=3, ctx_per_seq=512)
    stream = SharedStream(batched)
    try:
        single = [engine.generate(p, "Read the page.", PARAMS).text for p in pages[:6]]
        outcome: dict[str, object] = {}

        def failing():
            yield Request(0, pages[0], "Read the page.", PARAMS)
            yield Request(1, pages[1], "Read the page.", PARAMS)
            wait_for(lambda: stream.callers >= 3, "the other chunks to join")
            raise OSError("the manifest source went away")

        def run_failing():
            got = {}
            try:
                for key, result in stream.generate_many(failing()):
                    got[key] = result
            except OSError as exc:
                outcome["failing"] = (got, str(exc))

        def run_stopping():
            it = stream.generate_many(chunk(10, pages[2:6]))
            outcome["stopping"] = next(it)
            it.close()  # the consumer stops early: its other pages' results are dropped

        def run_whole():
            outcome["whole"] = dict(stream.generate_many(chunk(20, pages[2:6])))

        threads = [threading.Thread(target=run_failing)]
        threads[0].start()
        wait_for(lambda: stream.callers >= 1, "the first chunk")
        for target in (run_stopping, run_whole):
            threads.append(threading.Thread(target=target))
            threads[-1].start()
        for thread in threads:
            thread.join(timeout=300)
        got, message = outcome["failing"]
        assert message == "the manifest source went away"
        assert {k: r.text for k, r in got.items()} == {0: single[0], 1: single[1]}  # answered before it raised
        key, first = outcome["stopping"]
        assert key in range(10, 14) and first.text == single[key - 8]
        assert {k: r.text for k, r in outcome["whole"].items()} == {20 + i: single[2 + i] for i in range(4)}
        assert stream.callers == 0
    finally:
        stream.close()
        batched.close()
        engine.close()


def test_a_crash_in_the_child_across_chunks(tiny_qwen, pages, monkeypatch):
    monkeypatch.setenv("GGML_NO_BACKTRACE", "1")
    config = EngineConfig(str(tiny_qwen.model_path), str(tiny_qwen.mmproj_path), n_ctx=2048, n_parallel=3)
    single_engine = VisionEngine(config, "qwen2.5-vl").start()
    try:
        single = [single_engine.generate(p, "Read the page.", PARAMS).text for p in pages[:7]]
    finally:
        single_engine.close()
    # the 5th page taken into the stream (the second chunk's second) aborts its first run; its solo retry succeeds
    isolated = IsolatedEngine(config, "qwen2.5-vl", fault=NativeAbort(once=frozenset({4}))).start()
    stream = SharedStream(isolated)
    try:
        results = run_overlapping(stream, [pages[0:3], pages[3:7]])
        assert {k: r.text for k, r in results[0].items()} == {i: single[i] for i in range(3)}
        assert {k: r.text for k, r in results[1].items()} == {100 + i: single[3 + i] for i in range(4)}
        assert isolated.restarts == 1 and stream.streams_started == 1
    finally:
        stream.close()
        isolated.close()


def test_a_run_of_small_chunks_answers_as_one_chunk(tmp_path, tiny_llava, demo_docs):
    records = [dict(r, document_id=f"{r['document_id']}-{i}") for i in range(3) for r in demo_docs]
    manifest = write_manifest(tmp_path / "m.csv", records)
    answers = []
    try:
        for chunk_size in (1, 100):
            out = tmp_path / f"out{chunk_size}"
            close_shared_engines()
            summary = batch(manifest=str(manifest), output=str(out), model=str(tiny_llava.model_path),
                            mmproj=str(tiny_llava.mmproj_path), max_tokens=10, n_ctx=2048, n_parallel=3,
                            chunk_size=chunk_size)
            assert (summary["pages_ok"], summary["pages_error"], summary["reconciled"]) == (len(records), 0, True)
            rows = ds.dataset(out / "completions", partitioning="hive").to_table().to_pylist()
            assert sorted(r["manifest_row"] for r in rows) == list(range(1, len(records) + 1))  # each page once
            answers.append(sorted((r["document_id"], r["completion"], r["result_key"]) for r in rows))
            assert isinstance(current_shared_engine(), SharedStream)
    finally:
        close_shared_engines()
    assert answers[0] == answers[1]  # nine one-row chunks, two at a time in one stream, or one chunk of nine


@pytest.mark.parametrize("kind", ["overlapped encoder", "inline encoder", "isolated", "isolated inline encoder"])
def test_a_chunk_joining_while_the_last_pages_decode_keeps_the_batch(tiny_llava, pages, kind):
    """Chunk A has given its last page; chunk B joins while A's long pages still decode: no new engine stream, and
    B's pages enter the batch's free slots at once (answered before A's long pages), not after A's next answer."""
    config = EngineConfig(str(tiny_llava.model_path), str(tiny_llava.mmproj_path), n_ctx=2048, n_parallel=4)
    short, long = GenerationParams(max_tokens=2), GenerationParams(max_tokens=400)
    plan_a = [(0, pages[0], short), (1, pages[1], long), (2, pages[2], long)]
    plan_b = [(100 + i, pages[3 + i], short) for i in range(3)]
    single_engine = VisionEngine(config, "llava-1-5").start()
    try:
        singles = {key: single_engine.generate(page, "Read the page.", params) for key, page, params in plan_a + plan_b}
        expected = {key: g.text for key, g in singles.items()}
        assert singles[1].completion_tokens == singles[2].completion_tokens == 400  # A's long pages are long
        if kind.startswith("isolated"):
            # inline: the child's decode loop itself takes pages from the pipe (it must not block there while the
            # parent waits for an answer); a page timeout bounds the wait should it
            child_config = config.replace(overlap_encode=kind == "isolated", page_timeout=60)
            engine = IsolatedEngine(child_config, "llava-1-5").start()
        else:
            engine = BatchedEngine(single_engine, n_seq=4, ctx_per_seq=2048, overlap=kind == "overlapped encoder")
        stream = SharedStream(engine)
        got: dict = {}  # in the order the answers arrived
        errors: list[BaseException] = []

        def run(plan, started=None):
            try:
                for key, result in stream.generate_many(Request(k, p, "Read the page.", g) for k, p, g in plan):
                    got[key] = result  # (dict assignment is atomic: the two consumers' order is kept)
                    if started is not None and stream.calls == 1:
                        started.start()  # A's first (short) page is answered; its long ones are still decoding
                        wait_for(lambda: stream.calls == 2, "chunk B to join")
            except BaseException as exc:
                errors.append(exc)

        second = threading.Thread(target=run, args=(plan_b,))
        first = threading.Thread(target=run, args=(plan_a, second))
        try:
            first.start()
            first.join(timeout=300)
            second.join(timeout=300)
            assert not errors, errors
            assert {k: r.text for k, r in got.items()} == expected
            assert (stream.calls, stream.streams_started, stream.callers) == (2, 1, 0)
            order = list(got)
            assert order[0] == 0 and set(order[1:4]) == {100, 101, 102}, order  # B's short pages before A's long
        finally:
            stream.close()
            engine.close()
    finally:
        single_engine.close()
