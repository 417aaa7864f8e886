"""A local ModelScope hub on 127.0.0.1 that speaks enough of its `/api/v1` protocol for `modelscope` itself.

What `modelscope` (through `modelscope_hub`, the client it delegates to) calls for a model download:
- `GET /api/v1/models/{owner}/{name}/revisions`           -> `{Code, Data: {RevisionMap: {Branches, Tags}}, Success}`
- `GET /api/v1/models/{owner}/{name}/repo/files?Revision=&Recursive=`
                                                          -> `{Code, Data: {Files: [{Path, Name, Size, Sha256,
                                                             Type, IsLFS, Revision, ...}]}, Success}`
- `GET /api/v1/models/{owner}/{name}/repo?Revision=&FilePath=` -> the bytes; `Range: bytes=N-` answered with 206
  and `Content-Range`; LFS files optionally through a 302 to `/oss/...`, as modelscope.cn does.
- `GET /api/v1/models/{owner}/{name}` and `GET /openapi/v1/models/{owner}/{name}` -> repo metadata.
- `GET /api/v1/repos/internalAccelerationInfo` (the client's Alibaba-cloud region probe) -> 404.
Errors carry the hub's JSON envelope (`Code`, `Message`, `Success: false`, `RequestId`) with the HTTP status the
client maps to its exceptions (401 AuthenticationError, 403 PermissionDeniedError, 404 NotExistError, 5xx
ServerError). A token arrives as `Authorization: Bearer …` and as the `m_session_id` cookie.

Faults a test can inject: those of every local hub (tests/support/fakehub.py: an HTTP status for a file, a connection
dropped after N bytes, a stall after N bytes until released, damaged bytes, a status for every API call), and here
a listed size or sha256 that differs from the real one. Every request is logged with its Range and the body bytes
sent.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from urllib.parse import parse_qs, quote, unquote, urlsplit

from tests.support.fakehub import LFS_PATTERNS, FakeHandler, FakeHub, Logged

__all__ = ["Logged", "ModelScopeServer", "Repo"]

_NOT_FOUND_CODE = 10010205001


@dataclass
class Repo:
    repo_id: str
    files: dict[str, bytes]
    branches: dict[str, str] = field(default_factory=dict)   # extra branch -> commit (master is always there)
    tags: dict[str, str] = field(default_factory=dict)       # tag -> commit
    commit: str = ""
    private: bool = False
    listed_sizes: dict[str, int] = field(default_factory=dict)   # lie about a size in the listing
    listed_sha256: dict[str, str | None] = field(default_factory=dict)  # lie about (or drop) a digest
    redirect_lfs: bool = False    # answer LFS files with a 302 to `/oss/...`, as modelscope.cn does

    def __post_init__(self) -> None:
        if not self.commit:
            self.commit = hashlib.sha1(self.repo_id.encode()).hexdigest()  # noqa: S324

    def is_lfs(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], p) for p in LFS_PATTERNS)

    def sha256(self, path: str) -> str:
        return hashlib.sha256(self.files[path]).hexdigest()

    def resolve(self, rev: str) -> str | None:
        if rev in ("master", self.commit):
            return self.commit
        return self.branches.get(rev) or self.tags.get(rev)

    def entries(self) -> list[dict]:
        out: list[dict] = []
        dirs: set[str] = set()
        for path in sorted(self.files):
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    out.append({"Name": parts[i - 1], "Path": d, "Type": "tree", "Size": 0, "Sha256": "",
                                "IsLFS": False, "Revision": self.commit, "Mode": "40000"})
            size = self.listed_sizes.get(path, len(self.files[path]))
            sha = self.listed_sha256[path] if path in self.listed_sha256 else self.sha256(path)
            out.append({"Name": path.rsplit("/", 1)[-1], "Path": path, "Type": "blob", "Size": size,
                        "Sha256": sha or "", "IsLFS": self.is_lfs(path), "Revision": self.commit,
                        "CommitId": self.commit, "CommitMessage": "upload", "CommittedDate": 1700000000,
                        "Mode": "33188", "InCheck": False})
        return out


class _Handler(FakeHandler):
    hub: ModelScopeServer

    def _ok(self, entry: Logged, data: object) -> None:
        body = {"Code": 200, "Data": data, "Message": "success", "RequestId": uuid.uuid4().hex, "Success": True}
        self._send(entry, 200, json.dumps(body).encode())

    def _error(self, entry: Logged, status: int, message: str, code: int | None = None) -> None:
        body = {"Code": code if code is not None else status, "Message": message, "RequestId": uuid.uuid4().hex,
                "Success": False}
        self._send(entry, status, json.dumps(body).encode())

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return auth[7:]
        for part in (self.headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == "m_session_id":
                return value
        return None

    def _repo(self, entry: Logged, owner: str, name: str) -> Repo | None:
        """The repo, or None after answering as the hub would for a missing one or a refused caller."""
        repo = self.hub.repos.get(f"{owner}/{name}".lower())
        token = self._token()
        if token is not None and token not in self.hub.tokens:
            self._error(entry, 401, "Invalid or expired AccessToken")
            return None
        if repo is None or (repo.private and token is None):
            # modelscope.cn does not tell a private model from a missing one without a login.
            self._error(entry, 404, f"Model {owner}/{name} does not exist or you have no access to it",
                        _NOT_FOUND_CODE)
            return None
        return repo

    # -- routes
    def do_GET(self) -> None:
        url = urlsplit(self.path)
        entry = self._record(unquote(url.path), parse_qs(url.query))
        path, query = entry.path, entry.query
        ms = self.hub
        try:
            if path == "/api/v1/repos/internalAccelerationInfo":
                return self._error(entry, 404, "not on Alibaba cloud")
            if path.startswith("/oss/"):
                _, _, rid, commit, fpath = path.split("/", 4)
                repo = ms.repos.get(rid.replace("--", "/").lower())
                if repo is None or fpath not in repo.files:
                    return self._error(entry, 404, "NoSuchKey")
                return self._bytes(entry, repo, fpath, cdn=True)
            parts = path.strip("/").split("/")
            if len(parts) >= 5 and parts[0] in ("api", "openapi") and parts[1] == "v1" and parts[2] == "models":
                owner, name, rest = parts[3], parts[4], parts[5:]
                is_file = rest == ["repo"] and "FilePath" in query
                if ms.api_status and not is_file:
                    return self._error(entry, ms.api_status, "injected server error")
                repo = self._repo(entry, owner, name)
                if repo is None:
                    return None
                if not rest:
                    return self._ok(entry, {"Id": 1, "Path": owner, "Name": name, "ModelId": repo.repo_id,
                                            "Visibility": 1 if repo.private else 5, "Downloads": 0})
                if rest == ["revisions"]:
                    branches = [{"Revision": "master", "CreatedAt": 1700000000, "CommitId": repo.commit}]
                    branches += [{"Revision": b, "CreatedAt": 1700000000, "CommitId": c}
                                 for b, c in repo.branches.items()]
                    tags = [{"Revision": t, "CreatedAt": 1700000000, "CommitId": c} for t, c in repo.tags.items()]
                    return self._ok(entry, {"RevisionMap": {"Branches": branches, "Tags": tags}})
                if rest == ["repo", "files"]:
                    rev = (query.get("Revision") or ["master"])[0]
                    if repo.resolve(rev) is None:
                        return self._error(entry, 404, f"Revision {rev} does not exist", _NOT_FOUND_CODE)
                    return self._ok(entry, {"Files": repo.entries()})
                if is_file:
                    rev = (query.get("Revision") or ["master"])[0]
                    if repo.resolve(rev) is None:
                        return self._error(entry, 404, f"Revision {rev} does not exist", _NOT_FOUND_CODE)
                    fpath = query["FilePath"][0]
                    if fpath not in repo.files:
                        return self._error(entry, 404, f"file {fpath} does not exist", _NOT_FOUND_CODE)
                    return self._bytes(entry, repo, fpath)
            self._error(entry, 404, "no such route")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _bytes(self, entry: Logged, repo: Repo, fpath: str, cdn: bool = False) -> None:
        status = self.hub.injected_status(fpath)
        if status:
            return self._error(entry, status, "injected failure")
        if repo.redirect_lfs and repo.is_lfs(fpath) and not cdn:
            location = f"/oss/{repo.repo_id.replace('/', '--')}/{repo.commit}/{quote(fpath)}"
            return self._send(entry, 302, b"", {"Location": location})
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{repo.sha256(fpath)}"'}
        return self._send_file(entry, fpath, repo.files[fpath], headers, range_end=True)

    def _unsatisfiable(self, entry: Logged, size: int) -> None:
        entry.status = 416
        self.send_response(416)
        self.send_header("Content-Range", f"bytes */{size}")
        self.send_header("Content-Length", "0")
        self.end_headers()


class ModelScopeServer(FakeHub):
    """`with ModelScopeServer() as ms: ms.add(Repo(...)); os.environ["MODELSCOPE_DOMAIN"] = ms.url`."""

    handler = _Handler
    good_tokens = frozenset({"ms-good"})

    # -- inspection
    def is_download(self, r: Logged, file_path: str | None) -> bool:
        return _file_of(r) is not None and (file_path is None or _file_of(r) == file_path)

    def fetched_files(self) -> set[str]:
        return {f for r in self.downloads() if (f := _file_of(r)) is not None}


def _file_of(r: Logged) -> str | None:
    if r.path.startswith("/oss/"):
        return r.path.split("/", 4)[4]
    if r.path.endswith("/repo") and "FilePath" in r.query:
        return r.query["FilePath"][0]
    return None
