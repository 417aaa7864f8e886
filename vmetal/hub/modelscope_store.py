"""The ModelScope download and snapshot folder for `vmetal pull --source modelscope` (steps 3 to 5 of the order in
`vmetal.hub.modelscope`), and `vmetal rm`'s removal of what such a pull recorded.

vmetal drives `modelscope_hub`'s `download_repo` and adds the staging folder and the checks around it:

- Files are fetched into `<repo>/.vmetal-partial/<revision>/` (`download_repo(local_dir=…)`), where ModelScope keeps
  `<file>.incomplete` across runs and resumes it with an HTTP Range request: a pull stopped by Ctrl-C, a crash or a
  dropped connection continues from its last byte when run again. (With MODELSCOPE_DOWNLOAD_PARALLEL_WORKERS > 1,
  files over 500 MB come in ranged parts that are kept and resumed the same way; `resumed` then does not count
  them.) Each file gets a day in all unless MODELSCOPE_DOWNLOAD_TOTAL_TIMEOUT says otherwise (ModelScope's own
  default, an hour, is too short for a large shard on a slow line); stalls are still cut after a minute.
- ModelScope's client verifies each download against the listed sha256 (and size) and fetches a mismatch again;
  vmetal verifies what is already on disk before reusing it, and a damaged copy is fetched again.
- `finalize` moves the verified files into `snapshots/<revision>`, ModelScope's own layout.

`modelscope_hub` is imported inside the functions: the CLI imports this module for `--help`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmetal.hub.common import (
    DEFAULT_WORKERS,
    DownloadStats,
    HubError,
    PullProgress,
    RemoteFile,
    file_digest_ok,
    folder_lock,
    interrupted,
    read_json,
)
from vmetal.hub.modelscope import REPO_TYPE, STAGING, MsModel, explain_error, quiet_client, repo_folder


def pull_lock(repo_id: str, cache: Path) -> contextlib.AbstractContextManager[None]:
    """One `vmetal pull` per model at a time (two would write the same partial files)."""
    return folder_lock(repo_folder(repo_id, cache), repo_id)


def _ok(path: Path, f: RemoteFile) -> bool:
    return path.is_file() and file_digest_ok(path, f)


def local_copy(remote: MsModel, f: RemoteFile) -> Path | None:
    """The verified copy of `f` on disk (in the snapshot or the staging folder), if there is one."""
    for base in (remote.snapshot, remote.staging):
        if _ok(base / f.path, f):
            return base / f.path
    return None


def download(remote: MsModel, files: Sequence[RemoteFile], *, progress: PullProgress | None = None,
             workers: int = DEFAULT_WORKERS) -> DownloadStats:
    """Bring every file of `files` to disk, verified: in the snapshot already, or in the staging folder.

    Verified copies are kept; a damaged copy is fetched again; `<file>.incomplete` from an earlier run is resumed
    from its last byte (by ModelScope's client). Raises `Interrupted` on Ctrl-C.
    """
    progress = progress or PullProgress()
    stats = DownloadStats()
    snap, staging = remote.snapshot, remote.staging
    pending: list[RemoteFile] = []
    present = 0
    for f in files:
        in_snap, in_staging = snap / f.path, staging / f.path
        if in_snap.is_file():
            if _ok(in_snap, f):
                stats.reused.append(f.path)
                present += f.size
                continue
            # Left in place until its verified replacement lands (finalize), so no file goes missing meanwhile.
            progress.note(f"the cached `{f.path}` does not match what ModelScope lists ({_what_differs(in_snap, f)}:"
                          " damaged, or updated upstream); fetching it again")
            stats.refetched.append(f.path)
        if in_staging.is_file():
            if _ok(in_staging, f):
                stats.reused.append(f.path)
                present += f.size
                continue
            in_staging.unlink()
        pending.append(f)
    resumed: dict[str, int] = {}
    for f in pending:
        part = staging / (f.path + ".incomplete")
        if part.is_file() and 0 < part.stat().st_size <= f.size:
            resumed[f.path] = part.stat().st_size
    stats.resumed_from.update(resumed)
    progress.plan(sum(f.size for f in files), present + sum(resumed.values()))
    if not pending:
        return stats
    unchecked = [f.path for f in pending if not f.sha256]
    if unchecked:
        progress.note("ModelScope lists no sha256 for " + ", ".join(f"`{p}`" for p in unchecked[:3])
                      + (", …" if len(unchecked) > 3 else "") + "; checked by size only")

    from modelscope_hub import ProgressCallback

    by_path = {f.path: f for f in pending}
    lock = threading.Lock()

    class Callback(ProgressCallback):
        """One per file, made by ModelScope's downloader: bytes to vmetal's progress and stats."""

        def __init__(self, filename: str, file_size: int) -> None:
            super().__init__(filename, file_size)
            self.file = by_path.get(filename) or RemoteFile(filename, int(file_size or 0))
            self.resume = resumed.get(filename, 0)
            self.first = True
            progress.file_started(self.file, self.resume)

        def update(self, size: int) -> None:
            if self.first:
                self.first = False
                if self.resume and size == self.resume:
                    return  # the bytes an earlier run left, which ModelScope counts first
            if size > 0:
                with lock:
                    stats.downloaded += size
            progress.advance(self.file, size)

        def end(self) -> None:
            if (staging / self.file.path).is_file():
                progress.file_finished(self.file)

    staging.mkdir(parents=True, exist_ok=True)
    listing = [{"Path": f.path, "Size": f.size, "Sha256": f.sha256, "Type": "blob"} for f in pending]
    try:
        with quiet_client(progress):
            remote.api.download_repo(remote.repo_id, REPO_TYPE, revision=remote.revision, cache_dir=remote.cache,
                                     local_dir=staging, file_list=listing, max_workers=max(1, workers),
                                     progress_callbacks=[Callback])
    except KeyboardInterrupt:
        raise interrupted(remote.repo_id) from None
    except Exception as exc:  # noqa: BLE001 - translated, or re-raised as is
        raise explain_error(exc, remote.repo_id, endpoint=remote.endpoint, revision=remote.revision) from exc
    for f in pending:
        got = staging / f.path
        if not got.is_file() or got.stat().st_size != f.size:
            raise HubError(f"`{f.path}` is missing or truncated after its download from ModelScope",
                           hint="run the pull again", kind="integrity")
    return stats


def _what_differs(path: Path, f: RemoteFile) -> str:
    try:
        size = path.stat().st_size
    except OSError:
        return "unreadable"
    return "size mismatch" if size != f.size else "sha256 mismatch"


def fetch_json(remote: MsModel, path: str, *, progress: PullProgress | None = None) -> dict[str, Any]:
    """Download (verified) and parse one small JSON file of `remote`, e.g. `config.json`."""
    f = remote.file(path)
    if f is None:
        raise HubError(f"`{remote.repo_id}` has no `{path}`: not a transformers-style model repo",
                       hint="vmetal serves transformers-style checkpoints (config.json + safetensors)",
                       kind="not_a_model")
    download(remote, [f], progress=progress)
    copy = local_copy(remote, f)
    if copy is None:
        raise HubError(f"`{path}` of `{remote.repo_id}` is missing after its download", kind="integrity")
    return read_json(copy, path, remote.repo_id)


def finalize(remote: MsModel, files: Sequence[RemoteFile], *, progress: PullProgress | None = None) -> Path:
    """Move the verified files from the staging folder into `snapshots/<revision>`; the snapshot folder.

    A new snapshot appears in one rename, complete; an existing one gets each new file by an atomic replace.
    Root-level `model*.safetensors` the revision no longer lists are removed from it (mlx-lm loads every one).
    """
    progress = progress or PullProgress()
    snap, staging = remote.snapshot, remote.staging
    if not snap.is_dir() or not any(snap.iterdir()):
        # Exactly the files of this pull: not partials, not what an earlier, different pull left in staging.
        wanted = {f.path for f in files}
        for leftover in [p for p in staging.rglob("*") if p.is_file() or p.is_symlink()]:
            if leftover.relative_to(staging).as_posix() not in wanted:
                leftover.unlink()
        snap.parent.mkdir(parents=True, exist_ok=True)
        if snap.is_dir():
            snap.rmdir()
        staging.mkdir(parents=True, exist_ok=True)
        os.rename(staging, snap)
    else:
        for f in files:
            src = staging / f.path
            if src.is_file():
                (snap / f.path).parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, snap / f.path)
        listed = {f.path for f in remote.files}
        for stale in sorted(snap.glob("model*.safetensors")):
            if stale.name not in listed:
                progress.note(f"removing `{stale.name}` from {snap}: revision `{remote.revision}` no longer has it")
                stale.unlink()
        shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        (repo_folder(remote.repo_id, remote.cache) / STAGING).rmdir()   # only when empty
    missing = [f.path for f in files if not (snap / f.path).is_file()]
    if missing:
        raise HubError(f"`{missing[0]}` is missing from {snap} after the pull", hint="run the pull again",
                       kind="integrity")
    return snap


# ----------------------------------------------------------------------------------------- removal


def remove_snapshot(path: str | Path, revision: str) -> int:
    """Delete the snapshot folder a pull recorded (`…/models/<owner>--<name>/snapshots/<revision>`), its staging
    folder, and the repo folder once no snapshot is left. Returns bytes freed; 0 for a path of another shape."""
    from vmetal.hub.safe_paths import UnsafePathError, check_relative, linked_component

    try:
        check_relative(revision, "revision")
    except UnsafePathError:
        return 0  # not a shape a pull records: nothing of it is vmetal's to delete
    snap = Path(path)
    depth = len(Path(revision).parts)
    snapshots = snap
    for _ in range(depth):
        snapshots = snapshots.parent
    try:
        if snapshots.name != "snapshots" or snap.relative_to(snapshots).as_posix() != revision:
            return 0
    except ValueError:
        return 0
    repo = snapshots.parent
    if linked_component(repo.parent, snap) is not None or repo.is_symlink():
        return 0  # vmetal never links these folders; following one would delete what it points to
    freed = 0
    for d in (snap, repo / STAGING / revision.replace("/", "--")):
        if d.is_dir():
            freed += sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and not p.is_symlink())
            shutil.rmtree(d, ignore_errors=True)
    # Empty parents of a revision with a `/` in it, then the repo folder when nothing else is in it.
    parent = snap.parent
    while parent != snapshots and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent
    with contextlib.suppress(OSError):
        (repo / STAGING).rmdir()
    if not (snapshots.is_dir() and any(snapshots.iterdir())):
        shutil.rmtree(repo, ignore_errors=True)
