"""The `vmetal` command line: `app.py` mounts the commands, one module per command.

Everything under `vmetal.cli` is imported for `vmetal --help`, so it imports only typer, rich and the
stdlib at module level; mlx, torch and vllm are imported inside the commands that need them (and vllm
only ever in the server's own process).
"""

from __future__ import annotations

from typing import Any

import typer


def make_app(**settings: Any) -> typer.Typer:
    """A Typer app that behaves like every other vmetal app (top level or a future command group)."""
    defaults: dict[str, Any] = {
        "no_args_is_help": True,
        # Users get `error: …` lines from `vmetal.cli.output`; tracebacks are for VLLM_METAL_DEBUG=1.
        "pretty_exceptions_enable": False,
        # Completion scripts are generated from the app and shipped (completions/), not installed by
        # the CLI into a user's shell rc files.
        "add_completion": False,
    }
    return typer.Typer(**{**defaults, **settings})


# Commands that pass what follows `--` on to vLLM: Click hands it over in ctx.args.
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def model_and_passthrough(model: str | None, ctx_args: list[str]) -> tuple[str | None, list[str]]:
    """MODEL and the arguments meant for vLLM (those after `--`).

    Click gives the first word after `--` to an optional MODEL argument when none
    was given before it; no model name starts with `-`, so such a word goes back.
    """
    passthrough = list(ctx_args)
    if model is not None and model.startswith("-"):
        return None, [model, *passthrough]
    return model, passthrough
