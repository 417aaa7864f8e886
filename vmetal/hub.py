"""Hugging Face / ModelScope resolution and download for `vmetal pull`.

What a pull does, in order, so that a wrong id or an oversized model costs no gigabytes:

1. `fetch_info`: one metadata call (file list with sizes and digests, the commit the revision resolves to).
2. `select_files`: only what serving needs (config, tokenizer, `model*.safetensors` and their index).
3. `fetch_json(remote, "config.json")`: the caller checks the architecture and the fit before any weight.
4. `download`: every file into the hub cache's blob store, resumable byte for byte, each verified against
   the digest the hub lists (sha256 for LFS files, the git blob id for the others). A cached copy that no
   longer matches is fetched again.
5. `finalize`: only now the snapshot folder and the revision's ref appear, so an interrupted pull never
   leaves a folder that `serve` (or `HF_HUB_OFFLINE=1` lookups) would take for a model.

The cache layout is huggingface_hub's own (`models--org--name/{blobs,snapshots,refs}`, blobs named by their
etag, which is the sha256 for LFS files and the git blob id otherwise), so huggingface_hub, vLLM and mlx-lm
find what vmetal pulled and vice versa. Every request goes through huggingface_hub (`HfApi`, `http_get`);
the only thing vmetal adds is keeping `<blob>.incomplete` across runs: huggingface_hub 2.x throws a partial
download away when its process stops, and a 10 GB shard should not start over after a Ctrl-C.

huggingface_hub is imported inside the functions: the CLI imports this module for `--help`.

ModelScope (`--source modelscope`, VLLM_USE_MODELSCOPE=true) follows the same order in `vmetal.modelscope_hub`,
through ModelScope's own client; nothing there ever reaches Hugging Face.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import fnmatch
import functools
import hashlib
import json
import os
import queue
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HUGGINGFACE = "huggingface"
MODELSCOPE = "modelscope"
SOURCE_ALIASES = {"huggingface": HUGGINGFACE, "hf": HUGGINGFACE, "modelscope": MODELSCOPE, "ms": MODELSCOPE}

# Root-level files that serving reads; mlx-lm loads `model*.safetensors` only, so other weight formats
# (`*.bin`, `*.pth`, `*.gguf`, `consolidated.safetensors`) would be duplicates nobody loads.
SERVE_PATTERNS: tuple[str, ...] = (
    "*.json", "model*.safetensors", "tokenizer.model", "tiktoken.model", "*.tiktoken", "*.txt", "*.jinja",
)
WEIGHT_PATTERN = "model*.safetensors"
OTHER_WEIGHTS = ("*.bin", "*.pth", "*.pt", "*.gguf", "*.safetensors", "*.ckpt", "*.h5", "*.msgpack", "*.onnx")

DEFAULT_REVISION = "main"
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_HASH_CHUNK = 8 * 1024 * 1024
DEFAULT_WORKERS = 4


class HubError(Exception):
    """A pull that cannot go on, said so a user can act on it: `message`, an optional `hint`."""

    def __init__(self, message: str, hint: str | None = None, *, kind: str = "error",
                 exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.kind = kind          # auth | not_found | revision | server | network | integrity | source | ...
        self.exit_code = exit_code


class Interrupted(HubError):
    """Ctrl-C (or a cancel) during a download; what was fetched so far is kept for the next pull."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint, kind="interrupted", exit_code=130)


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None = None     # LFS files: the content's sha256
    git_oid: str | None = None    # git blob id (sha1 of `blob <size>\0<content>`)

    @property
    def blob(self) -> str:
        """The name huggingface_hub gives this file's blob (its etag)."""
        name = self.sha256 or self.git_oid
        if not name:
            raise HubError(f"the hub lists no digest for `{self.path}`", kind="integrity")
        return name


@dataclass
class RemoteModel:
    repo_id: str
    source: str
    revision: str           # as asked
    commit: str             # what it resolved to
    files: list[RemoteFile]
    endpoint: str

    def file(self, path: str) -> RemoteFile | None:
        return next((f for f in self.files if f.path == path), None)


@dataclass
class DownloadStats:
    downloaded: int = 0           # bytes fetched by this run
    resumed_from: dict[str, int] = field(default_factory=dict)   # file -> bytes already there
    refetched: list[str] = field(default_factory=list)           # cached copies that failed verification
    reused: list[str] = field(default_factory=list)              # verified cached copies


class PullProgress:
    """What a download reports; this base shows nothing (`--quiet`, `--json`, not a terminal)."""

    def plan(self, total: int, present: int) -> None: ...
    def file_started(self, file: RemoteFile, done: int) -> None: ...
    def advance(self, file: RemoteFile, n: int) -> None: ...
    def file_finished(self, file: RemoteFile) -> None: ...
    def note(self, message: str) -> None: ...


# --------------------------------------------------------------------------------------------- where


def resolve_source(source: str | None, environ: Mapping[str, str] | None = None) -> str:
    """`--source` if given, else ModelScope when VLLM_USE_MODELSCOPE is true, else Hugging Face."""
    if source is not None:
        key = source.strip().lower()
        if key not in SOURCE_ALIASES:
            raise HubError(f"unknown source `{source}`: expected `huggingface` (`hf`) or `modelscope`",
                           kind="usage", exit_code=2)
        return SOURCE_ALIASES[key]
    from vmetal import envs

    cfg = envs.load_config(os.environ if environ is None else environ)
    return MODELSCOPE if cfg.use_modelscope else HUGGINGFACE


def looks_local(model: str) -> bool:
    """A path rather than a hub id (`name` or `org/name`)."""
    return (model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model
            or Path(model).expanduser().is_dir())


def hf_endpoint(endpoint: str | None = None) -> str:
    """`HF_ENDPOINT` read now (huggingface_hub reads it once, at import)."""
    if endpoint:
        return endpoint.rstrip("/")
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hf_cache_dir() -> Path:
    """huggingface_hub's cache folder, with `HF_HUB_CACHE` / `HF_HOME` read now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def storage_folder(repo_id: str, cache_dir: Path | None = None) -> Path:
    return (cache_dir or hf_cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def snapshot_path(remote: RemoteModel, cache_dir: Path | None = None) -> Path:
    return storage_folder(remote.repo_id, cache_dir) / "snapshots" / remote.commit


# ----------------------------------------------------------------------------------------- metadata


def _check_online() -> None:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise HubError("HF_HUB_OFFLINE is set, and `vmetal pull` needs the network",
                       hint="unset HF_HUB_OFFLINE (or run `HF_HUB_OFFLINE=0 vmetal pull …`)", kind="offline")


def require_modelscope() -> Any:
    """ModelScope's hub client (`modelscope_hub`, installed with `modelscope`), or a HubError saying how to get
    it (never a silent Hugging Face pull). `import modelscope` itself is not needed and costs seconds (torch)."""
    from vmetal import modelscope_hub

    return modelscope_hub.require_client()


def fetch_info(repo_id: str, *, revision: str | None = None, token: str | bool | None = None,
               endpoint: str | None = None) -> RemoteModel:
    """The file list (sizes, digests) of `repo_id` at `revision` and the commit it resolves to."""
    revision = revision or DEFAULT_REVISION
    _check_revision(revision)
    _check_online()
    from huggingface_hub import HfApi

    endpoint = hf_endpoint(endpoint)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as exc:  # noqa: BLE001 - translated into what the user should do, or re-raised
        raise explain_hub_error(exc, repo_id, revision=revision, endpoint=endpoint, token=token) from exc
    if not info.sha:
        raise HubError(f"{endpoint} did not say which commit `{revision}` of `{repo_id}` is",
                       hint="is HF_ENDPOINT a Hugging Face compatible hub?", kind="server")
    files = []
    for s in info.siblings or []:
        lfs = s.lfs
        size = lfs.size if lfs is not None else s.size
        files.append(RemoteFile(path=s.rfilename, size=int(size or 0),
                                sha256=lfs.sha256 if lfs is not None else None, git_oid=s.blob_id))
    return check_listing(RemoteModel(repo_id=info.id or repo_id, source=HUGGINGFACE, revision=revision,
                                     commit=info.sha, files=files, endpoint=endpoint))


def _check_revision(revision: str) -> None:
    # `refs/pr/1` is a revision; `../x` would put the revision's ref file outside the cache.
    from vmetal.safe_paths import UnsafePathError, check_relative

    try:
        check_relative(revision, "revision")
    except UnsafePathError as exc:
        raise HubError(str(exc), hint="pass a branch, tag or commit to `--revision`", kind="usage",
                       exit_code=2) from None


def check_listing(remote: RemoteModel) -> RemoteModel:
    """Refuse a listing whose names would reach outside the cache: file paths, digests (blob names), commit.

    Names come from the hub and are joined onto cache folders; git never produces such names, so a hub that
    sends one is broken or hostile, and nothing of it is downloaded.
    """
    from vmetal.safe_paths import UnsafePathError, check_component, check_digest, check_relative

    try:
        if remote.source == HUGGINGFACE:
            check_digest(remote.commit, "sha1", f"the commit of `{remote.repo_id}`")
        for f in remote.files:
            check_relative(f.path, "file")
            check_digest(f.sha256, "sha256", f"`{f.path}`")
            if remote.source == HUGGINGFACE:
                check_digest(f.git_oid, "sha1", f"`{f.path}`")
        if remote.commit:
            check_component(remote.commit, "commit")
    except UnsafePathError as exc:
        raise HubError(f"{remote.endpoint} listed an unsafe name for `{remote.repo_id}`: {exc}; nothing was "
                       "downloaded", hint="the hub (or HF_ENDPOINT / a proxy) is broken or hostile; do not "
                       "pull from it", kind="unsafe") from None
    return remote


def select_files(paths: Iterable[str], include: Sequence[str] = ()) -> list[str]:
    """Root-level files serving needs, plus whatever `include` patterns name (any folder)."""
    out = []
    for p in paths:
        root = "/" not in p
        if (root and any(fnmatch.fnmatchcase(p, pat) for pat in SERVE_PATTERNS)) or any(
                fnmatch.fnmatchcase(p, pat) for pat in include):
            out.append(p)
    return sorted(out)


def weight_files(paths: Iterable[str]) -> list[str]:
    return [p for p in paths if "/" not in p and fnmatch.fnmatchcase(p, WEIGHT_PATTERN)]


def other_weights(paths: Iterable[str]) -> list[str]:
    return sorted(p for p in paths if any(fnmatch.fnmatchcase(p.rsplit("/", 1)[-1], pat)
                                          for pat in OTHER_WEIGHTS) and p not in weight_files([p]))


def suggest(repo_id: str, *, endpoint: str | None = None, token: str | bool | None = None,
            limit: int = 5) -> list[str]:
    """Hub ids close to `repo_id`, from the hub's search; empty when the hub offers none."""
    from huggingface_hub import HfApi

    name = repo_id.rsplit("/", 1)[-1]
    terms = [name] + [t for t in re.split(r"[-_.]", name) if len(t) >= 3 and t != name][:2]
    found: list[str] = []
    try:
        api = HfApi(endpoint=hf_endpoint(endpoint), token=token)
        for term in terms:
            for m in api.list_models(search=term, limit=20):
                if m.id not in found:
                    found.append(m.id)
            if found:
                break
    except Exception:  # noqa: BLE001 - suggestions are a courtesy; the error is reported either way
        return []
    low = {f.lower(): f for f in found}
    close = difflib.get_close_matches(repo_id.lower(), list(low), n=limit, cutoff=0.3)
    ranked = [low[c] for c in close] + [f for f in found if f.lower() not in close]
    return ranked[:limit]


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def explain_hub_error(exc: BaseException, repo_id: str, *, revision: str | None = None,
                      endpoint: str | None = None, token: str | bool | None = None,
                      what: str | None = None) -> BaseException:
    """The HubError a user should see for a huggingface_hub / network exception (or `exc` itself)."""
    import httpx2
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    endpoint = hf_endpoint(endpoint)
    login = "log in with `hf auth login` or set HF_TOKEN to a token that can read it"
    status = _status(exc)
    if isinstance(exc, HubError):
        return exc
    if isinstance(exc, HFValidationError):
        # huggingface_hub's own check of the id (`..`, `--`, characters): nothing was sent anywhere.
        return HubError(f"`{repo_id}` is not a valid model id: {str(exc).splitlines()[0]}",
                        hint="a Hub id is `org/name`; a local folder is a path such as `./my-model`",
                        kind="usage", exit_code=2)
    if isinstance(exc, OfflineModeIsEnabled):
        return HubError("HF_HUB_OFFLINE is set, and `vmetal pull` needs the network",
                        hint="unset HF_HUB_OFFLINE", kind="offline")
    if isinstance(exc, GatedRepoError):
        return HubError(f"`{repo_id}` is a gated model: the hub wants you to accept its terms first "
                        f"(HTTP {status})",
                        hint=f"accept them at {endpoint}/{repo_id}, then {login}", kind="auth")
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"revision `{revision}` of `{repo_id}` does not exist",
                        hint="pass a branch, tag or commit of that repo to `--revision`", kind="revision")
    if isinstance(exc, RemoteEntryNotFoundError):
        return HubError(f"`{what or '?'}` of `{repo_id}` is listed by the hub but could not be fetched "
                        f"(HTTP {status})", hint="run the pull again later", kind="server")
    if isinstance(exc, RepositoryNotFoundError) or status == 404:
        if status == 401:
            # The Hub answers 401 for private and gated repos without a token, and for ids that do not exist.
            return HubError(f"`{repo_id}` was not found on {endpoint}, or it is private and needs a login "
                            "(HTTP 401)",
                            hint=f"check the id; if it is private or gated, {login}", kind="auth")
        close = [m for m in suggest(repo_id, endpoint=endpoint, token=token) if m != repo_id]
        hint = ("did you mean " + ", ".join(f"`{m}`" for m in close) + "?") if close else \
            f"check the id (`org/name`, as in {endpoint}/org/name)"
        return HubError(f"model `{repo_id}` does not exist on {endpoint} (HTTP 404)", hint=hint,
                        kind="not_found")
    if status in (401, 403):
        detail = "your token is not valid" if status == 401 else "your token has no access to it"
        return HubError(f"the hub refused access to `{repo_id}`: {detail} (HTTP {status})",
                        hint=login, kind="auth")
    if isinstance(exc, HfHubHTTPError) and status is not None and status >= 500:
        return HubError(f"{endpoint} failed with HTTP {status} while fetching `{what or repo_id}`",
                        hint="the hub is having trouble; run the same `vmetal pull` again later "
                             "(it resumes where it stopped)", kind="server")
    if isinstance(exc, HfHubHTTPError):
        return HubError(f"{endpoint} answered HTTP {status} for `{what or repo_id}`: "
                        f"{str(exc).splitlines()[0]}", kind="server")
    if isinstance(exc, httpx2.TransportError):
        return HubError(f"cannot reach {endpoint}: {type(exc).__name__}: {exc}",
                        hint="check the network (and HF_ENDPOINT, proxies); the pull resumes when run again",
                        kind="network")
    return exc


# ----------------------------------------------------------------------------------------- download


def file_digest_ok(path: Path, f: RemoteFile) -> bool:
    """The file at `path` has `f`'s size and digest (sha256 where listed, else the git blob id)."""
    try:
        if path.stat().st_size != f.size:
            return False
    except OSError:
        return False
    if f.sha256:
        h = hashlib.sha256()
        want = f.sha256
    elif f.git_oid and len(f.git_oid) == 40:
        h = hashlib.sha1()  # noqa: S324 - git's object id, not a security boundary
        h.update(b"blob %d\0" % f.size)
        want = f.git_oid
    else:
        return True  # the hub gave nothing to check against but the size
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest() == want.lower()


@contextlib.contextmanager
def pull_lock(repo_id: str, cache_dir: Path | None = None) -> Iterator[None]:
    """One `vmetal pull` per model at a time (two would append to the same partial files)."""
    with folder_lock(storage_folder(repo_id, cache_dir), repo_id):
        yield


@contextlib.contextmanager
def folder_lock(folder: Path, repo_id: str) -> Iterator[None]:
    """An exclusive, non-blocking lock on a model's cache folder, for either hub's pull."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".vmetal-pull.lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HubError(f"another `vmetal pull` of `{repo_id}` is running", kind="busy") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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
    _check_online()
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
        raise Interrupted(f"pull of `{remote.repo_id}` interrupted; what arrived so far is kept",
                          hint="run the same `vmetal pull` again to continue where it stopped") from None
    if errors:
        raise errors[0]
    if cancel.is_set():
        raise Interrupted(f"pull of `{remote.repo_id}` cancelled; what arrived so far is kept",
                          hint="run the same `vmetal pull` again to continue where it stopped")
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
    try:
        return json.loads(blob_path(remote, f, cache_dir).read_text())
    except ValueError as exc:
        raise HubError(f"`{path}` of `{remote.repo_id}` is not valid JSON: {exc}", kind="not_a_model") from exc


def finalize(remote: RemoteModel, files: Sequence[RemoteFile], *, cache_dir: Path | None = None) -> Path:
    """Link every (verified) blob into the snapshot folder and write the revision's ref; the folder."""
    from vmetal.safe_paths import is_inside

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

    from vmetal.safe_paths import UnsafePathError, check_component, linked_component

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


def is_commit(revision: str) -> bool:
    return bool(_COMMIT_RE.fullmatch(revision))
