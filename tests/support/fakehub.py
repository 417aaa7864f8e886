"""What the local hubs of the tests (tests/support/hubserver.py: Hugging Face, tests/support/msserver.py: ModelScope) share.

A threaded HTTP server on 127.0.0.1 that logs every request (method, path, query, Range, the body bytes sent, the
Authorization header), and serves file bytes the way both hubs' CDNs do: `Range: bytes=N-` answered with 206 and
`Content-Range`, with the faults a test can inject per file: an HTTP status (for a number of requests or always),
a connection dropped after N bytes, a stall after N bytes (until released), one byte flipped, a delay per chunk.
Each hub keeps only its protocol: routes, metadata, error bodies, redirects.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.gguf", "*.pth")
_CHUNK = 64 * 1024


@dataclass
class Logged:
    method: str
    path: str
    range: str | None
    query: dict = field(default_factory=dict)
    status: int = 0
    sent: int = 0
    auth: str | None = None


class FakeHub:
    """`with SomeHub() as hub: hub.add(repo)`; a subclass names its request handler and the tokens it accepts."""

    handler: type[FakeHandler]
    good_tokens: frozenset[str]

    def __init__(self, tokens: set[str] | None = None) -> None:
        self.repos: dict = {}
        self.tokens = tokens or set(self.good_tokens)
        self.log: list[Logged] = []
        self.lock = threading.Lock()
        self.fail_status: dict[str, tuple[int, int]] = {}    # file path -> (status, times; -1 = always)
        self.api_status: int | None = None                   # status for every metadata call
        self.drops: dict[str, int] = {}                      # file path -> drop after N bytes (once)
        self.stalls: dict[str, int] = {}                     # file path -> stall after N bytes (once)
        self.stalled = threading.Event()                     # set when a stall point is reached
        self.release = threading.Event()
        self.damaged: set[str] = set()                       # serve these with one byte flipped
        self.delay_per_chunk = 0.0
        self._server: ThreadingHTTPServer | None = None

    # -- set-up
    def add(self, repo):
        self.repos[repo.repo_id.lower()] = repo
        return repo

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self):
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
        self._server.hub = self  # type: ignore[attr-defined]  # what the handlers answer from
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inspection
    def downloads(self, file: str | None = None) -> list[Logged]:
        """GETs that carried (or were to carry) file bytes, of `file` if given; a redirect's 302 is not one."""
        with self.lock:
            return [r for r in self.log if r.method == "GET" and r.status != 302 and self.is_download(r, file)]

    def is_download(self, r: Logged, file: str | None) -> bool:
        raise NotImplementedError  # each protocol names its files in its own URLs

    def bytes_sent(self, file: str | None = None) -> int:
        return sum(r.sent for r in self.downloads(file))

    # -- faults
    def injected_status(self, fpath: str) -> int:
        """The status a test asked for `fpath` (counting this request against its times), else 0."""
        with self.lock:
            status, times = self.fail_status.get(fpath, (0, 0))
            if status and times:
                self.fail_status[fpath] = (status, times - 1 if times > 0 else times)
        return status if times else 0


class FakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    @property
    def hub(self):
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:  # a client that went away, or a connection this server cut on purpose
            pass

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        raise NotImplementedError

    # -- helpers
    def _record(self, path: str, query: dict | None = None) -> Logged:
        entry = Logged(self.command, path, self.headers.get("Range"), query or {},
                       auth=self.headers.get("Authorization"))
        with self.hub.lock:
            self.hub.log.append(entry)
        return entry

    def _send(self, entry: Logged, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json") -> None:
        entry.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            entry.sent += len(body)

    def _unsatisfiable(self, entry: Logged, size: int) -> None:
        """A Range that starts at or past the end; each hub answers it in its own way."""
        raise NotImplementedError

    def _send_file(self, entry: Logged, fpath: str, data: bytes, headers: dict, *,
                   range_end: bool = False) -> None:
        """`data` as the file `fpath`, with the faults injected for it; `range_end`: honour `bytes=N-M`'s M."""
        hub = self.hub
        if fpath in hub.damaged:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        size = len(data)
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and self.command == "GET":
            first, _, last = rng[6:].partition("-")
            start = int(first or 0)
            if range_end and last:
                end = int(last)
            if start >= size:
                return self._unsatisfiable(entry, size)
            end = min(end, size - 1)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        body = data[start:end + 1]
        entry.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return None
        with hub.lock:
            drop = hub.drops.pop(fpath, None)
            stall = hub.stalls.pop(fpath, None)
        cut = drop if drop is not None else stall
        sent = 0
        while sent < len(body):
            if cut is not None and sent >= cut:
                if stall is not None:
                    hub.stalled.set()
                    hub.release.wait(60)
                self.close_connection = True
                self.wfile.flush()
                self.connection.shutdown(2)  # the client sees a body shorter than Content-Length
                return None
            n = _CHUNK if cut is None else min(_CHUNK, cut - sent)
            chunk = body[sent:sent + n]
            self.wfile.write(chunk)
            sent += len(chunk)
            entry.sent = sent
            if hub.delay_per_chunk:
                time.sleep(hub.delay_per_chunk)
        return None
