"""Shared fixtures: tiny random-weight models built on the spot, isolated user dirs."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

# The plugin activates only when asked on non-Apple hosts; every test process
# (and the engine processes vLLM spawns from it) should see it active.
os.environ.setdefault("VMETAL_ENABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlx_greedy(path: Path, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """mlx-lm's own greedy generation: the reference every engine path must match."""
    from mlx_lm import load
    from mlx_lm.generate import stream_generate

    model, tokenizer = _mlx_cache.get(str(path)) or _mlx_cache.setdefault(str(path), load(str(path)))
    out = []
    for resp in stream_generate(model, tokenizer, prompt=prompt_ids, max_tokens=max_tokens):
        out.append(int(resp.token))
    return out[:max_tokens]


_mlx_cache: dict = {}
