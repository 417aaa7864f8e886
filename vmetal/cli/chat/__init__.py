"""`vmetal chat`: a terminal chat with a running server, or with one started for the session.

Where the server comes from (`connect`): the server at `--url` if it answers and serves the model asked
for (any model when none was asked for); otherwise, given MODEL or `--demo`, a `ServerProcess` on a free
local port that lives as long as the session. Without a server and without a model there is nothing to
start: one error line and a hint.

What the terminal shows: the reply streams as it is generated; on a terminal it is then redrawn as
Markdown (`vmetal.cli.chat.view`). Scripts (`-p`, or text piped in) get only the reply on stdout, no
colour, and errors on stderr with exit 1; a terminal gets the session of `vmetal.cli.chat.repl`.

The conversation and the slash commands live in `vmetal.chat.session`, the HTTP client in
`vmetal.chat.client`; this module is the command around them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from vmetal import envs
from vmetal.chat.client import APIError, ChatClient, Link, ServerUnreachable
from vmetal.chat.session import ChatError, Conversation, check_setting
from vmetal.cli import PASSTHROUGH, model_and_passthrough, options
from vmetal.cli.chat.view import ReplyView, context_hint, show_stats, stderr_console
from vmetal.cli.options import DEMO_SERVED_NAME, load_flags_config, ready_timeout_option, resolve_model
from vmetal.cli.output import say
from vmetal.errors import USAGE, VmetalError
from vmetal.server.process import DEFAULT_HOST, DEFAULT_PORT, READY_TIMEOUT_S, ServerProcess, free_port

DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}/v1"  # where `vmetal serve` listens by default
HISTORY_FILE = "chat_history"

COMMAND_SETTINGS: dict[str, Any] = {
    "context_settings": PASSTHROUGH,  # whatever follows `--` is for the `vllm serve` chat starts when it has to
    "epilog": "When chat starts a server, arguments after `--` go to `vllm serve` unchanged, e.g. "
              "`vmetal chat --demo -- --max-model-len 1024`.",
}

_SAMPLING = "Sampling (change them in the session with /set)"
_SERVER = "Server started for the session"
ServerReadyTimeout = ready_timeout_option(_SERVER)


# ---------------------------------------------------------------------------------------------------
# Finding or starting the server

def _normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else "http://" + url


def _served_by(models: list[dict[str, Any]], wanted: str | None, model_name: str | None) -> str | None:
    """The model id to send, from the server's list, or None when the server does not have it."""
    ids = [m["id"] for m in models]
    if model_name:
        return model_name if model_name in ids else None
    if wanted is None:
        return ids[0] if ids else None
    if wanted in ids:
        return wanted
    # `vmetal serve ./folder` serves it as `./folder`; vLLM's `root` is the path it loaded.
    path = Path(wanted).expanduser()
    if path.exists():
        for m in models:
            if isinstance(m.get("root"), str) and Path(m["root"]).expanduser().resolve() == path.resolve():
                return m["id"]
    return None


def _probe(client: ChatClient, url: str) -> list[dict[str, Any]] | None:
    """The server's models, None when nothing answers; an answer that is an error is a `VmetalError`."""
    try:
        return client.models()
    except ServerUnreachable:
        return None
    except APIError as exc:
        if exc.status in (401, 403):
            hint = "pass the server's key with `--api-key` (or VLLM_API_KEY)"
        elif exc.status == 404:
            hint = "`--url` is the OpenAI base URL, which usually ends in `/v1`"
        else:
            hint = None
        raise VmetalError(f"the server at {url} refused to list its models: {exc}", hint=hint) from None


@contextlib.contextmanager
def connect(url: str, *, api_key: str | None, model: str | None, demo: bool, model_name: str | None,
            vllm_args: list[str], ready_timeout: float) -> Iterator[Link]:
    """The server at `url`, or one started for `model` (stopped when the block ends)."""
    if model is not None and demo:
        raise VmetalError(f"give a MODEL or `--demo`, not both (MODEL was `{model}`)", exit_code=USAGE)
    wanted = DEMO_SERVED_NAME if demo else model
    client = ChatClient(url, api_key)
    models = _probe(client, url)
    if models is not None:
        name = _served_by(models, wanted, model_name)
        if name is not None:
            yield Link(client, name, url)
            return
        listing = ", ".join(f"`{m['id']}`" for m in models) or "no model"
        if wanted is None:
            if model_name is None:
                raise VmetalError(f"the server at {url} serves no model")
            raise VmetalError(f"the server at {url} does not serve `{model_name}` (it serves {listing})",
                              hint="pick one of its models with `--model-name`, or pass a MODEL to start "
                                   "a server for this session")
        reason = f"the server at {url} serves {listing}, not `{model_name or wanted}`"
    elif wanted is None:
        raise VmetalError(f"no server answers at {url}",
                          hint="start one with `vmetal serve` (`vmetal serve --demo` for a tiny local model), "
                               "or pass a MODEL (or `--demo`) to start one for this session")
    else:
        reason = f"no server answers at {url}"
    with _own_server(model, demo=demo, model_name=model_name, api_key=api_key, vllm_args=vllm_args,
                     ready_timeout=ready_timeout, reason=reason) as (server, name):
        yield Link(ChatClient(server.url, api_key), name, server.url, server)


@contextlib.contextmanager
def _own_server(model: str | None, *, demo: bool, model_name: str | None, api_key: str | None,
                vllm_args: list[str], ready_timeout: float, reason: str) -> Iterator[tuple[ServerProcess, str]]:
    target, given_name = resolve_model(model, demo)  # a missing folder stops here, before anything starts
    cfg = load_flags_config(block_size=None, device=None)
    if target is None:
        target = options.demo_model()
    elif not Path(target).is_dir():
        target = options.pulled(target, None)
    from vmetal.preflight.features import serves_embeddings

    if serves_embeddings(target, vllm_args):  # vLLM would open no chat route for it
        raise VmetalError(f"`{target}` is an embedding model: it computes vectors, not replies, so there is "
                          "nothing to chat with", hint="serve it with `vmetal serve MODEL` and call /v1/embeddings",
                          exit_code=USAGE)
    name = model_name or given_name
    log = envs.vmetal_home() / "logs" / "chat-server.log"
    server = ServerProcess(target, port=free_port(), served_model_name=name, api_key=api_key, config=cfg,
                           vllm_args=vllm_args, echo=False, log_path=log)
    say(f"{reason}; starting {name} for this session (vLLM's log: {log})")
    # The server leads its own session, so a closed terminal (SIGHUP) or a `kill` (SIGTERM) reaches only
    # us: turn both into an exit that runs the `finally` below instead of leaving the server orphaned.
    previous = {sig: signal.signal(sig, _exit_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        server.start()
        status = (stderr_console().status(f"starting {name}…") if sys.stderr.isatty()
                  else contextlib.nullcontext())
        with status:
            server.wait_ready(ready_timeout)
        yield server, name
    finally:
        try:
            server.stop()
        except KeyboardInterrupt:
            server.kill()
            server.stop(grace=0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------------------------------------------
# One prompt, for scripts

def run_once(link: Link, conv: Conversation, text: str, *, stats: bool, markdown: bool) -> None:
    view = ReplyView(sys.stdout, markdown=markdown)
    try:
        with link.client.stream(link.model, conv.messages(text), conv.request_fields()) as reply:
            for delta in reply:
                view.write(delta)
        view.finish(reply.text)
    except BrokenPipeError:
        # The reader went away (`| head`): nothing left to do, and nothing more may go to stdout.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    except ChatError as exc:
        view.stop()
        raise VmetalError(str(exc), hint=context_hint(exc, interactive=False)) from None
    if stats:
        show_stats(reply)


# ---------------------------------------------------------------------------------------------------
# The command

def chat(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Argument(
        show_default=False, metavar="MODEL",
        help="Local model folder or Hugging Face id; started for the session when no server at `--url` "
             "serves it.")] = None,
    demo: Annotated[bool, typer.Option("--demo", help="Chat with the tiny random-weight model "
                                                      "`vmetal serve --demo` serves.")] = False,
    url: Annotated[str, typer.Option(help="OpenAI base URL of a running server.")] = DEFAULT_URL,
    api_key: Annotated[str | None, typer.Option(envvar="VLLM_API_KEY", show_default=False,
                                                help="Key the server wants.")] = None,
    model_name: Annotated[str | None, typer.Option(
        show_default=False, help="Model name to send. Default: the server's first model; MODEL as "
                                 "given (`vmetal-demo` with --demo) for a server chat starts.")] = None,
    prompt: Annotated[str | None, typer.Option(
        "--prompt", "-p", show_default=False,
        help="Send this one message, print the reply and exit (text piped to stdin does the same).")] = None,
    system: Annotated[str | None, typer.Option(show_default=False, help="System prompt.")] = None,
    temperature: Annotated[float | None, typer.Option(min=0, show_default=False, rich_help_panel=_SAMPLING,
                                                      help="Default: the model's.")] = None,
    top_p: Annotated[float | None, typer.Option(min=0, max=1, show_default=False,
                                                rich_help_panel=_SAMPLING,
                                                help="Default: the model's.")] = None,
    max_tokens: Annotated[int | None, typer.Option(min=1, show_default=False, rich_help_panel=_SAMPLING,
                                                   help="Longest reply in tokens. Default: what the "
                                                        "context leaves.")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="After each reply, show its tokens, time to first "
                                                        "token and tokens/s (on stderr).")] = False,
    markdown: Annotated[bool, typer.Option(help="Redraw each finished reply as Markdown (on a "
                                                "terminal).")] = True,
    ready_timeout: ServerReadyTimeout = READY_TIMEOUT_S,
) -> None:
    """Chat with a model: a running server's, or one started for the session."""
    model, vllm_args = model_and_passthrough(model, ctx.args)

    conv = Conversation(system=system)
    for name, value in (("temperature", temperature), ("top_p", top_p), ("max_tokens", max_tokens)):
        try:
            conv.settings[name] = check_setting(name, value)
        except ChatError as exc:
            raise VmetalError(str(exc).replace(name, f"`--{name.replace('_', '-')}`", 1),
                              exit_code=USAGE) from None

    message = prompt
    if message is None and not sys.stdin.isatty():
        message = sys.stdin.read().rstrip()  # `echo question |` adds a newline that is not the question's
    if message is not None and not message.strip():
        raise VmetalError("nothing to send: the prompt is empty", exit_code=USAGE)

    with connect(_normalize_url(url), api_key=api_key, model=model, demo=demo, model_name=model_name,
                 vllm_args=vllm_args, ready_timeout=ready_timeout) as link:
        if message is not None:
            run_once(link, conv, message, stats=stats, markdown=markdown)
            return
        history = envs.vmetal_home() / HISTORY_FILE
        from vmetal.cli.chat.repl import LineEditor, Repl

        Repl(link, conv, LineEditor(history), stats=stats, markdown=markdown).run()
