"""What both hubs' pulls share: the errors, the file model, the progress protocol and the checks on a listing.

What a pull does, in order, so that a wrong id or an oversized model costs no gigabytes:

1. `fetch_info`: one metadata call (file list with sizes and digests; on Hugging Face, the commit the revision
   resolves to), refused by `check_listing` when a name would reach outside the cache.
2. `select_files`: only what serving needs (config, tokenizer, `model*.safetensors` and their index).
3. `fetch_json(remote, "config.json")`: the caller checks the architecture and the fit before any weight.
4. `download`: every file, resumable byte for byte, each verified against the digest the hub lists
   (`file_digest_ok`). A cached copy that no longer matches is fetched again.
5. `finalize`: only now the snapshot folder appears, so an interrupted pull never leaves a folder that `serve`
   (or an offline lookup) would take for a model.

Hugging Face: listing and errors in `vmetal.hub.huggingface`, download and snapshot store in `vmetal.hub.huggingface_store`.
ModelScope (`--source modelscope`, VLLM_USE_MODELSCOPE=true): `vmetal.hub.modelscope` and
`vmetal.hub.modelscope_store`, through ModelScope's own client; nothing there ever reaches Hugging Face.

Stdlib only: the CLI imports this module for `--help`.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

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


def interrupted(repo_id: str, how: str = "interrupted") -> Interrupted:
    """The `Interrupted` a pull raises on Ctrl-C (`interrupted`) or a cancel (`cancelled`), from either hub."""
    return Interrupted(f"pull of `{repo_id}` {how}; what arrived so far is kept",
                       hint="run the same `vmetal pull` again to continue where it stopped")


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


# ----------------------------------------------------------------------------------------- listing


class Listing(Protocol):
    """What `check_listing` reads of either hub's listing (`hub.RemoteModel`, `modelscope_hub.MsModel`)."""

    @property
    def repo_id(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def commit(self) -> str | None: ...
    @property
    def files(self) -> list[RemoteFile]: ...
    @property
    def endpoint(self) -> str: ...


ListingT = TypeVar("ListingT", bound=Listing)


def check_revision(revision: str) -> None:
    # `refs/pr/1` is a revision; `../x` would put the revision's ref file outside the cache.
    from vmetal.hub.safe_paths import UnsafePathError, check_relative

    try:
        check_relative(revision, "revision")
    except UnsafePathError as exc:
        raise HubError(str(exc), hint="pass a branch, tag or commit to `--revision`", kind="usage",
                       exit_code=2) from None


def check_listing(remote: ListingT) -> ListingT:
    """Refuse a listing whose names would reach outside the cache: file paths, digests (blob names), commit.

    Names come from the hub and are joined onto cache folders; git never produces such names, so a hub that
    sends one is broken or hostile, and nothing of it is downloaded.
    """
    from vmetal.hub.safe_paths import UnsafePathError, check_component, check_digest, check_relative

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


# ----------------------------------------------------------------------------------------- on disk


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


def read_json(file: Path, path: str, repo_id: str) -> dict[str, Any]:
    """`file`, the fetched `path` of `repo_id` (e.g. `config.json`), parsed; a HubError when it is not JSON."""
    try:
        return json.loads(file.read_text())
    except ValueError as exc:
        raise HubError(f"`{path}` of `{repo_id}` is not valid JSON: {exc}", kind="not_a_model") from exc


def human_size(n: int | float) -> str:
    """Decimal units, as ollama and the Hub show sizes."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"
