"""The review workbench driven in a real headless browser (Debian's chromium through Playwright; nothing downloads a
browser), over outputs made by real structured runs of the generated tiny model: one local, one on S3 (SeaweedFS).

The server is the ``medvlm review serve`` command in a subprocess (its log captured whole). The queue is not empty
for reasons the tests control: a document picked by id (``--document``), a page whose answer is an error (a wrong
``sha256`` in the manifest), and the vitals extraction's items, whose schema forces one or two per page, all far
below the 0.5 threshold with the random model (the expected items are read from what it actually extracted).
The tests run in order and share the server: the corrections of one are the state the next one reads.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from conftest import batch, write_manifest
from medvlm_core.analytics import connect, query
from medvlm_core.evals.normalize import normalize
from medvlm_core.storage import Storage, s3_options
from medvlm_core.testing.demo_docs import DOCUMENTS, write_demo_documents
from medvlm_core.testing.s3_server import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "images"
THRESHOLD = "0.5"
VITALS = {"prompt_id": "vitals", "prompt": "List every vital sign on the page.",
          "schema": {"type": "object", "required": ["vitals"], "properties": {"vitals": {
              "type": "array", "minItems": 1, "maxItems": 2,
              "items": {"type": "object", "required": ["name", "value"],
                        "properties": {"name": {"type": "string", "maxLength": 5},
                                       "value": {"type": "string", "maxLength": 4}}}}}}}
# What the reviewers type: none of it may reach the server's log.
TYPED = ["Pulse", "120/80", "Hypertension", "SpO2", "98%", "72 bpm", "Resp"]


def _records(prefix: str = "documents") -> list[dict]:
    """The manifest: the demo documents asked the clinical extraction, the same images asked the vitals, and a page
    whose file does not match its sha256 (an error answer: a page without an answer, its image still readable)."""
    types = {"discharge-0001": "discharge_summary", "rx-0002": "prescription", "lab-0003": "lab_report"}
    rows = [{"document_id": d, "image_uri": f"{prefix}/{d}.png", "patient_id": DOCUMENTS[d]["patient_id"],
             "prompt_id": "clinical_extraction", "document_type": t} for d, t in types.items()]
    rows += [{"document_id": f"vitals-{n}", "image_uri": f"{prefix}/{d}.png", "patient_id": DOCUMENTS[d]["patient_id"],
              "prompt_id": "vitals", "document_type": t} for n, (d, t) in enumerate(types.items(), 1)]
    rows.append({"document_id": "sha-0006", "image_uri": f"{prefix}/lab-0003.png", "page": 1, "sha256": "0" * 64,
                 "patient_id": "P-000106", "prompt_id": "clinical_extraction", "document_type": "lab_report"})
    return rows


class Site:
    """A running ``medvlm review serve`` and what the tests did through it."""

    def __init__(self, output: str, storage: Storage, log: Path, proc: subprocess.Popen, base: str, token: str):
        self.output, self.storage, self.log, self.proc, self.base, self.token = output, storage, log, proc, base, token
        self.opened: list[tuple[str, str]] = []  # (reviewer, document) of every page a browser opened

    def rows(self, sql: str, current: bool = False) -> list[dict]:
        """The rows of ``sql`` over the output's views (``current``: the current and verified views too)."""
        return query(self.output, sql, self.storage, current=current).to_pylist()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _serve(output: str, log: Path, env: dict[str, str], *extra: str) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    command = [sys.executable, "-m", "medvlm.flows.cli", "review", "serve", "--output", output, "--port", str(port),
               "--threshold", THRESHOLD, *extra]
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_text()
        if "Uvicorn running" in text:
            line = next(x for x in text.splitlines() if x.startswith("medvlm review: serving"))
            token = line.split("?token=", 1)[1].strip() if "?token=" in line else env["MEDVLM_REVIEW_TOKEN"]
            return proc, f"http://127.0.0.1:{port}", token
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the review server did not start:\n" + log.read_text()[-3000:])


def _request(url: str, method: str = "GET", token: str | None = None, body: dict | None = None,
             headers: dict | None = None):
    request = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={**(headers or {}), **({"Authorization": f"Bearer {token}"} if token else {}),
                                              **({"Content-Type": "application/json"} if body is not None else {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, headless, driven by Playwright."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("the browser tests need Debian's chromium: apt-get install chromium (.ci/run installs it)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_llava):
    """A real structured run into a local output, and the review server over it (the token generated, the
    reviewer's name asked at login, ``discharge-0001`` picked by id)."""
    work = tmp_path_factory.mktemp("review")
    write_demo_documents(work / "documents")
    manifest = write_manifest(work / "manifest.csv", _records())
    (work / "vitals.json").write_text(json.dumps(VITALS))
    output = str(work / "out")
    result = _in_thread(batch, str(manifest), output, str(tiny_llava.model_path), str(tiny_llava.mmproj_path),
                        prompt_id="clinical_extraction", extraction=str(work / "vitals.json"), max_tokens=300,
                        n_ctx=4096)
    assert result["run_id"]
    env = {k: v for k, v in os.environ.items() if k != "MEDVLM_REVIEW_TOKEN"}
    proc, base, token = _serve(output, work / "server.log", env, "--document", "discharge-0001")
    running = Site(output, Storage(), work / "server.log", proc, base, token)
    yield running
    running.stop()


def _login(browser, site: Site, name: str | None):
    """A browser context logged in through ``?token=`` (and the name form when the server has no --reviewer)."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.errors = errors
    page.goto(f"{site.base}/?token={site.token}")
    if name is not None:
        assert "/login" in page.url
        page.fill("input[name=reviewer]", name)
        with page.expect_navigation():
            page.click("button[type=submit]")
    assert page.url == f"{site.base}/", page.url  # the token left the address
    return context, page


def _open(page, site: Site, reviewer: str, document_id: str) -> None:
    """Open a document's first page to review by picking it by id (the queue page's form)."""
    page.goto(f"{site.base}/")
    page.fill("#pick", document_id)
    with page.expect_navigation():
        page.press("#pick", "Enter")
    assert "/page/" in page.url and document_id in page.inner_text("h1")
    page.wait_for_function("() => { const i = document.getElementById('page-image');"
                           " return !i || (i.complete && i.naturalWidth > 0); }")
    site.opened.append((reviewer, document_id))


def _act(page, key: str) -> str:
    """Press an action key and wait until the page says it was saved; the status text."""
    page.evaluate("() => { const s = document.getElementById('status'); s.textContent = ''; s.className = ''; }")
    page.keyboard.press(key)
    page.wait_for_selector("#status.ok, #status.error")
    text = page.inner_text("#status")
    assert "Saved" in text or "done" in text, text
    return text


def _screenshot(page, name: str, tmp: Path) -> None:
    """Take a screenshot for the docs: written to docs/images when it is missing there or when
    MEDVLM_UPDATE_SCREENSHOTS=1 (a run with the setting refreshes them), else kept in the test's folder."""
    target = SCREENSHOTS / name
    path = target if (not target.exists() or os.environ.get("MEDVLM_UPDATE_SCREENSHOTS") == "1") else tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def _in_thread(function, *args, **kwargs):
    """Run ``function`` on a thread of its own: Playwright's sync API keeps an event loop on the main thread, in which
    Prefect's flows would hand back coroutines instead of their results."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(function, *args, **kwargs).result()


def _vitals(site: Site) -> list[dict]:
    """The model's current vitals items (no run happens after the site's: read once)."""
    if not hasattr(site, "vitals"):
        site.vitals = site.rows("select document_id, item_index, name, value, confidence from vitals_current "
                                "order by document_id, item_index", current=True)
    return site.vitals


# -- the tests, in order ----------------------------------------------------------------------------------


def test_a_request_without_the_token_is_refused(site, browser):
    for method, path in [("GET", "/"), ("GET", "/api/queue"), ("GET", "/image/" + "0" * 64), ("POST", "/api/corrections"),
                         ("GET", "/?token=not-the-token")]:
        status, headers, _ = _request(site.base + path, method, body={} if method == "POST" else None)
        assert status == 401, (method, path, status)
        assert headers["cache-control"] == "no-store" and "default-src 'none'" in headers["content-security-policy"]
    assert _request(site.base + "/api/queue", token="wrong")[0] == 401
    status, headers, body = _request(site.base + "/api/queue", token=site.token)
    assert status == 200 and json.loads(body)["counts"]["total"] > 0
    # a cross-site POST is refused even with the token
    assert _request(site.base + "/api/corrections", "POST", site.token, {}, {"Origin": "https://evil.example"})[0] == 403

    context, page = _login(browser, site, "alice")
    [cookie] = context.cookies()
    assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"]) == ("medvlm_review", True, "Strict")
    assert site.token not in cookie["value"]
    response = page.goto(f"{site.base}/")
    assert response.headers["cache-control"] == "no-store"
    assert "script-src 'nonce-" in response.headers["content-security-policy"]
    assert "Reviewer: alice" in page.inner_text("header")
    assert not page.errors, page.errors
    context.close()


def test_the_queue_lists_the_doubtful_items(site, browser, tmp_path):
    items = _vitals(site)
    # (the random model may leave a name empty: an invalid item too)
    expected = {(r["document_id"], "vitals", f"#{r['item_index']}",
                 "low_confidence" + ("" if r["name"] else " invalid:name")) for r in items
                if r["confidence"] < float(THRESHOLD)}
    assert expected, "the vitals schema forces an item per page, far below the threshold with the random model"
    expected |= {("sha-0006", "(page: clinical_extraction)", "", "no_answer:error"),
                 ("discharge-0001", "(page: clinical_extraction)", "", "picked")}
    context, page = _login(browser, site, "alice")
    rows = page.eval_on_selector_all("tr[data-href]", "rows => rows.map(r => [...r.cells].map(c => c.innerText.trim()))")
    assert {(r[0], r[3], r[4], r[5]) for r in rows} == expected
    # most doubtful first: the picked document, the page without an answer, then items by confidence (an invalid
    # one counting as 0)
    assert [r[5] for r in rows[:2]] == ["picked", "no_answer:error"]
    doubts = [0.0 if "invalid" in r[5] else float(r[6]) for r in rows[2:]]
    assert doubts == sorted(doubts)
    assert page.inner_text("#left-count") == str(len(expected)) and page.inner_text("#done-count") == "0"
    assert {r[2] for r in rows} >= {"lab_report", "prescription", "discharge_summary"}  # from the manifest
    # the filters: by reason, table and document type
    with page.expect_navigation():
        page.select_option("select[name=reason]", "no_answer")
    assert [r.split("\t")[0] for r in page.eval_on_selector_all("tr[data-href]", "rs => rs.map(r => r.innerText)")] == [
        "sha-0006"]
    first_cells = "cs => cs.map(c => c.innerText.trim())"
    page.goto(f"{site.base}/?type=lab_report")
    assert set(page.eval_on_selector_all("tr[data-href] td:first-child", first_cells)) == {"vitals-3", "sha-0006"}
    page.goto(f"{site.base}/?type=lab_report&table=vitals")
    assert page.eval_on_selector_all("tr[data-href] td:first-child", first_cells) == ["vitals-3"]
    assert not page.errors, page.errors
    context.close()


def test_accept_edit_delete_add_on_the_item_page(site, browser, tmp_path):
    items = _vitals(site)
    context, page = _login(browser, site, "alice")
    # vitals-1: the page image beside the items; accept the first, add a missed one, page done
    _open(page, site, "alice", "vitals-1")
    first = next(r for r in items if r["document_id"] == "vitals-1" and r["item_index"] == 0)
    badge = page.locator("#item-vitals-m0 .conf")
    assert badge.inner_text() == f"{first['confidence']:.3f}" and "conf-low" in badge.get_attribute("class")
    assert page.evaluate("document.getElementById('page-image').naturalWidth") >= 900
    page.click("#zoom-in")
    assert page.inner_text("#zoom-level") == "125%"
    assert _act(page, "a").startswith("Saved: 1 correction by alice")
    page.keyboard.press("+")
    page.keyboard.type("BP")
    page.keyboard.press("Tab")
    page.keyboard.type("120/80")
    page.keyboard.press("Enter")
    page.wait_for_selector("article.item.is-add")
    _act(page, "d")
    assert "done by alice" in page.inner_text("section.table[data-table=vitals] h2")
    _screenshot(page, "review-item.png", tmp_path)
    # vitals-2: edit the first item's name (e selects the field, typing replaces it, Enter saves)
    _open(page, site, "alice", "vitals-2")
    page.keyboard.press("e")
    page.keyboard.type("Pulse")
    page.keyboard.press("Enter")
    page.wait_for_selector("#item-vitals-m0.is-edit")
    assert "edited" in page.get_attribute("#item-vitals-m0 input[name=name]", "class")
    _act(page, "d")
    # vitals-3: delete the first item
    _open(page, site, "alice", "vitals-3")
    _act(page, "x")
    assert "deleted by alice" in page.inner_text("#item-vitals-m0")
    _act(page, "d")
    # sha-0006: a page without an answer; its image still shows; add the diagnosis the model never gave
    _open(page, site, "alice", "sha-0006")
    assert "no_answer:error" in page.inner_text("section.items")
    page.click("section.table[data-table=diagnoses] .add-open")
    page.fill("section.table[data-table=diagnoses] form.add input[name=name]", "Hypertension")
    page.press("section.table[data-table=diagnoses] form.add input[name=name]", "Enter")
    page.wait_for_selector("section.table[data-table=diagnoses] article.item.is-add")
    _act(page, "d")
    assert not page.errors, page.errors
    context.close()

    rows = site.rows("select document_id, table_name, item, added_item, action, field, value_before, value_after, "
                     "reviewer from corrections order by created_at, seq")
    assert {r["reviewer"] for r in rows} == {"alice"}
    got = {(r["document_id"], r["table_name"], r["item"], r["action"], r["field"], r["value_after"]) for r in rows}
    assert ("vitals-1", "vitals", 0, "accept", None, None) in got
    assert {("vitals-1", "vitals", None, "add", "name", "BP"), ("vitals-1", "vitals", None, "add", "value", "120/80"),
            ("vitals-2", "vitals", 0, "edit", "name", "Pulse"), ("vitals-3", "vitals", 0, "delete", None, None),
            ("sha-0006", "diagnoses", None, "add", "name", "Hypertension")} <= got
    [edit] = [r for r in rows if r["action"] == "edit"]
    model_name = next(r["name"] for r in items if r["document_id"] == "vitals-2" and r["item_index"] == 0)
    assert edit["value_before"] == model_name  # the model's value, as the server read it
    reviewed = {(r["document_id"], r["table_name"]) for r in rows if r["action"] == "reviewed"}
    assert reviewed == {("vitals-1", "vitals"), ("vitals-2", "vitals"), ("vitals-3", "vitals"),
                        ("sha-0006", "diagnoses"), ("sha-0006", "medications"), ("sha-0006", "instructions")}
    # the verified view: the corrections applied to the current view, with who verified each item
    verified = site.rows("select document_id, item_index, name, value, verified_by from vitals_verified", True)
    by_item = {(r["document_id"], r["item_index"]): r for r in verified}
    assert by_item[("vitals-1", 0)]["verified_by"] == "alice"
    assert [(r["name"], r["value"], r["verified_by"]) for r in verified
            if r["document_id"] == "vitals-1" and r["item_index"] is None] == [("BP", "120/80", "alice")]
    assert by_item[("vitals-2", 0)]["name"] == "Pulse"
    assert ("vitals-3", 0) not in by_item
    assert len(verified) == len(items)  # one deleted, one added
    assert site.rows("select document_id, name from diagnoses_verified", True) == [
        {"document_id": "sha-0006", "name": "Hypertension"}]
    status = {r["document_id"]: r["reviewed"] for r in site.rows("select document_id, reviewed from document_status",
                                                                 True)}
    assert status == {"discharge-0001": 0, "rx-0002": 0, "lab-0003": 0, "vitals-1": 1, "vitals-2": 1, "vitals-3": 1,
                      "sha-0006": 1}
    # the queue counts them done
    _, _, body = _request(site.base + "/api/queue?table=vitals", token=site.token)
    assert json.loads(body)["counts"]["left"] == 0


def test_two_browsers_correcting_at_once_both_land(site, browser, tmp_path):
    (bob_context, bob), (carol_context, carol) = _login(browser, site, "bob"), _login(browser, site, "carol")
    _open(bob, site, "bob", "vitals-2")
    _open(carol, site, "carol", "vitals-2")
    bob.click("#item-vitals-m0 [data-act=edit]")
    bob.fill("#item-vitals-m0 input[name=value]", "72 bpm")
    carol.click("section.table[data-table=vitals] .add-open")
    carol.fill("form.add input[name=name]", "SpO2")
    carol.fill("form.add input[name=value]", "98%")
    for page in (bob, carol):  # both submissions in flight at once
        page.evaluate("() => { const s = document.getElementById('status'); s.textContent = ''; s.className = ''; }")
    bob.press("#item-vitals-m0 input[name=value]", "Enter")
    carol.press("form.add input[name=value]", "Enter")
    for page in (bob, carol):
        page.wait_for_selector("#status.ok")
    assert not bob.errors and not carol.errors
    bob.goto(f"{site.base}/?state=all")  # the queue with work done: for the docs
    assert "done" in bob.inner_text("tbody") and "left" in bob.inner_text("tbody")
    _screenshot(bob, "review-queue.png", tmp_path)
    bob_context.close()
    carol_context.close()
    rows = site.rows("select reviewer, submission_id, action, field, value_after from corrections "
                     "where reviewer in ('bob', 'carol') and document_id = 'vitals-2'")
    assert {(r["reviewer"], r["action"], r["field"], r["value_after"]) for r in rows} == {
        ("bob", "edit", "value", "72 bpm"), ("carol", "add", "name", "SpO2"), ("carol", "add", "value", "98%")}
    assert len({r["submission_id"] for r in rows}) == 2  # two files, neither lost
    verified = site.rows("select name, value, verified_by from vitals_verified where document_id = 'vitals-2'", True)
    assert ("Pulse", "72 bpm", "bob") in {(r["name"], r["value"], r["verified_by"]) for r in verified}
    assert ("SpO2", "98%", "carol") in {(r["name"], r["value"], r["verified_by"]) for r in verified}


def test_the_access_log_has_every_document_opened(site):
    logged = site.rows("select reviewer, action, document_id, page, result_key from access_log")
    assert site.opened and {r["action"] for r in logged} == {"page", "image"}
    for reviewer, document in site.opened:
        for action in ("page", "image"):
            assert any(r["reviewer"] == reviewer and r["document_id"] == document and r["action"] == action
                       for r in logged), (reviewer, document, action)
    assert all(r["page"] == 1 and len(r["result_key"]) == 64 for r in logged)


def _assert_log_clean(site: Site, values: list[str]) -> None:
    text = site.log.read_text()
    assert "GET /page/" in text and "POST /api/corrections 200" in text  # it logged the requests
    # the model's values, where they cannot be mistaken for the log's own words (a number, hex of a result key)
    values = [v for v in values if len(v) >= 3 and not re.fullmatch(r"[0-9a-f.:, -]+|GET|POST|INFO|ms", v)]
    forbidden = [d["patient_id"] for d in DOCUMENTS.values()] + ["P-000106"] + TYPED + values
    forbidden += [line.split(":")[0].strip() for d in DOCUMENTS.values() for line in d["lines"] if len(line) > 12]
    forbidden += list(DOCUMENTS) + ["vitals-1", "sha-0006", "Jane Example", "Amoxicillin", "Metformin"]
    leaked = sorted({f for f in forbidden if f and len(f) >= 3 and f in text})
    assert not leaked, f"the server's log holds document data: {leaked}"
    assert text.count(site.token) <= 1  # at most the start line, like Jupyter's


def test_no_document_text_in_the_servers_log(site):
    values = [v for r in _vitals(site) for v in (r["name"], r["value"]) if v and len(v) >= 3]
    _assert_log_clean(site, values)


def _gold_counts(site: Site, gold: Path) -> dict[str, int]:
    """TP, FP and FN of the current vitals answers against the exported gold, counted here independently: items are
    the same when their names are equal after the eval's normalisation (the random model's names and the ones
    typed are far apart)."""
    with open(gold, newline="") as f:
        rows = list(csv.DictReader(f))
    pages = {(r["document_id"], int(r["page"])) for r in rows}
    counts = {"tp": 0, "fp": 0, "fn": 0}
    model = _vitals(site)
    for document, page in pages:
        if not document.startswith("vitals-"):  # the clinical page: the vitals prompt never answered it
            continue
        wanted = [normalize(r["name"]) for r in rows if (r["document_id"], int(r["page"])) == (document, page)
                  and r["table"] == "vitals"]
        got = [normalize(r["name"]) for r in model if r["document_id"] == document]
        matched = sum(min(wanted.count(n), got.count(n)) for n in set(wanted))
        counts["tp"] += matched
        counts["fp"] += len(got) - matched
        counts["fn"] += len(wanted) - matched
    return counts


def test_the_exported_gold_file_scores_in_medvlm_eval(site, tmp_path, capsys):
    from medvlm.flows.cli import main

    gold = tmp_path / "gold.csv"
    assert _in_thread(main, ["review", "export", "--output", site.output, "--gold", str(gold), "--reviewer", "alice"]) == 0
    assert "4 reviewed page(s)" in capsys.readouterr().out
    with open(gold, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["document_id"], r["table"]) for r in rows} >= {("vitals-1", "vitals"), ("sha-0006", "diagnoses")}
    assert {r["document_type"] for r in rows if r["document_id"] == "sha-0006"} == {"lab_report"}
    names = {(r["document_id"], r["name"]) for r in rows}
    assert {("vitals-1", "BP"), ("vitals-2", "Pulse"), ("vitals-2", "SpO2"), ("sha-0006", "Hypertension")} <= names
    # vitals-3's first item was deleted: one item fewer than the model's (a page with none left is one empty row)
    model_3 = sum(1 for x in _vitals(site) if x["document_id"] == "vitals-3")
    assert sum(1 for r in rows if r["document_id"] == "vitals-3" and r["table"] == "vitals") == model_3 - 1

    assert _in_thread(main, ["eval", "--output", site.output, "--gold", str(gold), "--bootstrap-samples", "0"]) == 0
    scores = {(r["system"], r["table_name"]): r for r in site.rows(
        "select system, table_name, tp, fp, fn from evals where section = 'table'")}
    vitals = scores[("current vitals", "vitals")]
    expected = _gold_counts(site, gold)
    assert {k: vitals[k] for k in ("tp", "fp", "fn")} == expected
    assert expected["fp"] >= 2 and expected["fn"] >= 2  # the edit and the delete; the added items
    diagnoses = scores[("current clinical_extraction", "diagnoses")]
    assert (diagnoses["tp"], diagnoses["fn"]) == (0, 1)  # the page without an answer: its labelled item missed
    assert [r["action"] for r in site.rows("select action from access_log where action = 'export'")] == ["export"]


# -- the same over S3 -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_site(tmp_path_factory, tiny_llava, s3_server):
    """A real structured run from and into S3 (SeaweedFS), and the review server over it (the token from
    MEDVLM_REVIEW_TOKEN, the reviewer from --reviewer)."""
    import s3fs

    work = tmp_path_factory.mktemp("review-s3")
    write_demo_documents(work / "documents")
    manifest = write_manifest(work / "manifest.csv", [r for r in _records() if r["document_id"].startswith("vitals-")])
    (work / "vitals.json").write_text(json.dumps(VITALS))
    bucket = "review-e2e"
    s3_server.create_bucket(bucket)
    fs = s3fs.S3FileSystem(**s3_options(endpoint_url=s3_server.endpoint_url, key=s3_server.credentials.access_key,
                                        secret=s3_server.credentials.secret_key))
    fs.put(str(work / "documents"), f"{bucket}/incoming/documents", recursive=True)
    fs.put(str(manifest), f"{bucket}/incoming/manifest.csv")
    output = f"s3://{bucket}/out"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3_server.env().items():
            patch.setenv(key, value)
        _in_thread(batch, f"s3://{bucket}/incoming/manifest.csv", output, str(tiny_llava.model_path),
                   str(tiny_llava.mmproj_path), prompt_id="vitals", extraction=str(work / "vitals.json"), max_tokens=300,
                   n_ctx=4096)
    env = dict(os.environ, **s3_server.env(), MEDVLM_REVIEW_TOKEN="s3-review-token")
    proc, base, token = _serve(output, work / "server.log", env, "--reviewer", "dana")
    storage = Storage({"s3": s3_options(endpoint_url=s3_server.endpoint_url, key=s3_server.credentials.access_key,
                                        secret=s3_server.credentials.secret_key)})
    running = Site(output, storage, work / "server.log", proc, base, token)
    yield running
    running.stop()


def test_the_same_over_an_s3_output(s3_site, browser, s3, tmp_path, capsys):
    from medvlm.flows.cli import main

    site = s3_site
    assert "s3-review-token" not in site.log.read_text()  # a token from the environment is not printed
    assert _request(site.base + "/", "GET")[0] == 401
    context, page = _login(browser, site, None)  # --reviewer: no name to ask
    rows = page.eval_on_selector_all("tr[data-href]", "rows => rows.map(r => [...r.cells].map(c => c.innerText.trim()))")
    assert {r[0] for r in rows} == {"vitals-1", "vitals-2", "vitals-3"}
    assert {r[5].split()[0] for r in rows} == {"low_confidence"}
    _open(page, site, "dana", "vitals-1")
    assert page.evaluate("document.getElementById('page-image').naturalWidth") >= 900  # rendered from S3
    _act(page, "a")
    page.keyboard.press("+")
    page.keyboard.type("Resp")
    page.keyboard.press("Tab")
    page.keyboard.type("18")
    page.keyboard.press("Enter")
    page.wait_for_selector("article.item.is-add")
    _act(page, "d")
    _open(page, site, "dana", "vitals-2")
    page.keyboard.press("e")
    page.keyboard.type("Pulse")
    page.keyboard.press("Enter")
    page.wait_for_selector("#item-vitals-m0.is-edit")
    _act(page, "d")
    assert not page.errors, page.errors
    context.close()

    con = connect(site.output, site.storage)  # one connection for the checks (binding views on S3 takes seconds)
    try:
        rows = lambda sql: con.sql(sql).to_arrow_table().to_pylist()
        got = {(r["document_id"], r["action"], r["field"], r["value_after"], r["reviewer"]) for r in rows(
            "select document_id, action, field, value_after, reviewer from corrections")}
        verified = {(r["document_id"], r["name"]) for r in rows("select document_id, name from vitals_verified")}
        opened = {(r["document_id"], r["action"]) for r in rows("select document_id, action from access_log")}
        values = [v for r in rows("select name, value from vitals") for v in (r["name"], r["value"]) if v and len(v) >= 3]
    finally:
        con.close()
    assert {("vitals-1", "accept", None, None, "dana"), ("vitals-1", "add", "name", "Resp", "dana"),
            ("vitals-2", "edit", "name", "Pulse", "dana"), ("vitals-2", "reviewed", None, None, "dana")} <= got
    assert {("vitals-1", "Resp"), ("vitals-2", "Pulse")} <= verified
    assert {("vitals-1", "page"), ("vitals-1", "image"), ("vitals-2", "page"), ("vitals-2", "image")} <= opened
    assert s3.ls("review-e2e/out/corrections")  # the tables live on S3

    gold = "s3://review-e2e/labels/gold.csv"
    assert _in_thread(main, ["review", "export", "--output", site.output, "--gold", gold]) == 0
    assert "2 reviewed page(s)" in capsys.readouterr().out
    assert _in_thread(main, ["eval", "--output", site.output, "--gold", gold, "--bootstrap-samples", "0"]) == 0
    evals = ds.dataset("review-e2e/out/evals", filesystem=s3, partitioning="hive").to_table().to_pylist()
    [vitals] = [r for r in evals if r["section"] == "table" and r["table_name"] == "vitals"]
    assert vitals["fp"] >= 1 and vitals["fn"] >= 2  # the edited name; the added item and the edited one
    _assert_log_clean(site, values)
