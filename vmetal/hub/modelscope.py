"""ModelScope resolution for `vmetal pull --source modelscope` (and VLLM_USE_MODELSCOPE=true): where a model lives
(endpoint, cache), what ModelScope lists for a revision, what a failed request means for the user, and driving
ModelScope's client without its own bars and log lines. The download and the snapshot folder are
`vmetal.hub.modelscope_store`'s.

The same order as the Hugging Face path (`vmetal.hub.common` describes it), so a wrong id or an oversized model
costs no gigabytes:

1. `fetch_info`: the revisions (is `--revision` a branch or tag?) and the file list (sizes, sha256).
2. `select_files` (from `vmetal.hub.common`): only what serving needs.
3. `modelscope_store.fetch_json(remote, "config.json")`: the caller checks the architecture and the fit before
   any weight.
4. `modelscope_store.download`: the rest, through ModelScope's own client, each file checked against the sha256
   ModelScope lists.
5. `modelscope_store.finalize`: only now does `snapshots/<revision>` appear (or get the new files), so an
   interrupted pull never leaves a folder that `serve` or an offline ModelScope lookup would take for a model.

Every request goes through `modelscope_hub`, the hub client that `modelscope` (>= 1.38) delegates
`snapshot_download` / `model_file_download` / `HubApi.get_model_files` to: `HubApi.list_repo_revisions`,
`list_repo_files`, `download_repo`. Where things are:

- The cache is ModelScope's own layout (`<cache>/models/<owner>--<name>/snapshots/<revision>/`), so ModelScope's
  own tools (its offline lookups, `snapshot_download`, vLLM with VLLM_USE_MODELSCOPE=true) reuse what vmetal
  pulled. The cache is VLLM_METAL_MODELSCOPE_CACHE when set, else MODELSCOPE_CACHE, else `~/.cache/modelscope`
  (ModelScope's default).
- The endpoint is MODELSCOPE_ENDPOINT, else MODELSCOPE_DOMAIN (`https://` is assumed without a scheme), else
  ModelScope's default (modelscope.cn, with its own fallback to modelscope.ai). Never Hugging Face.

`modelscope_hub` is imported inside the functions (and only for ModelScope pulls): `import modelscope` costs seconds
(it imports torch), `modelscope_hub` a tenth of that.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmetal.hub.common import MODELSCOPE, HubError, PullProgress, RemoteFile

DEFAULT_REVISION = "master"        # ModelScope's default branch
DEFAULT_ENDPOINT = "https://modelscope.cn"
REPO_TYPE = "model"
STAGING = ".vmetal-partial"
MIN_CLIENT = (0, 5)                # modelscope_hub: `download_repo(file_list=…)`, `download_file(file_size=…)`
PACKAGE_HINT = "pip install 'modelscope>=1.40,<2'"
TOKEN_HINT = "set MODELSCOPE_API_TOKEN to a ModelScope access token (or run `modelscope login`)"
_COMMITISH = re.compile(r"^[0-9a-f]{7,64}$")


# --------------------------------------------------------------------------------------------- where


def require_client() -> Any:
    """`modelscope_hub` (installed with `modelscope`), or a HubError saying how to get it."""
    try:
        import modelscope_hub
    except ImportError:
        raise HubError(f"ModelScope support needs the `modelscope` package: {PACKAGE_HINT}",
                       hint="or pull from Hugging Face with `--source huggingface` (and unset "
                            "VLLM_USE_MODELSCOPE if it is set)", kind="source") from None
    version = getattr(modelscope_hub, "__version__", "0")
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    if parts < MIN_CLIENT:
        raise HubError(f"ModelScope support needs modelscope-hub >= {'.'.join(map(str, MIN_CLIENT))} "
                       f"(installed: {version})", hint=PACKAGE_HINT.replace("install", "install -U"),
                       kind="source")
    return modelscope_hub


def configured_endpoint(environ: Mapping[str, str] | None = None) -> str | None:
    """MODELSCOPE_ENDPOINT, else MODELSCOPE_DOMAIN, as ModelScope's client reads them; None when neither is set."""
    env = os.environ if environ is None else environ
    value = (env.get("MODELSCOPE_ENDPOINT") or "").strip() or (env.get("MODELSCOPE_DOMAIN") or "").strip()
    if not value:
        return None
    if not value.lower().startswith(("http://", "https://")):
        value = "https://" + value
    return value.rstrip("/")


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """VLLM_METAL_MODELSCOPE_CACHE, else MODELSCOPE_CACHE, else ModelScope's default `~/.cache/modelscope`."""
    from vmetal import envs

    env = os.environ if environ is None else environ
    ours = envs.load_config(env).modelscope_cache
    if ours:
        path = Path(ours)
        if (path / "config.json").is_file():
            raise HubError(f"{envs.MODELSCOPE_CACHE}={ours} is a model folder (it has a config.json), not a "
                           "cache to pull into", hint=f"serve that folder directly, or point "
                           f"{envs.MODELSCOPE_CACHE} at a cache directory", kind="usage", exit_code=2)
        return path
    return Path(env.get("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope").expanduser()


def repo_folder(repo_id: str, cache: Path) -> Path:
    return cache / "models" / repo_id.replace("/", "--")


def snapshot_path(repo_id: str, revision: str, cache: Path) -> Path:
    return repo_folder(repo_id, cache) / "snapshots" / revision


def staging_path(repo_id: str, revision: str, cache: Path) -> Path:
    return repo_folder(repo_id, cache) / STAGING / revision.replace("/", "--")


@dataclass
class MsModel:
    repo_id: str
    revision: str
    files: list[RemoteFile]
    endpoint: str
    cache: Path
    api: Any = field(repr=False, default=None)
    source: str = MODELSCOPE
    commit: str | None = None       # ModelScope's revision listing names no commit for a branch

    def file(self, path: str) -> RemoteFile | None:
        return next((f for f in self.files if f.path == path), None)

    @property
    def snapshot(self) -> Path:
        return snapshot_path(self.repo_id, self.revision, self.cache)

    @property
    def staging(self) -> Path:
        return staging_path(self.repo_id, self.revision, self.cache)


# ----------------------------------------------------------------------------------------- metadata


def _api(endpoint: str | None, cache: Path) -> Any:
    from modelscope_hub import HubApi, HubConfig

    # A fresh config per pull (the process-wide default would keep a token or cache read earlier). The token is
    # ModelScope's own: MODELSCOPE_API_TOKEN, else what `modelscope login` stored. With no endpoint configured,
    # HubConfig falls back to its default and lets `resolve_endpoint_for_read` pick modelscope.cn or .ai.
    return HubApi(config=HubConfig(endpoint=endpoint, cache_dir=cache))


def fetch_info(repo_id: str, *, revision: str | None = None, endpoint: str | None = None,
               cache: Path | None = None) -> MsModel:
    """The file list (sizes, sha256) of `repo_id` at `revision` on ModelScope."""
    require_client()
    cache = cache or cache_dir()
    endpoint = endpoint or configured_endpoint()
    revision = revision or DEFAULT_REVISION
    from vmetal.hub.common import check_listing, check_revision

    check_revision(revision)
    if "/" not in repo_id.strip("/"):
        raise HubError(f"`{repo_id}` is not a ModelScope model id: expected `owner/name`", kind="usage",
                       exit_code=2)
    api = _api(endpoint, cache)
    shown = endpoint or DEFAULT_ENDPOINT
    try:
        with quiet_client(PullProgress()):
            if endpoint is None:
                shown = endpoint = api.resolve_endpoint_for_read(repo_id, repo_type=REPO_TYPE)
                api = _api(endpoint, cache)
            revisions = api.list_repo_revisions(repo_id, REPO_TYPE)
    except Exception as exc:  # noqa: BLE001 - translated into what the user should do, or re-raised
        raise explain_error(exc, repo_id, endpoint=shown) from exc
    names = [r.get("Revision") for r in revisions if isinstance(r, dict) and r.get("Revision")]
    if revision not in names and not _COMMITISH.fullmatch(revision):
        listed = ", ".join(f"`{n}`" for n in names[:8]) or "none"
        raise HubError(f"revision `{revision}` of `{repo_id}` does not exist on ModelScope",
                       hint=f"its branches and tags: {listed}; pass one of them (or a commit) to `--revision`",
                       kind="revision")
    try:
        with quiet_client(PullProgress()):
            listing = api.list_repo_files(repo_id, REPO_TYPE, revision=revision, recursive=True)
    except Exception as exc:  # noqa: BLE001
        from modelscope_hub.errors import NotExistError

        if isinstance(exc, NotExistError):
            raise HubError(f"revision `{revision}` of `{repo_id}` does not exist on ModelScope",
                           hint="pass a branch, tag or commit of that model to `--revision`",
                           kind="revision") from exc
        raise explain_error(exc, repo_id, endpoint=shown) from exc
    files = [RemoteFile(path=f.path, size=int(f.size or 0), sha256=(f.sha256 or "").lower() or None)
             for f in listing if not f.is_dir and f.path]
    remote = MsModel(repo_id=repo_id, revision=revision, files=files, endpoint=shown, cache=cache, api=api)
    check_listing(remote)  # type: ignore[arg-type] - reads only repo_id, source, commit, files, endpoint
    return remote


def explain_error(exc: BaseException, repo_id: str, *, endpoint: str, revision: str | None = None,
                  what: str | None = None) -> BaseException:
    """The HubError a user should see for a `modelscope_hub` / network exception (or `exc` itself)."""
    import requests
    from modelscope_hub import errors as mse

    if isinstance(exc, HubError):
        return exc
    if isinstance(exc, mse.FileDownloadError) and exc.failed_files:
        # Report the first real failure, not a sibling that was merely cancelled because of it.
        failures = list(exc.failed_files.items())
        path, first = next(((p, e) for p, e in failures if isinstance(e, mse.HubError)), failures[0])
        return explain_error(first, repo_id, endpoint=endpoint, revision=revision, what=path)
    status = getattr(exc, "status_code", None)
    headline = (str(getattr(exc, "message", "") or exc).splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, mse.FileSizeMismatchError):
        return HubError(f"`{what or '?'}` of `{repo_id}` keeps arriving with a size other than the one ModelScope "
                        f"lists: {headline}", hint="run the pull again later", kind="integrity")
    if isinstance(exc, mse.FileIntegrityError):
        return HubError(f"`{what or '?'}` of `{repo_id}` does not match the sha256 ModelScope lists, after "
                        "every retry", hint="ModelScope or a proxy is serving damaged data; try again later",
                        kind="integrity")
    if isinstance(exc, mse.NotExistError):
        if what:
            return HubError(f"`{what}` of `{repo_id}` is listed by ModelScope but could not be fetched "
                            f"(HTTP {status or 404})", hint="run the pull again later", kind="server")
        return HubError(f"model `{repo_id}` does not exist on {endpoint} (HTTP {status or 404})",
                        hint=f"check the id (`owner/name`, as in {endpoint}/models/owner/name); a private model "
                             f"reads as missing without a login: {TOKEN_HINT}", kind="not_found")
    if isinstance(exc, mse.AuthenticationError):
        return HubError(f"ModelScope refused the credentials for `{repo_id}` (HTTP {status or 401}): {headline}",
                        hint=TOKEN_HINT, kind="auth")
    if isinstance(exc, mse.PermissionDeniedError):
        return HubError(f"ModelScope refused access to `{repo_id}` (HTTP {status or 403})", hint=TOKEN_HINT,
                        kind="auth")
    if isinstance(exc, mse.RateLimitError):
        return HubError(f"{endpoint} is rate limiting this client (HTTP 429) while fetching `{what or repo_id}`",
                        hint="wait a little and run the same `vmetal pull` again (it resumes)", kind="server")
    if isinstance(exc, mse.ServerError):
        return HubError(f"{endpoint} failed with HTTP {status or '5xx'} while fetching `{what or repo_id}`",
                        hint="ModelScope is having trouble; run the same `vmetal pull` again later (it resumes "
                             "where it stopped)", kind="server")
    kind = type(exc).__name__
    if kind == "_DownloadDeadlineError":
        return HubError(f"`{what or repo_id}` took longer than ModelScope's time budget for one file "
                        "(MODELSCOPE_DOWNLOAD_TOTAL_TIMEOUT); what arrived is kept",
                        hint="run the same `vmetal pull` again to continue where it stopped, or raise "
                             "MODELSCOPE_DOWNLOAD_TOTAL_TIMEOUT (seconds)", kind="network")
    if kind == "_DownloadTooSlowError":
        return HubError(f"the download of `{what or repo_id}` from {endpoint} stalled (under "
                        "MODELSCOPE_DOWNLOAD_MIN_BYTES_PER_SECOND for a minute); what arrived is kept",
                        hint="check the network, then run the same `vmetal pull` again to continue",
                        kind="network")
    if isinstance(exc, (mse.NetworkError, requests.exceptions.RequestException)):
        timeout = isinstance(exc, (mse.RequestTimeoutError, requests.exceptions.Timeout))
        detail = "no answer in time" if timeout else (headline if headline.isascii() else type(exc).__name__)
        return HubError(f"cannot reach {endpoint} (fetching `{what or repo_id}`): {detail}",
                        hint="check the network (and MODELSCOPE_ENDPOINT / MODELSCOPE_DOMAIN, proxies); the pull "
                             "resumes when run again", kind="network")
    if isinstance(exc, mse.APIError):
        return HubError(f"{endpoint} answered HTTP {status} for `{what or repo_id}`: {headline}", kind="server")
    return exc


# ------------------------------------------------------------------------------------ the client, quietly


class _NoBar:
    """Stands in for the tqdm bars `modelscope_hub` draws; vmetal shows its own progress."""

    def __init__(self, *args: Any, **kwargs: Any) -> None: ...
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None: ...
    def update(self, n: Any = 1) -> None: ...
    def close(self) -> None: ...


class _ToProgress(logging.Handler):
    """ModelScope's retry warnings ("retrying in 1s") as vmetal notes; its errors are reported by vmetal."""

    def __init__(self, progress: PullProgress) -> None:
        super().__init__(logging.WARNING)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            return
        with contextlib.suppress(Exception):
            self.progress.note("modelscope: " + record.getMessage().splitlines()[0])


_quiet_lock = threading.Lock()


# ModelScope's client gives each file one hour in all (MODELSCOPE_DOWNLOAD_TOTAL_TIMEOUT), which a 10 GB shard on a
# slow line exceeds. A stalled connection is caught anyway (60 s read timeout, a minimum rate over a minute), so
# unless the user set the variable, a pull gives each file a day.
FILE_TIME_BUDGET_S = 24 * 3600


@contextlib.contextmanager
def quiet_client(progress: PullProgress) -> Iterator[None]:
    """No tqdm bars and no log lines of ModelScope's own on the terminal while vmetal drives it (and the per-file
    time budget above). Both are module attributes of `modelscope_hub._download`, left alone if they move."""
    import modelscope_hub._download as msdl

    with _quiet_lock:
        logger = logging.getLogger("modelscope_hub")
        saved = (logger.handlers[:], logger.level, logger.propagate, getattr(msdl, "tqdm", None),
                 getattr(msdl, "DOWNLOAD_TOTAL_TIMEOUT", None))
        logger.handlers = [_ToProgress(progress)]
        logger.setLevel(logging.WARNING)
        logger.propagate = False
        if saved[3] is not None:
            msdl.tqdm = _NoBar
        if saved[4] is not None and "MODELSCOPE_DOWNLOAD_TOTAL_TIMEOUT" not in os.environ:
            msdl.DOWNLOAD_TOTAL_TIMEOUT = max(saved[4], FILE_TIME_BUDGET_S)
    try:
        yield
    finally:
        with _quiet_lock:
            logger.handlers, level, logger.propagate, bar, budget = saved
            logger.setLevel(level)
            if bar is not None:
                msdl.tqdm = bar
            if budget is not None:
                msdl.DOWNLOAD_TOTAL_TIMEOUT = budget

