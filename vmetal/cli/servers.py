"""`vmetal ps`, `vmetal stop` and what `vmetal serve --detach` prints: servers for scripts.

    URL=$(vmetal serve --demo --detach)     # returns once the server answers; its URL on stdout
    vmetal ps                               # model, URL, PID, uptime, status (`--json` for scripts)
    vmetal stop vmetal-demo                 # or `--all`; the server and every process it started

The bookkeeping is `vmetal.server.background`'s and the waiting `vmetal.server.detached`'s; this module owns
the flags and what reaches the terminal. Data (the URL, the table, `--json`) goes to stdout, messages to stderr.
A server that died is listed as `dead` until `vmetal stop` clears it, so a script sees that it died.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import typer

from vmetal.cli.output import say
from vmetal.errors import ERROR, USAGE, VmetalError

JsonOption = Annotated[bool, typer.Option("--json", help="Print the servers as JSON (stdout).")]

# `serve`'s parameters that a detached server does not get from its command line: MODEL and the served name are
# passed resolved (no second pull), the key through the environment (not visible in `ps`), the rest is ours.
_NOT_PASSED = {"model", "demo", "served_model_name", "api_key", "detach", "json_output"}


def detached_args(ctx: typer.Context, *, target: str, name: str, vllm_args: list[str]) -> list[str]:
    """`vmetal serve`'s arguments for the background server: the same options as given, minus `--detach`."""
    args = [target, "--served-model-name", name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in _NOT_PASSED or param.param_type_name != "option" or value is None or value is False:
            continue
        args.append(param.opts[0])
        if not param.is_flag:
            args.append(str(getattr(value, "value", value)))  # an enum's value, not its repr
    return [*args, "--", *vllm_args] if vllm_args else args


def _duration(seconds: float) -> str:
    s = int(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit}{(s % size) // sub_size:02d}{sub}"
    return f"{s}s"


def _as_json(server: Any, state: str, now: float) -> dict[str, Any]:
    return {"id": server.id, "model": server.model, "url": None if server.headless else server.url,
            "host": server.host, "port": server.port,
            "pid": server.pid, "status": state,
            "uptime_s": None if state == "dead" else round(now - server.started, 1),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(server.started)),
            "source": server.source, "log": server.log, "died": server.died, "headless": server.headless}


def serve_detached(ctx: typer.Context, *, target: str, name: str, vllm_args: list[str], api_key: str | None,
                   json_output: bool) -> None:
    """`vmetal serve … --detach`: start it, wait until it answers, print where it is."""
    from vmetal.server import detached

    params = ctx.params
    server = detached.start(detached_args(ctx, target=target, name=name, vllm_args=vllm_args), model=name,
                            port=params["port"], ready_timeout=params["ready_timeout"], api_key=api_key)
    if json_output:
        print(json.dumps(_as_json(server, "running", time.time())), flush=True)
        return
    print(server.url, flush=True)
    say(f"serving {name} at {server.url} in the background (PID {server.pid}, log {server.log}); "
        f"`vmetal stop {name}` stops it")


def ps(json_out: JsonOption = False) -> None:
    """List the vmetal servers on this machine: model, URL, PID, uptime, status (running, starting or dead)."""
    from vmetal.server import background

    now = time.time()
    servers = background.records()
    states = [background.status(s) for s in servers]
    if json_out:
        print(json.dumps([_as_json(s, state, now) for s, state in zip(servers, states)]))
        return
    if not servers:
        say("no vmetal server is running; `vmetal serve --detach` starts one in the background")
        return
    # Plain aligned columns, as `vmetal list`: the same on a terminal and in a pipe.
    rows = [("MODEL", "URL", "PID", "UPTIME", "STATUS")]
    rows += [(s.model, s.url, str(s.pid), "-" if state == "dead" else _duration(background.uptime(s, now)), state)
             for s, state in zip(servers, states)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    for s, state in zip(servers, states):
        if state == "dead":
            say(f"`{s.model}` (PID {s.pid}) is dead: {s.died or 'its process is gone'}; log: {s.log or 'none'}; "
                f"`vmetal stop {s.model}` clears it")


def _matches(server: Any, model: str) -> bool:
    if model in (server.model, server.source):
        return True
    path = Path(model).expanduser()
    return path.exists() and str(path.resolve()) == server.source


def stop(
    model: Annotated[str | None, typer.Argument(metavar="MODEL", show_default=False,
                                                help="The model name `vmetal ps` shows (or the folder it "
                                                     "serves): every server of it stops. Default: the only "
                                                     "server.")] = None,
    all_servers: Annotated[bool, typer.Option("--all", help="Stop every vmetal server.")] = False,
) -> None:
    """Stop vmetal servers and every process they started; a dead server's record is cleared."""
    from vmetal.server import background

    servers = background.records()
    if model is not None and all_servers:
        raise VmetalError(f"give a MODEL or `--all`, not both (MODEL was `{model}`)", exit_code=USAGE)
    names = ", ".join(sorted({s.model for s in servers}))
    if all_servers:
        targets = servers
        if not targets:
            say("no vmetal server is running")
            return
    elif model is not None:
        targets = [s for s in servers if _matches(s, model)]
        if not targets:
            raise VmetalError(f"no vmetal server of `{model}` is running",
                              hint=f"`vmetal ps` lists the servers ({names})" if servers else None,
                              exit_code=USAGE)
    elif len(servers) != 1:
        if not servers:
            raise VmetalError("no vmetal server is running", exit_code=ERROR)
        raise VmetalError(f"{len(servers)} vmetal servers are recorded ({names}): name one, or pass `--all`",
                          exit_code=USAGE)
    else:
        targets = servers
    # Side by side: each waits for its own server's graceful stop.
    with ThreadPoolExecutor(max_workers=min(8, len(targets))) as pool:
        outcomes = list(pool.map(background.stop, targets))
    for s, outcome in zip(targets, outcomes):
        where = f"`{s.model}` at {s.url} (PID {s.pid})"
        if outcome == background.STOPPED:
            say(f"stopped {where}")
        elif outcome == background.EXITED:
            say(f"{where} had already stopped ({s.died or 'its process was gone'}); its record is cleared "
                f"(log: {s.log or 'none'})")
        else:
            say(f"{where} was stopped by another `vmetal stop` meanwhile")
