"""`vmetal chat`: a terminal chat with a running server, or with one started for the session.

Where the server comes from (`connect`): the server at `--url` if it answers and serves the model asked
for (any model when none was asked for); otherwise, given MODEL or `--demo`, a `ServerProcess` on a free
local port that lives as long as the session. Without a server and without a model there is nothing to
start: one error line and a hint.

What the terminal shows (`ReplyView`): the reply streams as it is generated; on a terminal it is then
redrawn as Markdown (if it still fits on the screen to be erased). Scripts (`-p`, or text piped in) get
only the reply on stdout, no colour, and errors on stderr with exit 1.

The conversation and the slash commands live in `vmetal.chat_session`, the HTTP client in
`vmetal.chat_client`; this module is the terminal around them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer

from vmetal.cli import model_and_passthrough
from vmetal.chat_client import APIError, ChatClient, Delta, Reply, ServerUnreachable
from vmetal.chat_session import COMMANDS, SETTINGS, ChatError, Conversation, check_setting, is_command, parse_command
from vmetal.cli.errors import USAGE, VmetalError
from vmetal.cli.serve import DEMO_SERVED_NAME, load_flags_config, resolve_model, say
from vmetal.server import DEFAULT_HOST, DEFAULT_PORT, READY_TIMEOUT_S, ServerProcess, free_port

DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}/v1"  # where `vmetal serve` listens by default
HISTORY_FILE = "chat_history"
HISTORY_LENGTH = 1000
PROMPT = ">>> "
CONTINUATION = "... "
BLOCK = '"""'

COMMAND_SETTINGS: dict[str, Any] = {
    # Whatever follows `--` is for the `vllm serve` that chat starts when it has to.
    "context_settings": {"allow_extra_args": True, "ignore_unknown_options": True},
    "epilog": "When chat starts a server, arguments after `--` go to `vllm serve` unchanged, e.g. "
              "`vmetal chat --demo -- --max-model-len 1024`.",
}

_SAMPLING = "Sampling (change them in the session with /set)"
_SERVER = "Server started for the session"


def vmetal_home() -> Path:
    """$VMETAL_HOME, else the XDG cache's `vmetal` folder (where the demo model lives too)."""
    if os.environ.get("VMETAL_HOME"):
        return Path(os.environ["VMETAL_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "vmetal"


# ---------------------------------------------------------------------------------------------------
# Finding or starting the server

@dataclass
class Link:
    """The server a session talks to and the model name it sends."""

    client: ChatClient
    model: str
    url: str
    server: ServerProcess | None = None  # set when this session started the server


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


def _demo_model() -> str:
    from vmetal.demo import default_demo_dir, ensure_demo_model

    if not (default_demo_dir() / "config.json").is_file():
        say(f"building the demo model in {default_demo_dir()}")
    return str(ensure_demo_model())


@contextlib.contextmanager
def _own_server(model: str | None, *, demo: bool, model_name: str | None, api_key: str | None,
                vllm_args: list[str], ready_timeout: float, reason: str) -> Iterator[tuple[ServerProcess, str]]:
    target, given_name = resolve_model(model, demo)  # a missing folder stops here, before anything starts
    cfg = load_flags_config(block_size=None, device=None)
    if target is None:
        target = _demo_model()
    name = model_name or given_name
    log = vmetal_home() / "logs" / "chat-server.log"
    server = ServerProcess(target, port=free_port(), served_model_name=name, api_key=api_key, config=cfg,
                           vllm_args=vllm_args, echo=False, log_path=log)
    say(f"{reason}; starting {name} for this session (vLLM's log: {log})")
    # The server leads its own session, so a closed terminal (SIGHUP) or a `kill` (SIGTERM) reaches only
    # us: turn both into an exit that runs the `finally` below instead of leaving the server orphaned.
    previous = {sig: signal.signal(sig, _exit_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        server.start()
        status = (_stderr_console().status(f"starting {name}…") if sys.stderr.isatty()
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
# Showing a reply

# Control characters other than newline and tab: a model's output must not move the cursor or send
# escape sequences to the user's terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _console(out: TextIO | None = None) -> Any:
    from rich.console import Console

    return Console(file=out, highlight=False)


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _rows(text: str, width: int) -> int:
    """Terminal rows that `text`, written from the start of a row, takes at `width` columns."""
    from rich.cells import cell_len

    return sum(max(1, -(-cell_len(line.expandtabs(8)) // width)) for line in text.split("\n"))


class ReplyView:
    """One reply on `out` as it streams in; on a terminal, redrawn as Markdown once complete."""

    def __init__(self, out: TextIO, *, markdown: bool) -> None:
        self.out = out
        self.console = _console(out)
        self.terminal = out.isatty()
        self.markdown = markdown and self.terminal
        self.shown: list[str] = []
        self.reasoning: list[str] = []
        self._thinking = False
        self._columns, self._lines = shutil.get_terminal_size()

    def write(self, delta: Delta) -> None:
        if delta.reasoning and not self.terminal:
            return  # a script gets the answer only
        if not delta.reasoning and self._thinking:
            self._put("\n\n")  # the answer starts below a reasoning model's thinking
        self._thinking = delta.reasoning
        text = _CONTROL.sub("", delta.text) if self.terminal else delta.text
        if delta.reasoning:
            from rich.text import Text

            self.reasoning.append(text)
            self.console.print(Text(text, style="dim"), end="", soft_wrap=True)
            self.shown.append(text)
            self.out.flush()
        else:
            self._put(text)

    def _put(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        self.shown.append(text)

    def finish(self, answer: str) -> None:
        """The reply is complete: redraw it as Markdown where that is possible, else end its line."""
        shown = "".join(self.shown)
        if self.markdown and answer.strip() and self._erase(shown):
            from rich.markdown import Markdown
            from rich.text import Text

            if self.reasoning:
                self.console.print(Text("".join(self.reasoning).strip(), style="dim"))
                self.console.print()
            self.console.print(Markdown(answer))
        elif shown and not shown.endswith("\n"):
            self.out.write("\n")
        self.out.flush()

    def stop(self, interrupted: bool = False) -> None:
        """The reply was cut short: end its line, leave it as it is."""
        shown = "".join(self.shown)
        # After Ctrl-C the terminal has echoed `^C` after whatever was shown.
        if (shown and not shown.endswith("\n")) or (interrupted and self.terminal):
            self.out.write("\n")
        self.out.flush()

    def _erase(self, shown: str) -> bool:
        rows = _rows(shown, self._columns)
        if rows >= self._lines:
            return False  # its first rows scrolled off the screen: leave the plain text
        up = f"\x1b[{rows - 1}A" if rows > 1 else ""  # CSI 0 A would still move up one row
        self.out.write("\r" + up + "\x1b[J")
        return True


def _show_stats(reply: Reply) -> None:
    from rich.text import Text

    sys.stdout.flush()
    _stderr_console().print(Text(reply.stats.summary(), style="dim"), soft_wrap=True)


def _context_hint(exc: ChatError, interactive: bool) -> str | None:
    text = str(exc).lower()
    if "max_model_len" in text or "context length" in text or "maximum context" in text:
        return ("`/reset` the conversation or lower `/set max_tokens`" if interactive
                else "send a shorter prompt or a lower `--max-tokens`")
    return None


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
        raise VmetalError(str(exc), hint=_context_hint(exc, interactive=False)) from None
    if stats:
        _show_stats(reply)


# ---------------------------------------------------------------------------------------------------
# The interactive session

class LineEditor:
    """`input()` with GNU readline or libedit where Python has one: line editing, history in a file."""

    def __init__(self, history: Path | None) -> None:
        self.history = history
        self._start_length = 0
        try:
            import readline
        except ImportError:  # a Python built without it: plain input() still works
            self.readline = None
            return
        self.readline = readline
        readline.set_history_length(HISTORY_LENGTH)
        if history is not None:
            with contextlib.suppress(OSError):
                readline.read_history_file(history)
        self._start_length = readline.get_current_history_length()
        readline.set_completer(self._complete)
        readline.set_completer_delims(" \t\n")
        libedit = "libedit" in (readline.__doc__ or "") or getattr(readline, "backend", "") == "editline"
        readline.parse_and_bind("bind ^I rl_complete" if libedit else "tab: complete")

    def _complete(self, text: str, state: int) -> str | None:
        buffer = self.readline.get_line_buffer() if self.readline else ""
        words = buffer.split()
        if is_command(buffer) and len(words) <= 1 and not buffer.endswith(" "):
            options = [f"/{name}" for name in COMMANDS if f"/{name}".startswith(text)]
        elif words[:1] == ["/set"] and (len(words) == 1 or (len(words) == 2 and not buffer.endswith(" "))):
            options = [name for name in SETTINGS if name.startswith(text)]
        else:
            options = []
        return options[state] if state < len(options) else None

    def read(self, prompt: str) -> str:
        return input(prompt)

    def save(self) -> None:
        if self.readline is None or self.history is None:
            return
        added = self.readline.get_current_history_length() - self._start_length
        try:
            self.history.parent.mkdir(parents=True, exist_ok=True)
            if hasattr(self.readline, "append_history_file") and self.history.exists():
                # Appending keeps what other sessions wrote meanwhile. Once the file is twice as long
                # as needed, it is rewritten with this session's last HISTORY_LENGTH lines.
                if added > 0:
                    self.readline.append_history_file(min(added, HISTORY_LENGTH), self.history)
                if _line_count(self.history) > 2 * HISTORY_LENGTH:
                    self.readline.write_history_file(self.history)
            else:
                self.readline.write_history_file(self.history)
        except OSError as exc:
            from vmetal.cli.errors import warn

            warn(f"could not save the chat history to {self.history}: {exc.strerror or exc}")


def _line_count(path: Path) -> int:
    with contextlib.suppress(OSError), path.open("rb") as f:
        return sum(1 for _ in f)
    return 0


class Repl:
    """Read a message or a slash command, act on it, repeat; Ctrl-C stops a reply, Ctrl-D leaves."""

    def __init__(self, link: Link, conv: Conversation, editor: LineEditor, *, stats: bool,
                 markdown: bool) -> None:
        self.link = link
        self.conv = conv
        self.editor = editor
        self.stats = stats
        self.markdown = markdown
        self.console = _console()

    # Output helpers: data the user asked for on stdout, problems on stderr.
    def note(self, message: str) -> None:
        from rich.text import Text

        self.console.print(Text(message, style="dim"), soft_wrap=True)

    def error(self, message: str, hint: str | None = None) -> None:
        from vmetal.cli.errors import report

        sys.stdout.flush()
        report(VmetalError(message, hint=hint))

    def run(self) -> None:
        self.note(f"chatting with {self.link.model} at {self.link.url}; /help for commands, "
                  f'{BLOCK} for multi-line input, Ctrl-C stops a reply, Ctrl-D leaves')
        try:
            while True:
                try:
                    text = self.read_message()
                except EOFError:
                    self.console.print()
                    return
                except KeyboardInterrupt:  # at the prompt: drop the line, stay
                    self.console.print()
                    continue
                try:
                    if is_command(text):
                        if not self.command(text):
                            return
                    elif text.strip():
                        self.send(text[1:] if text.startswith("//") else text)
                except KeyboardInterrupt:  # e.g. while a finished reply was being redrawn
                    self.console.print()
        finally:
            self.editor.save()

    def read_message(self) -> str:
        """One message: a line, lines ending in `\\` joined, or a block between two `\"\"\"` lines."""
        line = self.editor.read(PROMPT)
        if line.strip() == BLOCK or (line.lstrip().startswith(BLOCK) and not line.rstrip().endswith(BLOCK)):
            first = line.lstrip()[len(BLOCK):]
            lines = [first] if first else []
            while True:
                more = self.editor.read(CONTINUATION)
                if more.rstrip().endswith(BLOCK):
                    last = more.rstrip()[:-len(BLOCK)]
                    if last:
                        lines.append(last)
                    return "\n".join(lines)
                lines.append(more)
        lines = []
        while line.endswith("\\") and not line.endswith("\\\\"):
            lines.append(line[:-1])
            line = self.editor.read(CONTINUATION)
        lines.append(line)
        return "\n".join(lines)

    def send(self, text: str) -> None:
        view = ReplyView(sys.stdout, markdown=self.markdown)
        reply: Reply | None = None
        try:
            reply = self.link.client.stream(self.link.model, self.conv.messages(text), self.conv.request_fields())
            with reply:
                for delta in reply:
                    view.write(delta)
        except KeyboardInterrupt:
            view.stop(interrupted=True)
            partial = reply.text if reply is not None else ""
            if partial:
                # What the user saw stays in the conversation, so "go on" continues from it.
                self.conv.add_exchange(text, partial)
            self.note("[interrupted]")
            return
        except ChatError as exc:
            view.stop()
            self.error(str(exc), _context_hint(exc, interactive=True))
            return
        view.finish(reply.text)
        self.conv.add_exchange(text, reply.text)
        if self.stats:
            _show_stats(reply)

    def command(self, line: str) -> bool:
        """Run one slash command; False when the session should end."""
        try:
            cmd = parse_command(line)
            return getattr(self, f"do_{cmd.name}")(cmd.arg) is not False
        except ChatError as exc:
            self.error(str(exc))
            return True

    def do_help(self, arg: str) -> None:
        width = max(len(f"/{name} {syn}".rstrip()) for name, (syn, _) in COMMANDS.items())
        for name, (synopsis, text) in COMMANDS.items():
            self.console.print(f"  {f'/{name} {synopsis}'.rstrip():<{width}}  {text}", markup=False,
                               soft_wrap=True)
        self.console.print(f'  {BLOCK:<{width}}  start or end a multi-line message (or end lines with \\)',
                           markup=False, soft_wrap=True)
        self.console.print(f"  {'//TEXT':<{width}}  send a message that starts with /", markup=False,
                           soft_wrap=True)

    def do_reset(self, arg: str) -> None:
        self.conv.reset()
        self.note("conversation cleared" + (" (the system prompt stays)" if self.conv.system else ""))

    def do_system(self, arg: str) -> None:
        self.conv.system = arg or None
        self.note("system prompt set" if arg else "system prompt removed")

    def do_set(self, arg: str) -> None:
        if not arg:
            for name, value in self.conv.settings.items():
                self.console.print(f"{name} = {'default' if value is None else value}", markup=False)
            return
        name, _, value = arg.partition(" ")
        if not value.strip():
            raise ChatError("usage: /set temperature|top_p|max_tokens VALUE")
        key, parsed = self.conv.set(name, value)
        self.note(f"{key} = {'default' if parsed is None else parsed}")

    def do_save(self, arg: str) -> None:
        path = self.conv.save(arg, self.link.model)
        self.note(f"saved {len(self.conv.turns)} messages to {path}")

    def do_load(self, arg: str) -> None:
        # Settings the file does not name (a bare messages list names none) stay as they are.
        self.conv = Conversation.load(arg, settings=self.conv.settings)
        self.note(f"loaded {len(self.conv.turns)} messages from {Path(arg).expanduser()}"
                  + (" and a system prompt" if self.conv.system else ""))

    def do_model(self, arg: str) -> None:
        if arg:
            try:
                ids = [m["id"] for m in self.link.client.models()]
            except ChatError as exc:
                raise ChatError(f"cannot list the server's models: {exc}") from None
            if arg not in ids:
                raise ChatError(f"the server does not serve `{arg}`; it serves {', '.join(ids)}")
            self.link.model = arg
        where = "started for this session" if self.link.server else "running"
        self.console.print(f"model: {self.link.model}\nserver: {self.link.url} ({where})", markup=False)

    def do_exit(self, arg: str) -> bool:
        return False


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
    ready_timeout: Annotated[float, typer.Option(min=1, rich_help_panel=_SERVER,
                                                 help="Seconds to wait for it to answer /health.")]
        = READY_TIMEOUT_S,
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
        history = vmetal_home() / HISTORY_FILE
        Repl(link, conv, LineEditor(history), stats=stats, markdown=markdown).run()
