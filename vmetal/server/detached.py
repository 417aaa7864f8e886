"""`vmetal serve --detach`: run `vmetal serve` itself in the background and return once it answers.

The background process is the foreground command with the same arguments, so everything `vmetal serve` does
holds for it too: its pre-flight checks, its supervision (SIGTERM stops vLLM and every process it started) and
its record for `vmetal ps` / `vmetal stop` (vmetal.server.background). It leads a session of its own (a
terminal's Ctrl-C or hang-up never reaches it), reads /dev/null, and writes everything, its own messages and
vLLM's log, to a file under the vmetal home. This process only waits: for the server's record and a 200 from
/health, or for the process to exit, or for the timeout, and then it stops what it started.

Stdlib only at module level, as every module the CLI imports on start-up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from vmetal.server import background
from vmetal.server.process import ServerError, answers_health

# Named, not imported: `vmetal serve` as a module, the same command as the console script.
SERVE_MODULE = "vmetal.cli.app"
TAIL_LINES = 12


def serve_command(args: Sequence[str]) -> list[str]:
    # -P: a checkout in the working directory must not shadow the installed vmetal (see process.vllm_serve_argv).
    return [sys.executable, "-P", "-m", SERVE_MODULE, "serve", *args]


def log_tail(log: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last `lines` non-empty lines of `log` (its end only: a log can grow to gigabytes)."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def _with_tail(message: str, log: Path) -> str:
    tail = log_tail(log)
    if not tail:
        return f"{message}; its log {log} is empty"
    return f"{message}; the last lines of its log {log}:\n" + "\n".join("  " + line for line in tail)


def _record_of(pid: int) -> background.Server | None:
    return next((s for s in background.records() if s.pid == pid), None)


def _abort(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server that did not start in time (or was interrupted), with everything it started."""
    server = _record_of(proc.pid)
    if server is not None:
        background.stop(server)
    elif proc.poll() is None:
        # Not registered yet: still in its pre-flight checks, before any vLLM process exists.
        proc.terminate()
        try:
            proc.wait(background.STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def start(args: Sequence[str], *, model: str, port: int, ready_timeout: float, api_key: str | None = None,
          environ: Mapping[str, str] | None = None) -> background.Server:
    """Start `vmetal serve ARGS` detached and return its record once /health answers.

    Raises `ServerError` with the log's last lines when it exits first or does not answer within
    `ready_timeout` seconds; by then nothing it started is left running.
    """
    log = background.new_log_path(model, port)
    env = dict(os.environ if environ is None else environ)
    env.pop(background.ID_ENV, None)
    env[background.LOG_ENV] = str(log)
    env["PYTHONUNBUFFERED"] = "1"  # the log must hold the last lines even when it dies
    if api_key:
        env["VLLM_API_KEY"] = api_key  # not on its command line, which every user of the machine can read
    with log.open("wb") as out:
        proc = subprocess.Popen(serve_command(args), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            code = proc.poll()
            if code is not None:
                raise ServerError(_with_tail(f"the server did not start: `vmetal serve` exited with code {code}",
                                             log))
            server = _record_of(proc.pid)
            if server is not None and answers_health(server.base_url, timeout=1.0):
                return server
            if time.monotonic() > deadline:
                raise ServerError(_with_tail(f"the server did not answer within {ready_timeout:g} s and was "
                                             "stopped", log),
                                  hint="a large model may need longer: raise `--ready-timeout`")
            time.sleep(0.25)
    except BaseException:
        _abort(proc)  # Ctrl-C while waiting, or any error: nothing may be left behind
        raise
