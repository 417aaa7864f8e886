"""The top-level `vmetal` app: mounts one command per module and turns errors into exit codes."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from vmetal import __version__
from vmetal.cli import bench as bench_cmd
from vmetal.cli import chat as chat_cmd
from vmetal.cli import completion as completion_cmd
from vmetal.cli import convert as convert_cmd
from vmetal.cli import doctor as doctor_cmd
from vmetal.cli import install as install_cmd
from vmetal.cli import make_app, output, serve
from vmetal.cli import pull as pull_cmd
from vmetal.cli import servers as servers_cmd
from vmetal.cli import uninstall as uninstall_cmd
from vmetal.errors import DEBUG_ENV, debug_enabled, explain

app = make_app(help="Run LLMs with vLLM on MLX (Apple Silicon; MLX CPU or CUDA elsewhere).")


def mount(parent: typer.Typer, name: str, command: Callable[..., Any], **settings: Any) -> None:
    """Register `command` under `name` with the shared error handling; `settings` go to Typer."""
    parent.command(name, **settings)(output.exits_on_error(command))


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
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug output: tracebacks for errors, "
                                          "debug logs from vLLM and the engine (sets VLLM_METAL_DEBUG=1 and, "
                                          "unless set, VLLM_LOGGING_LEVEL=DEBUG).")] = False,
) -> None:
    """Run LLMs with vLLM on MLX (Apple Silicon; MLX CPU or CUDA elsewhere)."""
    if verbose:
        # Through the environment, so the server and engine processes started below see it too.
        os.environ[DEBUG_ENV] = "1"
        # vLLM's log handler filters by this level, so without it the engine's debug lines never print.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "DEBUG")


mount(app, "serve", serve.serve, **serve.COMMAND_SETTINGS)
mount(app, "doctor", doctor_cmd.doctor, **doctor_cmd.COMMAND_SETTINGS)
mount(app, "ps", servers_cmd.ps)
mount(app, "stop", servers_cmd.stop)
mount(app, "chat", chat_cmd.chat, **chat_cmd.COMMAND_SETTINGS)
mount(app, "pull", pull_cmd.pull)
mount(app, "list", pull_cmd.list_models)
mount(app, "rm", pull_cmd.rm)
mount(app, "convert", convert_cmd.convert)
mount(app, "install", install_cmd.install, **install_cmd.COMMAND_SETTINGS)
mount(app, "uninstall", uninstall_cmd.uninstall, **uninstall_cmd.COMMAND_SETTINGS)
mount(app, "completion", completion_cmd.command_for(app))
app.add_typer(bench_cmd.app, name="bench")  # a group: `bench online`, `bench offline`


def main() -> None:
    """The `vmetal` console script."""
    try:
        app(prog_name="vmetal")
    except Exception as exc:  # noqa: BLE001 - commands handle known errors; this catches what escaped
        if debug_enabled():
            output.print_traceback()  # masked: a traceback can quote a token or an API key
        err = explain(exc)
        if err is None:
            sys.exit(output.report_unexpected(exc))
        output.report(err)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
