"""The one user-error type, its exit codes, and the table that explains every other layer's user errors.

Library code (hub, preflight, bench, chat, the server bridge) raises `VmetalError` for anything a user can fix,
or its own error type where it has one (`EnvError`, `HubError`, …). `explain` maps those here, in one place,
so every command reports them the same way and no library imports the CLI. How an error is printed is
`vmetal.cli.output`'s job. Anything not in the table is a bug and keeps its traceback when `VLLM_METAL_DEBUG`
is on.

Stdlib only: every command imports this module.
"""

from __future__ import annotations

import os
from collections.abc import Callable

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
    from vmetal.server.process import PortInUseError

    code = USAGE if isinstance(exc, PortInUseError) else ERROR
    return VmetalError(str(exc), hint=getattr(exc, "hint", None), exit_code=code)


def _known() -> list[tuple[type[BaseException], Callable[[Exception], VmetalError]]]:
    # Built on demand so that importing this module stays free; the modules named here import nothing heavy.
    from vmetal.envs import EnvError
    from vmetal.hub.common import HubError
    from vmetal.preflight.checkpoint import ModelNotFoundError, UnsupportedModelError
    from vmetal.preflight.model_files import ModelFileError
    from vmetal.server.process import ServerError

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
