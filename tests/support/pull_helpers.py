"""What the `vmetal pull` tests against the local Hugging Face hub (test_pull.py) and the local ModelScope hub
(test_pull_modelscope.py) share: the tiny repo's files, isolated homes, a big repo to cut a download in, a file
damaged on disk, a pull interrupted by Ctrl-C."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support import REPO

SERVE_FILES = {"config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
               "tokenizer.json", "tokenizer_config.json"}


def tiny_repo_files(folder: Path) -> dict[str, bytes]:
    """A tiny Qwen3's files, and what real repos carry besides: duplicate weights in other formats, docs."""
    from vmetal.demo import build_tiny_model

    path = build_tiny_model(folder / "m", "qwen3")
    files = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    assert set(files) == SERVE_FILES
    files["pytorch_model.bin"] = b"\0" * 4096
    files["original/consolidated.pth"] = b"\1" * 4096
    files["README.md"] = b"# tiny\n"
    return files


def isolate_homes(tmp_path: Path, monkeypatch, unset: tuple[str, ...] = ()) -> None:
    """Hugging Face's and vmetal's homes under `tmp_path`, online, with no token and no hub chosen by the
    environment; `unset`: more variables to clear."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("VMETAL_HOME", str(tmp_path / "vmetal"))
    for var in ("HF_HUB_CACHE", "HF_TOKEN", "VLLM_USE_MODELSCOPE", "HF_HUB_OFFLINE", *unset):
        monkeypatch.delenv(var, raising=False)


def big_files(tiny_files: dict[str, bytes], size: int) -> dict[str, bytes]:
    """The tiny repo's top-level files but the `.bin`, with `size` bytes of random weights to cut a download in."""
    files = {k: v for k, v in tiny_files.items() if "/" not in k and not k.endswith(".bin")}
    files["model.safetensors"] = random.Random(0).randbytes(size)
    return files


def with_chunked_attention(files: dict[str, bytes]) -> dict[str, bytes]:
    """The tiny repo relabelled as a model whose layers keep chunked-attention caches
    (`families.as_chunked_attention`), which vmetal refuses."""
    from tests.support.families import as_chunked_attention

    return {**files, "config.json": json.dumps(as_chunked_attention(json.loads(files["config.json"]))).encode()}


def damage(path: Path, at: int = 100) -> None:
    """Flip one byte of a file on disk, as a failing disk or a stray write would."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a `python -m vmetal.cli.app` child: this one's, with this checkout importable."""
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def interrupt_pull(args: list[str], partial: Path, size: int, **env: str) -> tuple[int, str]:
    """`vmetal pull ARGS` in a child process, stopped by Ctrl-C once `partial` holds `size` bytes: its exit code
    and stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "vmetal.cli.app", "pull", *args], env=child_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (partial.exists() and partial.stat().st_size >= size):
            assert time.time() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err
