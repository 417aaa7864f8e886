"""`vmetal pull` killed with SIGKILL at 20 random points in a row, then run to the end: nothing lost or damaged.

Real `vmetal pull` processes against the local hub (tests/support/hubserver.py), which sends slowly enough that a
kill can land anywhere: during start-up, the metadata call, config.json, the downloads (a 12 MB weights
file, so huggingface_hub has written its first 10 MB piece to `<blob>.incomplete` part of the way), the
verification or the linking of the snapshot. SIGKILL leaves no chance to clean up, so what is on disk after
each kill is whatever the code had made durable. The next pull must cope with all of it: afterwards every
file of the snapshot is byte-identical to the hub's, no `.incomplete` is left, and the model is recorded as
complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.support import REPO as CHECKOUT
from tests.support.hubserver import HubServer, Repo
from vmetal.cli.app import app
from vmetal.hub import huggingface as vhub

REPO = "acme/killed-qwen3"
KILLS = 20
WEIGHTS = 12 * 1024 * 1024  # past huggingface_hub's 10 MB write piece: a partial file can survive a kill


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("VMETAL_HOME", str(tmp_path / "vmetal"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for var in ("HF_HUB_CACHE", "HF_TOKEN", "VLLM_USE_MODELSCOPE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.fixture
def repo_files(tmp_path_factory) -> dict[str, bytes]:
    from vmetal.demo import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("killmodel") / "m", "qwen3")
    files = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    files["model.safetensors"] = random.Random(1).randbytes(WEIGHTS)
    return files


def pull_process() -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(CHECKOUT)}
    return subprocess.Popen([sys.executable, "-m", "vmetal.cli.app", "pull", REPO, "--quiet"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def on_disk(storage: Path) -> str:
    """Where a pull stood when it died, read from the cache it left."""
    blobs = storage / "blobs"
    partial = [p for p in blobs.glob("*.incomplete")] if blobs.is_dir() else []
    if (storage / "refs" / "main").is_file():
        return "done"
    if (storage / "snapshots").exists():
        return "linking"
    if any(p.stat().st_size for p in partial):
        return "partial weights"
    if blobs.is_dir() and any(not p.name.endswith(".incomplete") for p in blobs.iterdir()):
        return "some files"
    return "nothing"


def left_to_fetch(storage: Path, files: dict[str, bytes]) -> int:
    """Bytes the next pull still has to fetch: what is neither a finished blob nor kept in a partial."""
    blobs = storage / "blobs"
    if not blobs.is_dir():
        return sum(map(len, files.values()))
    kept = sum(p.stat().st_size for p in blobs.iterdir() if p.is_file())
    return max(0, sum(map(len, files.values())) - kept)


def kill_at_random_point(proc: subprocess.Popen, hub: HubServer, rng: random.Random, todo: int) -> str:
    """SIGKILL `proc` at a random point of its work: a quarter of the time during its first second (start-up,
    the metadata call, config.json), else once the hub has sent it a random share of what is left to fetch."""
    if rng.random() < 0.2 or todo == 0:
        when = "in its first second"
        time.sleep(rng.uniform(0.05, 1.0))
    else:
        when = "mid-download"
        # Short of the end: a kill timed at the very last byte would race the pull's own finish.
        target = hub.bytes_sent() + rng.uniform(0, 0.95 * todo)
        deadline = time.monotonic() + 60
        while hub.bytes_sent() < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    return when if proc.returncode == -signal.SIGKILL else f"finished (exit {proc.returncode}) before it"


def test_twenty_sigkills_then_resume_give_a_byte_identical_model(env, repo_files, monkeypatch):
    rng = random.Random(20)
    with HubServer() as hub:
        repo = hub.add(Repo(REPO, dict(repo_files)))
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        hub.delay_per_chunk = 0.01  # 64 KB chunks: the weights take ~2 s, the other files a moment
        storage = vhub.storage_folder(REPO)

        kills, states = [], []
        for _ in range(KILLS):
            proc = pull_process()
            kills.append(kill_at_random_point(proc, hub, rng, left_to_fetch(storage, repo_files)))
            states.append(on_disk(storage))
            if states[-1] == "done":
                # The resumed pulls got it all in before a kill landed: start again from nothing, so that
                # every one of the kills has a pull to cut short.
                shutil.rmtree(storage)

        last = pull_process()
        _, err = last.communicate(timeout=120)
        assert last.returncode == 0, err.decode()

    snap = storage / "snapshots" / repo.commit
    assert sorted(p.name for p in snap.iterdir()) == sorted(repo_files)
    for name, data in repo_files.items():
        assert (snap / name).read_bytes() == data, f"{name} differs from the hub's"
    assert list((storage / "blobs").glob("*.incomplete")) == []
    assert (storage / "refs" / "main").read_text() == repo.commit
    listed = CliRunner().invoke(app, ["list", "--json"])
    assert listed.exit_code == 0, listed.output
    [entry] = json.loads(listed.stdout)
    assert entry["state"] == "ok" and entry["path"] == str(snap), entry

    # Kills that came after a pull had finished test nothing: most must have cut one short.
    assert sum(k == "mid-download" for k in kills) >= KILLS // 2, kills
    assert "partial weights" in states, states
    print(f"\n{KILLS} SIGKILLs: " + ", ".join(f"{k} x{kills.count(k)}" for k in sorted(set(kills)))
          + "; the cache after each: " + ", ".join(f"{s} x{states.count(s)}" for s in sorted(set(states))))
