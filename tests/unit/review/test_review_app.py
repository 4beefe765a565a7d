"""The review app without a browser (Starlette's test client) over a hand-built output: the token and the session,
the security headers, the API, the access log, the server's log, and the command's refusals."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings

import pytest

with warnings.catch_warnings():  # (Starlette asks for httpx2, which the test client does not need)
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from review_builders import STORAGE, build_output, key

from medvlm_core.analytics import query
from medvlm_core.review import auth
from medvlm_core.review.app import ReviewConfig, create_app

TOKEN = "the-token"
K1 = key("r1", "d1", "vitals", "m1")
K2 = key("r1", "d2", "clinical_extraction", "m1")


@pytest.fixture(scope="module")
def prefect_server():
    """Nothing here uses Prefect (overrides the session's autouse test server)."""
    yield


@pytest.fixture
def app(tmp_path):
    out = build_output(tmp_path)
    config = ReviewConfig(output=str(out), storage=STORAGE, token=TOKEN, threshold=0.5)
    return create_app(config), out


def client(app_, **kwargs) -> TestClient:
    return TestClient(app_, base_url="http://127.0.0.1:8765", follow_redirects=False, **kwargs)


def bearer(name: str | None = None) -> dict:
    return {"Authorization": f"Bearer {TOKEN}", **({"X-Medvlm-Reviewer": name} if name else {})}


def test_every_route_needs_the_token(app):
    app_, _ = app
    c = client(app_)
    for method, path in [("GET", "/"), ("GET", f"/page/{K1}"), ("GET", f"/image/{K1}"), ("GET", "/api/queue"),
                         ("POST", "/api/corrections"), ("GET", "/next"), ("POST", "/pick"), ("GET", "/health")]:
        response = c.request(method, path)
        assert response.status_code == 401, (method, path)
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["content-security-policy"].startswith("default-src 'none'")
        assert c.request(method, path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    page = c.get("/", headers={"accept": "text/html"})  # a browser gets the login form
    assert page.status_code == 401 and 'name="token"' in page.text
    assert c.get("/?token=wrong").status_code == 401
    assert c.get("/health", headers=bearer()).json() == {"ok": True}
    assert c.get("/favicon.ico").status_code == 204


def test_the_token_in_the_address_opens_a_strict_session(app):
    app_, _ = app
    c = client(app_)
    response = c.get(f"/?token={TOKEN}&reviewer=Dr%20A&table=vitals")
    assert response.status_code == 303 and response.headers["location"] == "/?table=vitals"  # the token left
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{auth.SESSION_COOKIE}=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert TOKEN not in cookie and "Secure" not in cookie
    page = c.get("/?table=vitals")
    assert page.status_code == 200 and "Reviewer: <strong>Dr A</strong>" in page.text
    # every header on a page with PHI
    assert page.headers["cache-control"] == "no-store" and page.headers["x-frame-options"] == "DENY"
    nonce = re.search(r"script-src 'nonce-([^']+)'", page.headers["content-security-policy"]).group(1)
    assert f'<script nonce="{nonce}">' in page.text and f'<style nonce="{nonce}">' in page.text
    assert " on" not in re.sub(r"<script.*?</script>", "", page.text, flags=re.S).split("<body", 1)[1].split(">")[0]
    # logout ends it
    assert c.post("/logout").headers["set-cookie"].startswith(f"{auth.SESSION_COOKIE}=; Path=/; Max-Age=0")
    assert c.get("/").status_code == 401


def test_the_login_form_asks_the_name(app):
    app_, _ = app
    c = client(app_)
    response = c.get(f"/page/{K1}?token={TOKEN}")  # no --reviewer, no name: the login page asks it
    assert response.status_code == 303 and response.headers["location"].startswith("/login?next=")
    assert c.get(response.headers["location"]).status_code == 200
    assert c.get("/").status_code == 303  # a session without a name goes to the login page
    refused = c.post("/login?next=/", content="reviewer=", headers={"content-type": "application/x-www-form-urlencoded"})
    assert refused.status_code == 400
    done = c.post("/login?next=//evil.example/", content="reviewer=Alice",
                  headers={"content-type": "application/x-www-form-urlencoded"})
    assert done.status_code == 303 and done.headers["location"] == "/"  # never to another site
    assert "Reviewer: <strong>Alice</strong>" in c.get("/").text
    other = client(app_)  # the form with the token
    assert other.post("/login", content="token=wrong&reviewer=B").status_code == 401
    ok = other.post("/login", content=f"token={TOKEN}&reviewer=B")
    assert ok.status_code == 303 and other.get("/").status_code == 200


def test_a_cross_site_post_is_refused(app):
    app_, _ = app
    c = client(app_)
    body = {"result_key": K1, "run_id": "r1", "actions": [{"table": "vitals", "item": 0, "action": "accept"}]}
    assert c.post("/api/corrections", json=body, headers={**bearer(), "Origin": "https://evil.example"}).status_code == 403
    assert c.post("/api/corrections", json=body, headers={**bearer(), "Origin": "null"}).status_code == 403
    assert c.post("/api/corrections", json=body, headers={**bearer(), "Origin": "http://127.0.0.1:8765"}).status_code == 200


def test_the_api_the_pages_and_the_access_log(app, caplog):
    app_, out = app
    c = client(app_)
    caplog.set_level(logging.INFO, logger="medvlm.review")
    queue = c.get("/api/queue", headers=bearer()).json()
    reasons = {(e["document_id"], e["table_name"], e["item"]): e["reason"] for e in queue["entries"]}
    assert reasons == {("d1", "vitals", 1): "low_confidence", ("d2", "medications", 0): "invalid:dose",
                       ("d2", "medications", 1): "low_confidence", ("d3", None, None): "no_answer:error",
                       ("d5", "vitals", 0): "no_confidence"}
    assert queue["counts"] == {"done": 0, "left": 5, "total": 5}
    # the item page and its image, each recorded in the access log
    page = c.get(f"/page/{K2}?run=r1", headers=bearer("alice"))
    assert page.status_code == 200 and "Metformin" in page.text and "invalid:dose" in page.text
    assert "the model&#39;s why" in page.text  # the item's reasoning, one click away
    image = c.get(f"/image/{K2}?run=r1", headers=bearer("alice"))
    assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.headers["cache-control"] == "no-store"
    assert c.get(f"/page/{'0' * 64}", headers=bearer()).status_code == 404
    assert c.get("/page/not-a-key", headers=bearer()).status_code == 404
    # a submission; a bad one refused whole, naming the rule
    actions = [{"table": "medications", "item": 0, "action": "edit", "values": {"dose": "500"}},
               {"table": "medications", "action": "add", "values": {"name": "Aspirin", "dose": "81"}},
               {"table": "medications", "action": "reviewed"}]
    answer = c.post("/api/corrections", json={"result_key": K2, "run_id": "r1", "actions": actions},
                    headers=bearer("alice"))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["reviewer"] == "alice" and body["rows"] == 5  # the edit, two added fields, an accept, reviewed
    assert {(c_["table"], c_["action"]) for c_ in body["changed"]} == {
        ("medications", "edit"), ("medications", "add"), ("medications", "accept"), ("medications", "reviewed")}
    bad = c.post("/api/corrections", json={"result_key": K2, "actions": [
        {"table": "medications", "item": 0, "action": "edit", "values": {"conditional": "Zebra-42"}}]},
        headers=bearer())
    assert bad.status_code == 400 and "must be true or false" in bad.json()["error"] and "Zebra" not in bad.text
    assert c.post("/api/corrections", content=b"{", headers=bearer()).status_code == 400
    assert c.post("/api/corrections", json={"result_key": "x"}, headers=bearer()).status_code == 400
    assert c.post("/api/corrections", json={"result_key": "0" * 64, "actions": []}, headers=bearer()).status_code == 404
    # the page now shows who did what; the queue counts the medications done
    again = c.get(f"/page/{K2}", headers=bearer("bob")).text
    assert "edited by alice" in again and "added by alice" in again and "done by alice" in again
    # (with the page without an answer whose prompt fills medications)
    assert c.get("/api/queue?table=medications", headers=bearer()).json()["counts"] == {"done": 2, "left": 1, "total": 3}
    assert c.get("/api/queue?reason=invalid&state=done", headers=bearer()).json()["entries"][0]["document_id"] == "d2"
    logged = query(str(out), "select reviewer, action, document_id, page, result_key from access_log "
                             "order by accessed_at", STORAGE).to_pylist()
    assert [(r["reviewer"], r["action"], r["document_id"]) for r in logged] == [
        ("alice", "page", "d2"), ("alice", "image", "d2"), ("bob", "page", "d2")]
    # the server's log: requests, no document ids, values or patient ids, never a query string
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"GET /page/{K2} 200" in text and "POST /api/corrections 200" in text
    for secret in ("d2", "Metformin", "Aspirin", "500", "P-d2", "run=r1", "Zebra"):
        assert not re.search(rf"(?<![0-9a-f]){re.escape(secret)}(?![0-9a-f])", text), secret


def test_pick_and_next(app):
    app_, _ = app
    c = client(app_)
    c.get(f"/?token={TOKEN}&reviewer=A")
    picked = c.post("/pick", content="document_id=d6", headers={"content-type": "application/x-www-form-urlencoded"})
    assert picked.status_code == 303 and picked.headers["location"].startswith("/page/")
    queue = c.get("/api/queue").json()
    assert [e["reason"] for e in queue["entries"][:2]] == ["picked", "picked"]  # d6's two answers, first
    assert c.post("/pick", content="document_id=nope").headers["location"] == "/?missing=1"
    first = c.get("/next").headers["location"]
    assert first.startswith("/page/")
    after = first.split("/page/")[1].split("?")[0]
    second = c.get(f"/next?after={after}&run=r1").headers["location"]
    assert after not in second and second.startswith("/page/")
    assert c.get("/next?reason=no_answer").headers["location"].startswith(f"/page/{key('r1', 'd3', 'clinical_extraction', 'm1')}")


def test_an_error_is_logged_by_its_type_only(app, caplog, monkeypatch):
    from medvlm_core.review import app as module

    app_, _ = app

    def broken(*args, **kwargs):
        raise ValueError("Metformin 500 mg for P-d2")

    monkeypatch.setattr(module, "load_page", broken)
    caplog.set_level(logging.INFO, logger="medvlm.review")
    response = client(app_).get(f"/page/{K2}", headers=bearer())
    assert response.status_code == 500 and "Metformin" not in response.text
    assert response.headers["content-security-policy"]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"GET /page/{K2} failed (ValueError)" in text and "Metformin" not in text


def test_the_command_refuses_what_it_should(app, tmp_path):
    from medvlm.flows.cli import main

    _, out = app
    cases = [
        (["--host", "0.0.0.0"], "refusing to serve on 0.0.0.0 without TLS"),
        (["--host", "10.1.2.3", "--ssl-certfile", "c.pem"], "--ssl-certfile and --ssl-keyfile go together"),
        (["--threshold", "2"], "--threshold must be between 0 and 1"),
    ]
    for extra, message in cases:
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors):
            assert main(["review", "serve", "--output", str(out), *extra]) == 2
        assert message in errors.getvalue()
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        assert main(["review", "serve", "--output", str(tmp_path / "empty")]) == 2
    assert "no completions table" in errors.getvalue()
    with contextlib.redirect_stderr(errors):
        assert main(["review", "export", "--output", str(out), "--gold", str(tmp_path / "g.csv")]) == 2
    assert "no corrections yet" in errors.getvalue()
    assert auth.is_loopback("127.0.0.1") and auth.is_loopback("::1") and auth.is_loopback("localhost")
    assert not auth.is_loopback("0.0.0.0") and not auth.is_loopback("example.org")


def test_the_command_serves_with_a_printed_or_a_set_token(app, monkeypatch, caplog, capsys):
    import uvicorn

    from medvlm.flows.cli import main

    _, out = app
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app_, **kwargs: served.append((app_, kwargs)))
    monkeypatch.delenv("MEDVLM_REVIEW_TOKEN", raising=False)
    assert main(["review", "serve", "--output", str(out), "--port", "9999"]) == 0
    printed = capsys.readouterr().out
    token = printed.split("?token=", 1)[1].split()[0]
    assert printed.startswith(f"medvlm review: serving {out} at http://127.0.0.1:9999/?token=") and len(token) >= 40
    app_, options = served[-1]
    assert options["host"] == "127.0.0.1" and options["access_log"] is False  # uvicorn's own would log the token
    assert client(app_).get("/health", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    # another address: with --insecure, served and logged; the token from the environment, never printed
    monkeypatch.setenv("MEDVLM_REVIEW_TOKEN", "from-the-environment")
    caplog.set_level(logging.WARNING, logger="medvlm.review")
    assert main(["review", "serve", "--output", str(out), "--host", "0.0.0.0", "--insecure"]) == 0
    assert "from-the-environment" not in capsys.readouterr().out
    assert served[-1][1]["host"] == "0.0.0.0" and "without TLS (--insecure)" in caplog.text
    assert client(served[-1][0]).get("/health", headers={"Authorization": "Bearer from-the-environment"}).status_code == 200

