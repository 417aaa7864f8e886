"""The interactive side of `vmetal chat`: reading a line (with history and Tab completion), the read-send loop
and the slash commands' handlers. The commands' table and parsing are in `vmetal.chat.session`.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from vmetal.chat.client import Link, Reply
from vmetal.chat.session import COMMANDS, SETTINGS, ChatError, Conversation, is_command, parse_command
from vmetal.cli.chat.view import ReplyView, console, context_hint, show_stats
from vmetal.errors import VmetalError

HISTORY_LENGTH = 1000
PROMPT = ">>> "
CONTINUATION = "... "
BLOCK = '"""'


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
            from vmetal.cli.output import warn

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
        self.console = console()

    # Output helpers: data the user asked for on stdout, problems on stderr.
    def note(self, message: str) -> None:
        from rich.text import Text

        self.console.print(Text(message, style="dim"), soft_wrap=True)

    def error(self, message: str, hint: str | None = None) -> None:
        from vmetal.cli.output import report

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
            self.error(str(exc), context_hint(exc, interactive=True))
            return
        view.finish(reply.text)
        self.conv.add_exchange(text, reply.text)
        if self.stats:
            show_stats(reply)

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
