"""A local hub on 127.0.0.1 that speaks enough of the Hugging Face protocol for huggingface_hub itself.

Endpoints (what huggingface_hub 2.x calls for `model_info`, `list_models`, `hf_hub_download` / `http_get`):
- `GET /api/models/{repo}[/revision/{rev}]` -> `{id, sha, siblings: [{rfilename, size, blobId, lfs?}]}`
- `GET /api/models?search=…&limit=…`       -> `[{id, modelId}]`
- `HEAD|GET /{repo}/resolve/{rev}/{path}`   -> the bytes, with `ETag`, `X-Repo-Commit`, `Content-Length`,
  `X-Linked-Etag`/`X-Linked-Size` for LFS files, and `Range: bytes=N-` answered with 206.
Errors carry the Hub's `X-Error-Code` (`RepoNotFound`, `GatedRepo`, `RevisionNotFound`, `EntryNotFound`), so
huggingface_hub raises the same exception types as against huggingface.co.

Faults a test can inject: those of every local hub (tests/support/fakehub.py: an HTTP status for a file, a connection
dropped after N bytes, a stall after N bytes until released, damaged bytes), and here a listed size that differs
from the real one and a hostile listing. Every request is logged with its Range and the body bytes sent.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

from tests.support.fakehub import LFS_PATTERNS, FakeHandler, FakeHub, Logged

__all__ = ["HubServer", "Logged", "Repo", "git_oid"]


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324


@dataclass
class Repo:
    repo_id: str
    files: dict[str, bytes]
    commit: str = ""
    revisions: dict[str, str] = field(default_factory=dict)  # extra branch/tag -> commit
    private: bool = False
    gated: bool = False
    listed_sizes: dict[str, int] = field(default_factory=dict)   # lie about a size in the metadata
    redirect_lfs: bool = False    # answer LFS files with a 302 to `/cdn/...`, as huggingface.co does
    # A hostile hub: raw entries added to the listing as is (`rfilename` such as `../../x.json`), and
    # siblings whose listed digests are replaced (`{"config.json": {"blobId": "../../x"}}`).
    extra_siblings: list[dict] = field(default_factory=list)
    forged: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.commit:
            self.commit = hashlib.sha1(self.repo_id.encode()).hexdigest()  # noqa: S324

    def is_lfs(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, p) for p in LFS_PATTERNS)

    def etag(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if self.is_lfs(path) else git_oid(data)

    def resolve(self, rev: str) -> str | None:
        if rev in ("main", self.commit):
            return self.commit
        return self.revisions.get(rev)

    def sibling(self, path: str) -> dict:
        data = self.files[path]
        size = self.listed_sizes.get(path, len(data))
        entry: dict = {"rfilename": path, "size": size, "blobId": git_oid(data)}
        if self.is_lfs(path):
            entry["lfs"] = {"size": size, "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
        for key, value in self.forged.get(path, {}).items():
            if key == "sha256":
                entry.setdefault("lfs", {"size": size, "pointerSize": 134})["sha256"] = value
            else:
                entry[key] = value
        return entry


class _Handler(FakeHandler):
    hub: HubServer

    def _error(self, entry: Logged, status: int, code: str | None = None, message: str | None = None,
               extra: dict | None = None) -> None:
        headers = dict(extra or {})
        if code:
            headers["X-Error-Code"] = code
        if message:
            headers["X-Error-Message"] = message
        body = json.dumps({"error": message or code or "error"}).encode()
        self._send(entry, status, body, headers)

    def _auth_problem(self, entry: Logged, repo: Repo | None) -> bool:
        """Answer like the Hub would for a missing repo or one this caller may not read; True if answered."""
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        if token is not None and token not in self.hub.tokens:
            self._error(entry, 401, message="Invalid credentials in Authorization header")
            return True
        if repo is None:
            self._error(entry, 404, "RepoNotFound", "Repository not found")
            return True
        if (repo.private or repo.gated) and token is None:
            if repo.gated:
                self._error(entry, 401, "GatedRepo", "Access to this model is restricted.")
            else:
                self._error(entry, 401, "RepoNotFound", "Invalid username or password.")
            return True
        return False

    def _split_repo(self, rest: str) -> tuple[Repo | None, str, str]:
        # rest: "{org}/{name}/<more>" or "{name}/<more>"; the longest known repo id wins.
        parts = rest.split("/")
        for n in (2, 1):
            rid = "/".join(parts[:n])
            if rid.lower() in self.hub.repos:
                return self.hub.repos[rid.lower()], rid, "/".join(parts[n:])
        return None, "/".join(parts[:2]), "/".join(parts[2:])

    # -- routes
    def do_GET(self) -> None:
        url = urlsplit(self.path)
        entry = self._record(url.path)
        path = unquote(url.path)
        try:
            if path == "/api/models":
                return self._search(entry, parse_qs(url.query))
            if path.startswith("/api/models/"):
                return self._info(entry, path[len("/api/models/"):])
            if "/resolve/" in path:
                return self._resolve(entry, path.lstrip("/"))
            if path.startswith("/cdn/"):
                # /cdn/{repo id with -- for /}/{commit}/{file}: the bytes, no auth needed (a signed URL).
                _, _, rid, commit, fpath = path.split("/", 4)
                return self._resolve(entry, f"{rid.replace('--', '/')}/resolve/{commit}/{fpath}", cdn=True)
            self._error(entry, 404, message="no such route")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _search(self, entry: Logged, query: dict) -> None:
        if self.hub.api_status:
            return self._error(entry, self.hub.api_status, message="server error")
        term = (query.get("search") or [""])[0].lower()
        limit = int((query.get("limit") or ["20"])[0])
        ids = [r.repo_id for r in self.hub.repos.values()
               if term in r.repo_id.lower() and not r.private][:limit]
        self._send(entry, 200, json.dumps([{"id": i, "modelId": i} for i in ids]).encode())

    def _info(self, entry: Logged, rest: str) -> None:
        hub = self.hub
        if hub.api_status:
            return self._error(entry, hub.api_status, message="server error")
        repo, rid, more = self._split_repo(rest)
        if self._auth_problem(entry, repo):
            return
        assert repo is not None
        rev = "main"
        if more.startswith("revision/"):
            rev = more[len("revision/"):]
        commit = repo.resolve(rev)
        if commit is None:
            return self._error(entry, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
        body = {"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit, "private": repo.private,
                "gated": "auto" if repo.gated else False, "disabled": False, "tags": [],
                "siblings": [repo.sibling(p) for p in sorted(repo.files)] + list(repo.extra_siblings)}
        self._send(entry, 200, json.dumps(body).encode())

    def _resolve(self, entry: Logged, rest: str, cdn: bool = False) -> None:
        hub = self.hub
        repo, rid, more = self._split_repo(rest)
        if not cdn and self._auth_problem(entry, repo):
            return
        if repo is None:
            return self._error(entry, 404, "RepoNotFound", "Repository not found")
        assert repo is not None
        _, rev, fpath = more.split("/", 2)
        commit = repo.resolve(rev)
        if commit is None:
            return self._error(entry, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
        extra = {e["rfilename"]: e for e in repo.extra_siblings}
        if fpath in extra and "content" in extra[fpath]:
            # A hostile listing's file is served too, so only vmetal's own checks keep it off the disk.
            data = extra[fpath]["content"].encode()
            return self._send(entry, 200, data, {"ETag": f'"{git_oid(data)}"', "X-Repo-Commit": commit},
                              content_type="application/octet-stream")
        if fpath not in repo.files:
            return self._error(entry, 404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
        status = hub.injected_status(fpath)
        if status:
            return self._error(entry, status, message="injected failure")
        if repo.redirect_lfs and repo.is_lfs(fpath) and not cdn:
            location = f"/cdn/{repo.repo_id.replace('/', '--')}/{commit}/{fpath}"
            return self._send(entry, 302, b"", {"Location": location, "X-Repo-Commit": commit,
                                                "X-Linked-Etag": f'"{repo.etag(fpath)}"',
                                                "X-Linked-Size": str(len(repo.files[fpath]))})
        etag = repo.etag(fpath)
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if repo.is_lfs(fpath):
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(repo.files[fpath]))})
        return self._send_file(entry, fpath, repo.files[fpath], headers)

    def _unsatisfiable(self, entry: Logged, size: int) -> None:
        self._error(entry, 416, message="range not satisfiable", extra={"Content-Range": f"bytes */{size}"})


class HubServer(FakeHub):
    """`with HubServer() as hub: hub.add(Repo(...)); os.environ["HF_ENDPOINT"] = hub.url`."""

    handler = _Handler
    good_tokens = frozenset({"hf_good"})

    # -- inspection
    def is_download(self, r: Logged, path_suffix: str | None) -> bool:
        return (("/resolve/" in r.path or r.path.startswith("/cdn/"))
                and (path_suffix is None or r.path.endswith("/" + path_suffix)))

    def resolved_files(self) -> set[str]:
        out = set()
        for r in self.downloads():
            if r.path.startswith("/cdn/"):
                out.add(r.path.split("/", 4)[4])
            else:
                out.add(r.path.split("/resolve/", 1)[1].split("/", 1)[1])
        return out
