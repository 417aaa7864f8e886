"""Fixtures of the tests that talk to a local Hugging Face hub (tests/hub/, `vmetal convert` of a Hub id): one
tiny repo's files, built once per session, isolated homes, and the hub itself. Loaded by tests/conftest.py as
a pytest plugin, so no test module imports fixtures from another."""

from __future__ import annotations

import pytest

from tests.support.hubserver import HubServer, Repo
from tests.support.pull_helpers import isolate_homes, tiny_repo_files

REPO = "acme/tiny-qwen3"


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> dict[str, bytes]:
    """A tiny Qwen3's files and what real repos carry besides (see `tiny_repo_files`). Tests copy it before
    changing it: it is shared by the whole session."""
    return tiny_repo_files(tmp_path_factory.mktemp("pullmodel"))


@pytest.fixture
def env(tmp_path, monkeypatch):
    isolate_homes(tmp_path, monkeypatch)
    return tmp_path


@pytest.fixture
def hub(env, tiny_files, monkeypatch):
    """The local hub holding REPO, with HF_ENDPOINT pointing at it."""
    with HubServer() as server:
        server.add(Repo(REPO, dict(tiny_files)))
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server
