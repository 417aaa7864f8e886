"""One `Hub` protocol, two implementations: Hugging Face and ModelScope.

A pull runs the same steps against either hub (`vmetal.hub.pull`, in the order `vmetal.hub.common` gives);
what differs is behind this protocol: how a repo is listed, where its files go, how it is locked, finalised
and removed, and how the hub is named in messages. `hub_for(source)` picks one; nothing else branches on the
source.

The listing, download and store code itself is in `huggingface.py` / `huggingface_store.py` and
`modelscope.py` / `modelscope_store.py`; this module only adapts it. Their clients are imported inside the
functions, so the CLI can import this module for `--help`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from vmetal.hub import registry
from vmetal.hub.common import HUGGINGFACE, MODELSCOPE, DownloadStats, HubError, PullProgress, RemoteFile


class Hub(Protocol):
    """What a pull needs of a hub; `remote` is that hub's listing (`vmetal.hub.common.Listing`)."""

    source: str  # the registry's name for it: `huggingface` | `modelscope`
    origin: str  # how messages name it after a model id: "" or " from ModelScope"

    def require_client(self) -> None:
        """Raise a HubError saying how to install the hub's client when it is missing."""

    def info(self, repo_id: str, revision: str | None) -> Any:
        """The listing of `repo_id` at `revision` (the hub's default branch when None)."""

    def where(self, remote: Any) -> str:
        """The revision as the plan line shows it, e.g. `main (0123456789ab)`."""

    def lock(self, remote: Any) -> contextlib.AbstractContextManager[None]:
        """One pull per model at a time."""

    def fetch_json(self, remote: Any, path: str) -> dict[str, Any]:
        """One small JSON file (`config.json`), downloaded verified and parsed."""

    def record(self, remote: Any, files: Sequence[RemoteFile], size: int) -> registry.PulledModel:
        """The registry entry of this pull, still incomplete."""

    def download(self, remote: Any, files: Sequence[RemoteFile], progress: PullProgress) -> DownloadStats:
        """Every file, resumable and verified."""

    def finalize(self, remote: Any, files: Sequence[RemoteFile], progress: PullProgress) -> Path:
        """Make the snapshot folder appear, now that every file is verified; the folder."""

    def serve_hint(self, remote: Any, snapshot: Path) -> str:
        """The command that serves what was pulled."""

    def remove(self, entry: registry.PulledModel, others: Sequence[registry.PulledModel]) -> str | None:
        """Delete `entry`'s files (unless `others` of the same model still need them); a warning when its
        folder was left alone."""


class HuggingFaceHub:
    source = HUGGINGFACE
    origin = ""

    def require_client(self) -> None:
        return  # huggingface_hub is a dependency of vmetal

    def info(self, repo_id: str, revision: str | None) -> Any:
        from vmetal.hub import huggingface

        return huggingface.fetch_info(repo_id, revision=revision)

    def where(self, remote: Any) -> str:
        return f"{remote.revision} ({remote.commit[:12]})"

    def lock(self, remote: Any) -> contextlib.AbstractContextManager[None]:
        from vmetal.hub import huggingface_store

        return huggingface_store.pull_lock(remote.repo_id)

    def fetch_json(self, remote: Any, path: str) -> dict[str, Any]:
        from vmetal.hub import huggingface_store

        return huggingface_store.fetch_json(remote, path)

    def record(self, remote: Any, files: Sequence[RemoteFile], size: int) -> registry.PulledModel:
        from vmetal.hub import huggingface

        return registry.PulledModel(id=remote.repo_id, source=self.source, revision=remote.revision,
                                    commit=remote.commit, path=str(huggingface.snapshot_path(remote)), size=size,
                                    files=len(files), status=registry.INCOMPLETE)

    def download(self, remote: Any, files: Sequence[RemoteFile], progress: PullProgress) -> DownloadStats:
        from vmetal.hub import huggingface_store

        return huggingface_store.download(remote, files, progress=progress)

    def finalize(self, remote: Any, files: Sequence[RemoteFile], progress: PullProgress) -> Path:
        from vmetal.hub import huggingface_store

        return huggingface_store.finalize(remote, files)

    def serve_hint(self, remote: Any, snapshot: Path) -> str:
        return f"`vmetal serve {remote.repo_id}`"

    def remove(self, entry: registry.PulledModel, others: Sequence[registry.PulledModel]) -> str | None:
        from vmetal.hub import huggingface_store

        # Revisions that resolved to the same commit share its snapshot folder.
        if not any(o.commit == entry.commit for o in others):
            huggingface_store.remove_snapshot(entry.id, entry.commit)
        return None


class ModelScopeHub:
    """ModelScope through its own client; nothing here ever reaches Hugging Face."""

    source = MODELSCOPE
    origin = " from ModelScope"

    def require_client(self) -> None:
        from vmetal.hub import modelscope

        # `import modelscope` itself is not needed and costs seconds (torch); its hub client is.
        modelscope.require_client()

    def info(self, repo_id: str, revision: str | None) -> Any:
        from vmetal.hub import modelscope

        return modelscope.fetch_info(repo_id, revision=revision)

    def where(self, remote: Any) -> str:
        return f"{remote.revision} from ModelScope ({remote.endpoint})"

    def lock(self, remote: Any) -> contextlib.AbstractContextManager[None]:
        from vmetal.hub import modelscope_store

        return modelscope_store.pull_lock(remote.repo_id, remote.cache)

    def fetch_json(self, remote: Any, path: str) -> dict[str, Any]:
        from vmetal.hub import modelscope_store

        return modelscope_store.fetch_json(remote, path, progress=PullProgress())

    def record(self, remote: Any, files: Sequence[RemoteFile], size: int) -> registry.PulledModel:
        return registry.PulledModel(id=remote.repo_id, source=self.source, revision=remote.revision, commit=None,
                                    path=str(remote.snapshot), size=size, files=len(files),
                                    status=registry.INCOMPLETE, extra={"endpoint": remote.endpoint})

    def download(self, remote: Any, files: Sequence[RemoteFile], progress: PullProgress) -> DownloadStats:
        from vmetal.hub import modelscope_store

        return modelscope_store.download(remote, files, progress=progress)

    def finalize(self, remote: Any, files: Sequence[RemoteFile], progress: PullProgress) -> Path:
        from vmetal.hub import modelscope_store

        return modelscope_store.finalize(remote, files, progress=progress)

    def serve_hint(self, remote: Any, snapshot: Path) -> str:
        return f"`vmetal serve {snapshot}` (or `VLLM_USE_MODELSCOPE=true vmetal serve {remote.repo_id}`)"

    def remove(self, entry: registry.PulledModel, others: Sequence[registry.PulledModel]) -> str | None:
        from vmetal.hub import modelscope_store

        # The folder recorded at pull time: the cache settings may have changed since.
        if not modelscope_store.remove_snapshot(entry.path, entry.revision) and Path(entry.path).exists():
            return f"left {entry.path} alone: not a ModelScope snapshot folder"
        return None


HUBS: dict[str, Hub] = {HUGGINGFACE: HuggingFaceHub(), MODELSCOPE: ModelScopeHub()}


def hub_for(source: str) -> Hub:
    try:
        return HUBS[source]
    except KeyError:
        raise HubError(f"unknown source `{source}`: expected `huggingface` or `modelscope`", kind="usage",
                       exit_code=2) from None
