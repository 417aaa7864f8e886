"""The suite's own isolation (tests/conftest.py): user state goes to a temporary home, never the real one."""

from __future__ import annotations

import os

import tests.conftest as conftest


def test_user_dirs_are_this_modules_temporary_home(user_dirs):
    for var, sub in conftest.USER_DIRS.items():
        assert os.environ[var] == str(user_dirs / sub)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    from vmetal.demo import default_demo_dir
    from vmetal.envs import vmetal_home
    from vmetal.hub.registry import registry_path

    assert vmetal_home() == user_dirs / ".cache" / "vmetal"
    assert user_dirs in default_demo_dir().parents and user_dirs in registry_path().parents
    assert conftest.REAL_HOME not in user_dirs.parents


def test_a_write_under_the_real_home_is_seen(tmp_path, monkeypatch):
    """What the after-each-test check compares: a new file deep in a watched cache, or a new entry at the top of
    the home, shows up; nothing else does."""
    monkeypatch.setattr(conftest, "REAL_HOME", tmp_path)
    watched = tmp_path / ".cache" / "vmetal"
    monkeypatch.setattr(conftest, "WATCHED", [watched])
    watched.mkdir(parents=True)
    before = conftest._real_home_state()
    assert conftest._real_home_state() == before
    (watched / "demo" / "m").mkdir(parents=True)
    (watched / "demo" / "m" / "config.json").write_text("{}")
    (tmp_path / ".venv-x").mkdir()
    assert conftest._real_home_state() - before == {str(watched / "demo"), str(watched / "demo" / "m"),
                                                     str(watched / "demo" / "m" / "config.json"), ".venv-x"}
