"""Where a run may read and write (medvlm_core.storage.locations.LocationPolicy): an allow-list of S3 prefixes and
local roots, on real local folders (symbolic links and ``..`` included).

No list allows everything; a prefix allows itself and what is under it, never a sibling that merely starts
with the same letters; local paths are judged after resolving ``..`` and symbolic links; the column form
(``allows_many``, used on a manifest's ``image_uri``s) answers exactly as ``allows`` row by row; ``require``
names what was refused. Then through ``plan_manifest``: a document outside the policy is quarantined with
the reason, a manifest outside it stops the run. No Prefect.
"""

from __future__ import annotations

import os

import polars as pl
import pytest

from conftest import write_manifest
from medvlm_core.errors import RunError
from medvlm_core.inputs.manifest import plan_manifest
from medvlm_core.storage import Storage
from medvlm_core.storage.locations import LocationPolicy


@pytest.fixture(scope="module")
def prefect_server():
    """Overrides the session's autouse Prefect test server: nothing here runs a flow."""
    yield


@pytest.fixture
def tree(tmp_path):
    """``allowed/`` (with a document, a link out to ``secret/`` and a link to a file in ``secret/``), ``secret/``,
    and ``allowed-not/`` (a sibling whose name starts like the allowed root)."""
    for folder in ("allowed/sub", "secret", "allowed-not"):
        (tmp_path / folder).mkdir(parents=True)
    for path in ("allowed/sub/doc.png", "secret/doc.png", "allowed-not/doc.png"):
        (tmp_path / path).write_bytes(b"png")
    os.symlink(tmp_path / "secret", tmp_path / "allowed" / "link-out")
    os.symlink(tmp_path / "secret" / "doc.png", tmp_path / "allowed" / "doc-link.png")
    os.symlink(tmp_path / "allowed" / "sub", tmp_path / "secret" / "link-in")
    return tmp_path


def test_without_a_list_everything_is_allowed(tree):
    for policy in (LocationPolicy(), LocationPolicy([]), LocationPolicy(None)):
        assert policy.allows("s3://any-bucket/x.png") and policy.allows(str(tree / "secret" / "doc.png"))
        policy.require("/anywhere/at/all", "output")  # no error
        assert policy.allows_many(pl.Series("u", ["s3://a/b", "/c"])).to_list() == [True, True]


@pytest.mark.parametrize("url, allowed", [
    ("s3://hospital/scans", True),
    ("s3://hospital/scans/", True),
    ("s3://hospital/scans/2026/12/fax-1.pdf", True),
    ("s3a://hospital/scans/fax-1.pdf", True),  # s3a is s3
    ("s3://hospital/scans-archive/fax-1.pdf", False),  # starts with the same letters, is not under it
    ("s3://hospital/scan", False),
    ("s3://hospital/other/fax-1.pdf", False),
    ("s3://other-hospital/scans/fax-1.pdf", False),
    ("s3://hospital-2/scans/fax-1.pdf", False),
])
def test_an_s3_prefix_allows_itself_and_what_is_under_it_only(url, allowed):
    policy = LocationPolicy(["s3://hospital/scans/", "s3://models/vlm"])
    assert policy.allows(url) is allowed
    assert policy.allows_many(pl.Series("image_uri", [url.replace("s3a://", "s3://")])).to_list() == [allowed]


def test_an_s3a_entry_allows_the_same_as_its_s3_form():
    assert LocationPolicy(["s3a://hospital/scans"]).allows("s3://hospital/scans/x.png")


@pytest.mark.parametrize("relative, allowed", [
    ("allowed", True),
    ("allowed/sub/doc.png", True),
    ("allowed/sub/../sub/doc.png", True),
    ("allowed/../secret/doc.png", False),  # .. steps out
    ("allowed/sub/../../secret/doc.png", False),
    ("allowed/link-out/doc.png", False),  # a link inside the root that points outside
    ("allowed/doc-link.png", False),
    ("secret/link-in/doc.png", True),  # a link outside that points inside: where the file really is counts
    ("allowed-not/doc.png", False),  # a sibling whose name starts like the root
    ("secret/doc.png", False),
])
def test_a_local_root_is_judged_after_resolving_dots_and_links(tree, relative, allowed):
    policy = LocationPolicy([str(tree / "allowed")])
    path = f"{tree}/{relative}"
    assert policy.allows(path) is allowed
    assert policy.allows(f"file://{path}") is allowed
    assert policy.allows_many(pl.Series("image_uri", [path])).to_list() == [allowed]


def test_a_root_given_through_a_link_or_relative_path_is_its_real_folder(tree, monkeypatch):
    os.symlink(tree / "allowed", tree / "alias")
    by_link = LocationPolicy([str(tree / "alias")])
    assert by_link.allows(str(tree / "allowed" / "sub" / "doc.png"))
    assert not by_link.allows(str(tree / "secret" / "doc.png"))
    monkeypatch.chdir(tree)
    relative = LocationPolicy(["allowed"])
    assert relative.allows(str(tree / "allowed" / "sub" / "doc.png")) and not relative.allows(str(tree / "secret"))


def test_the_column_form_answers_as_allows_row_by_row_for_mixed_local_and_s3(tree):
    policy = LocationPolicy([str(tree / "allowed"), "s3://hospital/scans"])
    urls = [str(tree / "allowed" / "sub" / "doc.png"), "s3://hospital/scans/a.png", str(tree / "allowed" / "link-out" / "doc.png"),
            "s3://hospital/scansX/a.png", str(tree / "secret" / "doc.png"), "s3://hospital/scans", str(tree / "allowed")]
    answers = policy.allows_many(pl.Series("image_uri", urls))
    assert answers.dtype == pl.Boolean and len(answers) == len(urls)
    assert answers.to_list() == [policy.allows(u) for u in urls] == [True, True, False, False, False, True, True]
    assert policy.allows_many(pl.Series("image_uri", [], dtype=pl.Utf8)).to_list() == []
    only_s3 = policy.allows_many(pl.Series("image_uri", ["s3://hospital/scans/b.png", "s3://elsewhere/b.png"]))
    assert only_s3.to_list() == [True, False]


def test_require_names_what_was_refused_and_where(tree):
    policy = LocationPolicy([str(tree / "allowed")])
    policy.require(str(tree / "allowed" / "out"), "output")
    outside = str(tree / "secret" / "model.gguf")
    with pytest.raises(RunError) as info:
        policy.require(outside, "model")
    assert str(info.value) == f"model {outside} is outside the allowed locations of this deployment"


def test_a_document_outside_the_policy_is_quarantined_with_the_reason(tree):
    manifest = write_manifest(tree / "allowed" / "manifest.csv", [
        {"document_id": "in", "image_uri": "sub/doc.png"},
        {"document_id": "dots", "image_uri": "../secret/doc.png"},
        {"document_id": "link", "image_uri": "link-out/doc.png"},
        {"document_id": "s3", "image_uri": "s3://hospital/scans/x.png"},
        {"document_id": "s3-out", "image_uri": "s3://hospital/private/x.png"},
    ])
    policy = LocationPolicy([str(tree / "allowed"), "s3://hospital/scans"])
    plan = plan_manifest(str(manifest), Storage(), policy)
    assert [r.document_id for r in plan.rows] == ["in", "s3"]
    assert [(q["row_number"], q["check"]) for q in plan.quarantined] == [(2, "location_policy"), (3, "location_policy"),
                                                                         (5, "location_policy")]
    assert all("outside the allowed locations" in q["reason"] for q in plan.quarantined)
    assert plan.quarantined[0]["reason"].startswith("row 2:")


def test_a_manifest_outside_the_policy_stops_the_run_before_it_is_read(tree):
    manifest = tree / "secret" / "manifest.csv"  # not even written: refused before any read
    with pytest.raises(RunError, match=rf"^manifest {manifest} is outside the allowed locations"):
        plan_manifest(str(manifest), Storage(), LocationPolicy([str(tree / "allowed")]))


@pytest.mark.parametrize("url", ["s3://scans/data/../secret/x.png", "s3://scans/data/./x.png", "s3://scans/data/.."])
def test_an_s3_url_with_dot_segments_is_never_allowed(url):
    policy = LocationPolicy(["s3://scans/data"])
    assert not policy.allows(url)
    assert policy.allows_many(pl.Series("image_uri", [url, "s3://scans/data/x.png"])).to_list() == [False, True]
    assert policy.allows("s3://scans/data/x..png")  # dots inside a name are a name
