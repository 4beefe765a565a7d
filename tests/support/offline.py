"""Fixtures for tests that must run offline and without Prefect (import them into a test module to use them)."""

from __future__ import annotations

import socket

import pytest


@pytest.fixture(scope="module")
def prefect_server():
    """Nothing here uses Prefect (overrides the session's autouse server)."""
    yield


def _refused(*args, **kwargs):
    raise OSError("no network in these tests")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every socket connection refused: the code sets load, search and look up offline (the first test to use
    them in a process also loads them under the refusal)."""
    for target, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"), (socket, "create_connection")):
        monkeypatch.setattr(target, name, _refused)
