"""The Hugging Face download and snapshot store for `vmetal pull` (steps 3 to 5 of the order in
`vmetal.hub.common`), and `vmetal rm`'s removal of a snapshot.

- `download`: every file into the hub cache's blob store, resumable byte for byte, each verified against the
  digest the hub lists (sha256 for LFS files, the git blob id for the others). A cached copy that no longer
  matches is fetched again.
- `finalize`: only now the snapshot folder and the revision's ref appear, so an interrupted pull never leaves a
  folder that `serve` (or `HF_HUB_OFFLINE=1` lookups) would take for a model.

Every request goes through huggingface_hub (`hf_hub_url`, `http_get`); the only thing vmetal adds is keeping
`<blob>.incomplete` across runs: huggingface_hub 2.x throws a partial download away when its process stops, and
a 10 GB shard should not start over after a Ctrl-C.

huggingface_hub is imported inside the functions: the CLI imports this module for `--help`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
from collections.abc import Iterator, Sequence
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
from vmetal.hub.huggingface import RemoteModel, check_online, explain_hub_error, hf_cache_dir, storage_folder


@contextlib.contextmanager
def pull_lock(repo_id: str, cache_dir: Path | None = None) -> Iterator[None]:
    """One `vmetal pull` per model at a time (two would append to the same partial files)."""
    with folder_lock(storage_folder(repo_id, cache_dir), repo_id):
        yield


class _Cancelled(Exception):
    pass


class _Bar:
    """The tqdm stand-in huggingface_hub's `http_get` reports chunks to; it also carries the cancel flag."""

    def __init__(self, *, file: RemoteFile, progress: PullProgress, cancel: threading.Event,
                 counter: list[int], **_: Any) -> None:
        self.file, self.progress, self.cancel, self.counter = file, progress, cancel, counter

    def update(self, n: int | float | None = 1) -> None:
        # Called before each chunk is written: raising here drops that chunk, so the partial file stays a
        # clean prefix of the content.
        if self.cancel.is_set():
            raise _Cancelled()
        n = int(n or 0)
        self.counter[0] += n
        self.progress.advance(self.file, n)

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        pass


def _fetch_one(remote: RemoteModel, f: RemoteFile, blobs: Path, *, token: str | bool | None,
               progress: PullProgress, cancel: threading.Event, stats: DownloadStats,
               lock: threading.Lock) -> None:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    blob = blobs / f.blob
    partial = blobs / (f.blob + ".incomplete")
    url = hf_hub_url(remote.repo_id, f.path, revision=remote.commit, endpoint=remote.endpoint)
    headers = build_hf_headers(token=token)
    headers["Accept-Encoding"] = "identity"  # sizes and resume offsets are about the bytes on disk
    for attempt in (1, 2):
        if partial.is_symlink():
            partial.unlink()  # vmetal never makes one: appending through it would write outside the cache
        done = partial.stat().st_size if partial.exists() else 0
        if done > f.size:
            partial.unlink()
            done = 0
        if done:
            with lock:
                stats.resumed_from[f.path] = done
        progress.file_started(f, done)
        counter = [0]
        bar = functools.partial(_Bar, file=f, progress=progress, cancel=cancel, counter=counter)
        try:
            with open(partial, "ab") as fh:
                http_get(url, fh, resume_size=done, headers=dict(headers), expected_size=f.size,
                         displayed_filename=f.path, tqdm_class=bar)  # type: ignore[arg-type]
        except _Cancelled:
            raise
        except OSError as exc:
            if "Consistency check failed" in str(exc):
                # Wrong length: the partial cannot be trusted as a prefix any more.
                partial.unlink(missing_ok=True)
                if attempt == 1:
                    progress.note(f"`{f.path}` arrived with the wrong size; fetching it again")
                    continue
                raise HubError(f"`{f.path}` keeps arriving with a size other than the {f.size} bytes the hub "
                               "lists", hint="run the pull again later", kind="integrity") from exc
            raise explain_hub_error(exc, remote.repo_id, revision=remote.revision, endpoint=remote.endpoint,
                                    token=token, what=f.path) from exc
        except Exception as exc:  # noqa: BLE001 - translated, or re-raised as is
            raise explain_hub_error(exc, remote.repo_id, revision=remote.revision, endpoint=remote.endpoint,
                                    token=token, what=f.path) from exc
        finally:
            with lock:
                stats.downloaded += counter[0]
        if file_digest_ok(partial, f):
            os.replace(partial, blob)
            progress.file_finished(f)
            return
        partial.unlink(missing_ok=True)
        kind = "sha256" if f.sha256 else "git blob id"
        if attempt == 1:
            progress.note(f"`{f.path}` failed verification ({kind} mismatch); fetching it again")
            continue
        raise HubError(f"`{f.path}` of `{remote.repo_id}` does not match the {kind} the hub lists, "
                       "twice in a row", hint="the hub or a proxy is serving damaged data; try again later",
                       kind="integrity")


def download(remote: RemoteModel, files: Sequence[RemoteFile], *, cache_dir: Path | None = None,
             token: str | bool | None = None, progress: PullProgress | None = None,
             cancel: threading.Event | None = None, workers: int = DEFAULT_WORKERS) -> DownloadStats:
    """Bring every file of `files` into the blob store, verified. Raises `Interrupted` on Ctrl-C/cancel.

    Verified blobs already there are kept; a blob that fails verification is fetched again; a
    `<blob>.incomplete` from an earlier run is resumed from its last byte.
    """
    check_online()
    progress = progress or PullProgress()
    cancel = cancel or threading.Event()
    stats = DownloadStats()
    blobs = storage_folder(remote.repo_id, cache_dir) / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)

    pending: list[RemoteFile] = []
    present = 0
    for f in _unique_blobs(files):
        blob = blobs / f.blob
        if blob.exists():
            if file_digest_ok(blob, f):
                stats.reused.append(f.path)
                present += f.size
                continue
            progress.note(f"the cached `{f.path}` is damaged (digest mismatch); fetching it again")
            stats.refetched.append(f.path)
            blob.unlink()
        pending.append(f)
    partial_bytes = sum(min((blobs / (f.blob + ".incomplete")).stat().st_size, f.size)
                        for f in pending if (blobs / (f.blob + ".incomplete")).exists())
    progress.plan(sum(f.size for f in _unique_blobs(files)), present + partial_bytes)
    if not pending:
        return stats

    # Daemon threads: a worker blocked on a silent connection must not keep Ctrl-C waiting.
    todo: queue.Queue[RemoteFile] = queue.Queue()
    for f in sorted(pending, key=lambda f: f.size):
        todo.put(f)
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work() -> None:
        while not cancel.is_set():
            try:
                f = todo.get_nowait()
            except queue.Empty:
                return
            try:
                _fetch_one(remote, f, blobs, token=token, progress=progress, cancel=cancel, stats=stats,
                           lock=lock)
            except _Cancelled:
                return
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                with lock:
                    errors.append(exc)
                cancel.set()
                return

    threads = [threading.Thread(target=work, daemon=True, name=f"vmetal-pull-{i}")
               for i in range(max(1, min(workers, len(pending))))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.1)
    except KeyboardInterrupt:
        cancel.set()
        for t in threads:
            t.join(2.0)
        raise interrupted(remote.repo_id) from None
    if errors:
        raise errors[0]
    if cancel.is_set():
        raise interrupted(remote.repo_id, "cancelled")
    return stats


def _unique_blobs(files: Sequence[RemoteFile]) -> list[RemoteFile]:
    seen: dict[str, RemoteFile] = {}
    for f in files:
        seen.setdefault(f.blob, f)
    return list(seen.values())


def blob_path(remote: RemoteModel, f: RemoteFile, cache_dir: Path | None = None) -> Path:
    return storage_folder(remote.repo_id, cache_dir) / "blobs" / f.blob


def fetch_json(remote: RemoteModel, path: str, *, cache_dir: Path | None = None,
               token: str | bool | None = None) -> dict[str, Any]:
    """Download (verified, cached) and parse one small JSON file of `remote`, e.g. `config.json`."""
    f = remote.file(path)
    if f is None:
        raise HubError(f"`{remote.repo_id}` has no `{path}`: not a Hugging Face model repo",
                       hint="vmetal serves transformers-style checkpoints (config.json + safetensors)",
                       kind="not_a_model")
    download(remote, [f], cache_dir=cache_dir, token=token)
    return read_json(blob_path(remote, f, cache_dir), path, remote.repo_id)


def finalize(remote: RemoteModel, files: Sequence[RemoteFile], *, cache_dir: Path | None = None) -> Path:
    """Link every (verified) blob into the snapshot folder and write the revision's ref; the folder."""
    from vmetal.hub.safe_paths import is_inside

    storage = storage_folder(remote.repo_id, cache_dir)
    snap = storage / "snapshots" / remote.commit
    for f in files:
        blob = storage / "blobs" / f.blob
        if not blob.is_file():
            raise HubError(f"`{f.path}` is missing from the cache after its download", kind="integrity")
        target = snap / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if not is_inside(storage, target.parent):
            raise HubError(f"`{f.path}` would land outside {storage} (a folder on its way is a symbolic link)",
                           hint=f"remove the link, or the folder {storage}, and pull again", kind="unsafe")
        rel = os.path.relpath(blob, target.parent)
        if target.is_symlink() or target.exists():
            if target.is_symlink() and os.readlink(target) == rel:
                continue
            target.unlink()
        try:
            os.symlink(rel, target)
        except OSError:
            import shutil

            shutil.copyfile(blob, target)  # file systems without symlinks, as huggingface_hub does
    if remote.revision != remote.commit:
        ref = storage / "refs" / remote.revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(ref.name + ".vmetal-tmp")
        tmp.write_text(remote.commit)
        os.replace(tmp, ref)
    return snap


def snapshot_complete(snap: Path, files: Sequence[RemoteFile]) -> bool:
    return all((snap / f.path).is_file() for f in files)


# ----------------------------------------------------------------------------------------- removal


def remove_snapshot(repo_id: str, commit: str | None, *, cache_dir: Path | None = None) -> int:
    """Delete one snapshot of `repo_id` (every one when `commit` is None) and the blobs nothing else
    links to; the whole repo folder when no snapshot is left. Returns bytes freed."""
    import shutil

    from vmetal.hub.safe_paths import UnsafePathError, check_component, linked_component

    root = cache_dir or hf_cache_dir()
    storage = storage_folder(repo_id, root)
    if commit is not None:
        try:
            check_component(commit, "commit")
        except UnsafePathError as exc:
            raise HubError(f"not removing `{repo_id}`: its recorded {exc}", kind="unsafe",
                           hint="the registry of pulled models looks damaged; nothing was deleted") from None
    for folder in (storage, storage / "snapshots", storage / "blobs", storage / "refs"):
        link = linked_component(root, folder)
        if link is not None:
            # vmetal never links these folders; following one would delete whatever it points to.
            raise HubError(f"not removing `{repo_id}`: `{link}` is a symbolic link, which vmetal never makes",
                           hint="delete the link yourself if you want it gone; nothing was deleted", kind="unsafe")
    if not storage.exists():
        return 0
    snaps = storage / "snapshots"
    doomed = [snaps / commit] if commit else (list(snaps.iterdir()) if snaps.is_dir() else [])
    for d in doomed:
        shutil.rmtree(d, ignore_errors=True)
    refs = storage / "refs"
    if refs.is_dir():
        for ref in refs.rglob("*"):
            if ref.is_file() and (commit is None or ref.read_text().strip() == commit):
                ref.unlink()
    left = [d for d in snaps.iterdir()] if snaps.is_dir() else []
    freed = 0
    blobs = storage / "blobs"
    if not left:
        freed = sum(p.stat().st_size for p in blobs.iterdir() if p.is_file()) if blobs.is_dir() else 0
        shutil.rmtree(storage, ignore_errors=True)
        return freed
    used = {os.path.realpath(p) for d in left for p in d.rglob("*") if p.is_symlink()}
    if blobs.is_dir():
        for b in blobs.iterdir():
            if b.is_file() and str(b.resolve()) not in used:
                freed += b.stat().st_size
                b.unlink()
    return freed
