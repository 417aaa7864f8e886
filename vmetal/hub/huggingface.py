"""Hugging Face listing, metadata and errors for `vmetal pull`: where a model's files live in the cache, what the
hub lists for a revision, and what a failed request means for the user.

`fetch_info` is step 1 of a pull (the order is in `vmetal.hub.common`): one metadata call, the file list with sizes
and digests and the commit the revision resolves to. The download and the snapshot folder are `vmetal.hub.huggingface_store`'s.

The cache layout is huggingface_hub's own (`models--org--name/{blobs,snapshots,refs}`, blobs named by their
etag, which is the sha256 for LFS files and the git blob id otherwise), so huggingface_hub, vLLM and mlx-lm
find what vmetal pulled and vice versa. Every request goes through huggingface_hub (`HfApi`, `http_get`).

huggingface_hub is imported inside the functions: the CLI imports this module for `--help`.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from vmetal.hub.common import HUGGINGFACE, HubError, RemoteFile, check_listing, check_revision

DEFAULT_REVISION = "main"
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


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


# --------------------------------------------------------------------------------------------- where


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


def check_online() -> None:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise HubError("HF_HUB_OFFLINE is set, and `vmetal pull` needs the network",
                       hint="unset HF_HUB_OFFLINE (or run `HF_HUB_OFFLINE=0 vmetal pull …`)", kind="offline")


def fetch_info(repo_id: str, *, revision: str | None = None, token: str | bool | None = None,
               endpoint: str | None = None) -> RemoteModel:
    """The file list (sizes, digests) of `repo_id` at `revision` and the commit it resolves to."""
    revision = revision or DEFAULT_REVISION
    check_revision(revision)
    check_online()
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
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

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


def is_commit(revision: str) -> bool:
    return bool(_COMMIT_RE.fullmatch(revision))
