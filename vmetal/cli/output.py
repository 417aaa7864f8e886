"""What every command prints besides its data: `vmetal: …` messages, warnings, and errors as one line plus
a hint, to stderr, readable without colour (NO_COLOR) and never hard-wrapped (scripts grep these lines).

`exits_on_error` turns the errors `vmetal.errors.explain` knows into that line and the error's exit code,
the same under `main()` and Typer's test runner. rich is imported inside the functions: `--help` and shell
completion import this module on every start.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import typer

from vmetal.errors import DEBUG_ENV, ERROR, VmetalError, debug_enabled, explain


def _stderr() -> object:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def say(message: str, *, quiet: bool = False) -> None:
    """`vmetal: message` on stderr (nothing when `quiet`)."""
    if quiet:
        return
    # soft_wrap: Rich would otherwise hard-wrap at 80 columns when stderr is not a terminal.
    _stderr().print(f"vmetal: {message}", markup=False, soft_wrap=True)


def warn(message: str) -> None:
    from rich.text import Text

    _stderr().print(Text.assemble(("warning", "bold yellow"), ": ", message), soft_wrap=True)


def report(err: VmetalError) -> None:
    """Print `error: …` and an optional `hint: …` to stderr."""
    from rich.text import Text

    from vmetal.server.redact import mask, secret_values

    # A message may quote a URL with credentials or a server's line holding a token.
    secrets = secret_values()
    err = VmetalError(mask(err.message, secrets), mask(err.hint, secrets) if err.hint else None, err.exit_code)
    console = _stderr()
    # A one-line error must stay one line for the scripts that grep it.
    console.print(Text.assemble(("error", "bold red"), ": ", err.message), soft_wrap=True)
    if err.hint:
        console.print()
        console.print(Text.assemble(("hint", "bold cyan"), ": ", err.hint), soft_wrap=True)


F = TypeVar("F", bound=Callable[..., object])


def exits_on_error(func: F) -> F:
    """Wrap a command so known errors print and exit with their code, under `main()` and `CliRunner` alike."""

    @functools.wraps(func)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return func(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - anything unknown is re-raised untouched
            err = explain(exc)
            if err is None:
                raise
            if debug_enabled():
                print_traceback()
            report(err)
            raise typer.Exit(err.exit_code) from None

    return wrapper  # type: ignore[return-value]


def print_traceback() -> None:
    """The current exception's traceback on stderr (`-v`), with secrets masked as in every other line."""
    import sys
    import traceback

    from vmetal.server.redact import mask, secret_values

    sys.stderr.write(mask(traceback.format_exc(), secret_values()))


def report_unexpected(exc: BaseException) -> int:
    """The last resort of `main()`: one line instead of a traceback, unless debugging."""
    report(VmetalError(f"{type(exc).__name__}: {exc}",
                       hint=f"this is a bug in vmetal; run again with {DEBUG_ENV}=1 for the traceback"))
    return ERROR
