"""The models `vmetal pull` fetched: a small JSON file under the vmetal home.

The files themselves live in the hub's own cache (Hugging Face's or ModelScope's); this registry only
remembers what vmetal pulled, from where, at which revision, how big it is, and whether the pull finished.
A pull is recorded as `incomplete` before its first byte and `complete` only after every file is verified,
so `vmetal list` can tell an interrupted pull from a usable model. `serve` calls `touch` for "last used".

Stdlib only: `vmetal list` must start instantly.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from vmetal.envs import vmetal_home

COMPLETE = "complete"
INCOMPLETE = "incomplete"
_VERSION = 1


def registry_path() -> Path:
    return vmetal_home() / "models.json"


@dataclass
class PulledModel:
    id: str                       # hub id as given, e.g. `Qwen/Qwen3-0.6B`
    source: str                   # `huggingface` or `modelscope`
    revision: str                 # as asked (`main` when none was given)
    path: str                     # the snapshot folder `serve` loads
    commit: str | None = None     # the commit the revision resolved to
    size: int = 0                 # bytes of the files pulled
    files: int = 0
    status: str = INCOMPLETE
    pulled_at: float | None = None    # epoch seconds when the pull completed
    last_used: float | None = None    # epoch seconds, set by `touch` (serve)
    extra: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.status == COMPLETE

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.source, self.id, self.revision)


def _from_dict(data: dict) -> PulledModel:
    known = {f.name for f in fields(PulledModel)}
    return PulledModel(**{k: v for k, v in data.items() if k in known})


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialise read-modify-write between processes (two pulls finishing at once)."""
    path = registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read() -> list[PulledModel]:
    path = registry_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        # A damaged registry must not stop `list` or `pull`; the models are still in the hub cache.
        return []
    return [_from_dict(item) for item in data.get("models", []) if isinstance(item, dict)]


def _write(models: list[PulledModel]) -> None:
    path = registry_path()
    body = json.dumps({"version": _VERSION, "models": [asdict(m) for m in models]}, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".models-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def pulled_models() -> list[PulledModel]:
    """Every recorded pull, complete or not, oldest first."""
    return _read()


def find(model_id: str, *, source: str | None = None, revision: str | None = None) -> list[PulledModel]:
    """Entries for `model_id` (case-insensitive, as hubs treat ids), optionally narrowed."""
    low = model_id.lower()
    return [m for m in _read() if m.id.lower() == low
            and (source is None or m.source == source)
            and (revision is None or m.revision == revision)]


def upsert(entry: PulledModel) -> PulledModel:
    """Add `entry`, replacing the one with the same (source, id, revision); keeps `last_used`."""
    with _locked():
        models = _read()
        for i, old in enumerate(models):
            if old.key == entry.key:
                if entry.last_used is None:
                    entry.last_used = old.last_used
                models[i] = entry
                break
        else:
            models.append(entry)
        _write(models)
    return entry


def remove(entry: PulledModel) -> None:
    with _locked():
        _write([m for m in _read() if m.key != entry.key])


def touch(model: str, *, when: float | None = None) -> bool:
    """Set `last_used` on the entries whose id or snapshot path is `model`; True if any matched."""
    now = time.time() if when is None else when
    low = model.lower()
    try:
        resolved = str(Path(model).expanduser().resolve())
    except OSError:
        resolved = model
    with _locked():
        models = _read()
        hit = False
        for m in models:
            if m.id.lower() == low or m.path == resolved or m.path == model:
                m.last_used = now
                hit = True
        if hit:
            _write(models)
    return hit
