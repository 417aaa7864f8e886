"""User-facing errors of the `vmetal` CLI: one exception type and one table that explains the rest.

Commands raise `VmetalError` for anything a user can fix. Exceptions that other layers raise for the same
reason (a bad `VLLM_METAL_*` value, a server that would not start) are not wrapped at every call site:
`explain` maps them here, in one place, so every command reports them the same way. Anything that is
not in the table is a bug and keeps its traceback when `VLLM_METAL_DEBUG` is on.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TypeVar

import typer

# Exit codes: 1 for errors, 2 for usage errors (a flag, a value, a path), as Click does for bad usage.
ERROR = 1
USAGE = 2

DEBUG_ENV = "VLLM_METAL_DEBUG"


class VmetalError(Exception):
    """A failure the user can act on: `message` says what went wrong, `hint` how to fix it."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code


def _from_env_error(exc: Exception) -> VmetalError:
    return VmetalError(str(exc), exit_code=USAGE)


def _from_server_error(exc: Exception) -> VmetalError:
    from vmetal.server import PortInUseError

    code = USAGE if isinstance(exc, PortInUseError) else ERROR
    return VmetalError(str(exc), hint=getattr(exc, "hint", None), exit_code=code)


def _known() -> list[tuple[type[BaseException], Callable[[Exception], VmetalError]]]:
    # Built on demand so that importing this module stays as cheap as `typer` itself; the modules
    # named here import nothing heavy.
    from vmetal.envs import EnvError
    from vmetal.hub_common import HubError
    from vmetal.model_checks import ModelFileError
    from vmetal.models import ModelNotFoundError, UnsupportedModelError
    from vmetal.server import ServerError

    return [
        (EnvError, _from_env_error),
        (ServerError, _from_server_error),
        (HubError, lambda e: VmetalError(e.message, e.hint, e.exit_code)),
        (UnsupportedModelError, lambda e: VmetalError(str(e), exit_code=USAGE)),
        (ModelNotFoundError, lambda e: VmetalError(str(e), exit_code=USAGE)),
        (ModelFileError, lambda e: VmetalError(str(e), e.hint, exit_code=USAGE)),
    ]


def explain(exc: BaseException) -> VmetalError | None:
    """The user-facing form of `exc`, or None when it is not a known user error (a bug)."""
    if isinstance(exc, VmetalError):
        return exc
    for kind, convert in _known():
        if isinstance(exc, kind):
            return convert(exc)  # type: ignore[arg-type]
    return None


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


def report(err: VmetalError) -> None:
    """Print `error: …` and an optional `hint: …` to stderr; readable without colour (NO_COLOR)."""
    from rich.console import Console
    from rich.text import Text

    from vmetal.redact import mask, secret_values

    # A message may quote a URL with credentials or a server's line holding a token.
    secrets = secret_values()
    err = VmetalError(mask(err.message, secrets), mask(err.hint, secrets) if err.hint else None, err.exit_code)
    console = Console(stderr=True, highlight=False)
    # soft_wrap: Rich would otherwise hard-wrap at 80 columns when stderr is not a terminal, and a
    # one-line error must stay one line for the scripts that grep it.
    console.print(Text.assemble(("error", "bold red"), ": ", err.message), soft_wrap=True)
    if err.hint:
        console.print()
        console.print(Text.assemble(("hint", "bold cyan"), ": ", err.hint), soft_wrap=True)


def warn(message: str) -> None:
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True, highlight=False).print(
        Text.assemble(("warning", "bold yellow"), ": ", message), soft_wrap=True)


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

    from vmetal.redact import mask, secret_values

    sys.stderr.write(mask(traceback.format_exc(), secret_values()))


def report_unexpected(exc: BaseException) -> int:
    """The last resort of `main()`: one line instead of a traceback, unless debugging."""
    report(VmetalError(f"{type(exc).__name__}: {exc}",
                       hint=f"this is a bug in vmetal; run again with {DEBUG_ENV}=1 for the traceback"))
    return ERROR
