"""Which `vmetal serve` processes run on this machine, and stopping one without touching anything else.

Every `vmetal serve` (in a terminal, or the one `serve --detach` starts in a session of its own) writes a record,
`servers/<id>.json` under the vmetal home, before it starts vLLM, and exports `VMETAL_SERVER_ID=<id>` so that
every process it starts (vLLM's API server, its EngineCore, their helpers) carries the id in its environment:

    with recorded(model="vmetal-demo", source="/path", host="127.0.0.1", port=8000) as entry:
        ...                               # start vLLM (it inherits the id) and supervise it
        entry.mark_served()               # once it answers

On the way out the record goes when the server stopped cleanly or never served (its error was on screen); it
stays, marked with the reason, when the server died after serving, so that `vmetal ps` can say so.

A record survives the command that wrote it (that is what `--detach` needs) and a process killed with SIGKILL,
so a PID in it may later belong to an unrelated process. It is trusted only when the process's start time and
command line (a digest of it: an `--api-key` after `--` must not land in a file) match what the server recorded
about itself; otherwise the server counts as dead and nothing is signalled. Processes found by the id in their
environment cannot be mistaken for someone else's either.

`stop` sends SIGTERM to `vmetal serve` once, which stops vLLM's process group itself (vmetal.cli.serve's
`supervise`); whatever is left of the family afterwards is killed. A lock per record (flock on `<id>.lock`)
makes concurrent stops safe: the first one stops, the others wait and find the record gone. The server's own
`finish` only tries that lock, so a server exiting while being stopped never waits on its stopper.

Stdlib only at module level (the CLI imports this on every `vmetal serve`); psutil inside the functions.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vmetal import envs
from vmetal.server.process import STOP_GRACE_S, answers_health, connect_host

ID_ENV = "VMETAL_SERVER_ID"
LOG_ENV = "VMETAL_SERVER_LOG"  # set by `serve --detach` for the server it starts: where its output goes

# psutil derives a start time from the boot time, which NTP may move by a second between two readings.
START_SLACK_S = 2.0
# `vmetal serve` takes up to STOP_GRACE_S to stop vLLM gently, then 5 s more for a SIGKILL to land.
STOP_WAIT_S = STOP_GRACE_S + 10.0
KILL_WAIT_S = 5.0

RUNNING, STARTING, DEAD = "running", "starting", "dead"
STOPPED, EXITED, GONE = "stopped", "exited", "gone"  # outcomes of `stop`


@dataclass(frozen=True)
class Server:
    """One `vmetal serve`, as it recorded itself."""

    id: str
    pid: int
    started: float  # the process's start time (epoch seconds), as psutil reads it
    command: str  # sha256 of the process's command line
    model: str  # the name clients send
    source: str  # what vLLM loads: a folder, or a Hub id
    host: str
    port: int
    log: str | None
    died: str | None = None  # why it stopped, when it died after it had served
    # A `--headless` node of a multi-node serve: its ranks join a head node elsewhere, it answers no HTTP.
    headless: bool = False

    @property
    def base_url(self) -> str:
        host = connect_host(self.host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI base URL ("-" for a headless node, which serves none)."""
        return "-" if self.headless else self.base_url + "/v1"


def servers_dir() -> Path:
    return envs.vmetal_home() / "servers"


def logs_dir() -> Path:
    return envs.vmetal_home() / "logs"


def new_log_path(model: str, port: int) -> Path:
    """A fresh log file name for a server of `model` on `port` (the folder is created)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model).name or model).strip("-.") or "model"
    logs_dir().mkdir(parents=True, exist_ok=True)
    return logs_dir() / f"serve-{slug}-{port}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}.log"


def _digest(cmdline: list[str]) -> str:
    return hashlib.sha256("\0".join(cmdline).encode("utf-8", "surrogateescape")).hexdigest()


def _record_path(server_id: str) -> Path:
    return servers_dir() / f"{server_id}.json"


def _write(server: Server) -> None:
    # Atomic (a reader never sees half a record) and private (it names the user's models and paths).
    path = _record_path(server.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(asdict(server), f)
    os.replace(tmp, path)


def register(*, model: str, source: str, host: str, port: int, log: str | None = None,
             headless: bool = False) -> Server:
    """Record this process as a server; `log` defaults to what `--detach` set."""
    import psutil

    me = psutil.Process()
    server = Server(id=f"{me.pid}-{int(me.create_time() * 1000)}", pid=me.pid, started=me.create_time(),
                    command=_digest(me.cmdline()), model=model, source=source, host=host, port=port,
                    log=log if log is not None else os.environ.get(LOG_ENV), headless=headless)
    _write(server)
    return server


class Entry:
    """The record of the server this process runs, while `recorded` holds it."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.served = False

    def mark_served(self) -> None:
        self.served = True


@contextlib.contextmanager
def recorded(*, model: str, source: str, host: str, port: int, headless: bool = False) -> Iterator[Entry]:
    """This process is a server while the block runs: recorded, and its id exported to what it starts."""
    previous = os.environ.get(ID_ENV)  # a server above this one (`vmetal serve` run from inside another)
    entry = Entry(register(model=model, source=source, host=host, port=port, headless=headless))
    os.environ[ID_ENV] = entry.server.id
    try:
        yield entry
    except BaseException as exc:
        clean = isinstance(exc, SystemExit) and exc.code in (0, None)
        finish(entry.server, died=(str(exc).splitlines() or [type(exc).__name__])[0]
               if entry.served and not clean else None)
        raise
    else:
        finish(entry.server, died=None)
    finally:
        if previous is None:
            os.environ.pop(ID_ENV, None)
        else:
            os.environ[ID_ENV] = previous


@contextlib.contextmanager
def _locked(server_id: str, *, wait: bool = True) -> Iterator[bool | None]:
    """Hold the record's lock: yields True while the record exists, False when it is gone (stopped by someone
    else meanwhile), None when `wait` is False and another process holds the lock."""
    path = servers_dir() / f"{server_id}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        present = _record_path(server_id).exists()
        try:
            yield present
        finally:
            if not _record_path(server_id).exists():
                # Unlinked while held: a later stopper that opens a new lock file finds no record anyway.
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(path).st_ino == os.fstat(fd).st_ino:
                        path.unlink()
    finally:
        os.close(fd)


def finish(server: Server, died: str | None) -> None:
    """The server's own last word: remove its record, or with `died` keep it marked as dead.

    Skipped while a `stop` holds the record: the stopper removes it, and waiting here would deadlock it."""
    with _locked(server.id, wait=False) as present:
        if not present:
            return
        if died is None:
            _record_path(server.id).unlink(missing_ok=True)
        else:
            _write(Server(**{**asdict(server), "died": died}))


def records() -> list[Server]:
    """Every server recorded on this machine (alive or not), oldest first."""
    found = []
    for path in sorted(servers_dir().glob("*.json")) if servers_dir().is_dir() else []:
        try:
            found.append(Server(**json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, TypeError):
            continue  # removed meanwhile, or not a record of this version
    return sorted(found, key=lambda s: s.started)


def process(server: Server) -> Any:
    """The server's live `psutil.Process`, or None when it is gone or its PID now belongs to another process."""
    import psutil

    try:
        proc = psutil.Process(server.pid)
        if abs(proc.create_time() - server.started) > START_SLACK_S or _digest(proc.cmdline()) != server.command:
            return None
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc
    except psutil.Error:
        return None


def status(server: Server) -> str:
    """`running` (it answers /health; a headless node: alive), `starting` (alive, not answering yet) or `dead`."""
    if process(server) is None:
        return DEAD
    return RUNNING if server.headless or answers_health(server.base_url, timeout=1.0) else STARTING


def uptime(server: Server, now: float | None = None) -> float:
    return max(0.0, (time.time() if now is None else now) - server.started)


def _alive(proc: Any) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tagged(server_id: str) -> list[Any]:
    """Live processes that carry the server's id in their environment (what it started, at any depth), and the
    members of the process groups they lead: a process that rewrote its title (vLLM's EngineCore, through
    setproctitle) shows no environment any more, but stays in the group of vLLM's server."""
    import psutil

    tagged, groups = [], {}
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            groups.setdefault(os.getpgid(proc.pid), []).append(proc)
            if proc.environ().get(ID_ENV) == server_id:
                tagged.append(proc)
        except (psutil.Error, OSError):
            continue  # gone, a zombie, or another user's
    found = {p.pid: p for p in tagged}
    for leader in tagged:
        found.update((p.pid, p) for p in groups.get(leader.pid, []))
    return list(found.values())


def _family(server: Server) -> list[Any]:
    import psutil

    procs: dict[int, Any] = {}
    main = process(server)
    if main is not None and main.pid != os.getpid():
        procs[main.pid] = main
        with contextlib.suppress(psutil.Error):
            procs.update((p.pid, p) for p in main.children(recursive=True))
    procs.update((p.pid, p) for p in _tagged(server.id))
    return list(procs.values())


def _wait_gone(procs: list[Any], timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if _alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def stop(server: Server, wait: float = STOP_WAIT_S) -> str:
    """Stop `server` and every process it started; `stopped`, `exited` (it was already dead; its leftovers
    are killed and its record cleared) or `gone` (another stop got there first)."""
    import psutil

    with _locked(server.id) as present:
        if not present:
            return GONE
        main = process(server)
        if main is not None and main.pid == os.getpid():
            main = None  # a record of this very process: it is not stopped by itself
        family = _family(server)  # before the signal: children re-parented later still count
        if main is not None:
            with contextlib.suppress(psutil.Error):
                main.terminate()
            _wait_gone([main], wait)
        left = _wait_gone([p for p in family + _tagged(server.id) if _alive(p)], 0)
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        _wait_gone(left, KILL_WAIT_S)
        _record_path(server.id).unlink(missing_ok=True)
    return STOPPED if main is not None else EXITED
