"""How `vmetal chat` shows a reply: streamed as it is generated; on a terminal, then redrawn as Markdown (if it
still fits on the screen to be erased). Scripts get only the answer, no colour, no reasoning.

rich is imported where it is used, because the CLI imports this module for every `vmetal --help`.
"""

from __future__ import annotations

import re
import shutil
import sys
from typing import Any, TextIO

from vmetal.chat.client import Delta, Reply
from vmetal.chat.session import ChatError

# Control characters other than newline and tab: a model's output must not move the cursor or send
# escape sequences to the user's terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def console(out: TextIO | None = None) -> Any:
    from rich.console import Console

    return Console(file=out, highlight=False)


def stderr_console() -> Any:
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
        self.console = console(out)
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


def show_stats(reply: Reply) -> None:
    from rich.text import Text

    sys.stdout.flush()
    stderr_console().print(Text(reply.stats.summary(), style="dim"), soft_wrap=True)


def context_hint(exc: ChatError, interactive: bool) -> str | None:
    text = str(exc).lower()
    if "max_model_len" in text or "context length" in text or "maximum context" in text:
        return ("`/reset` the conversation or lower `/set max_tokens`" if interactive
                else "send a shorter prompt or a lower `--max-tokens`")
    return None
