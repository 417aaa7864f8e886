"""The top-level `vmetal` app: mounts one command per module and turns errors into exit codes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from vmetal import __version__
from vmetal.cli import errors, make_app, serve

app = make_app(help="Run LLMs with vLLM on MLX (Apple Silicon; MLX CPU or CUDA elsewhere).")


def mount(parent: typer.Typer, name: str, command: Callable[..., Any], **settings: Any) -> None:
    """Register `command` under `name` with the shared error handling; `settings` go to Typer."""
    parent.command(name, **settings)(errors.exits_on_error(command))


def _print_version(value: bool) -> None:
    if value:
        # Data, so stdout; vLLM's and MLX's versions are `vmetal doctor`'s job, and importing them here
        # would cost seconds.
        print(f"vmetal {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print vmetal's version and exit.",
                                          callback=_print_version, is_eager=True)] = False,
) -> None:
    """Run LLMs with vLLM on MLX (Apple Silicon; MLX CPU or CUDA elsewhere)."""


mount(app, "serve", serve.serve, **serve.COMMAND_SETTINGS)


def main() -> None:
    """The `vmetal` console script."""
    try:
        app(prog_name="vmetal")
    except Exception as exc:  # noqa: BLE001 - commands handle known errors; this catches what escaped
        if errors.debug_enabled():
            raise
        err = errors.explain(exc)
        if err is None:
            sys.exit(errors.report_unexpected(exc))
        errors.report(err)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
