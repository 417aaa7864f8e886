"""Shared fixtures: tiny random-weight models built on the spot, isolated user dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The plugin activates only when asked on non-Apple hosts; every test process
# (and the engine processes vLLM spawns from it) should see it active.
os.environ.setdefault("VMETAL_ENABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.support.hub_fixtures"]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def qwen3_model(models_dir) -> Path:
    from vmetal.demo import build_tiny_model

    return build_tiny_model(models_dir / "qwen3", "qwen3", hidden_size=64, num_layers=2)


@pytest.fixture(scope="session")
def llama_model(models_dir) -> Path:
    from vmetal.demo import build_tiny_model

    return build_tiny_model(models_dir / "llama", "llama", hidden_size=64, num_layers=2, seed=1)
