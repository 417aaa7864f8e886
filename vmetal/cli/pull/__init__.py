"""`vmetal pull`, `vmetal list`, `vmetal rm`: the model-management commands ollama users expect.

The work is `vmetal.hub`'s (`pull`, `remove`, the registry); these commands own the flags and what reaches the
terminal, through `vmetal.cli.pull.view` (messages, progress, the `--json` summary). Data (`--json`, the `list`
table) goes to stdout, everything else to stderr.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from vmetal.cli.output import say
from vmetal.cli.pull.view import TerminalView, human_ago, pull_json
from vmetal.errors import USAGE, VmetalError
from vmetal.hub.common import human_size

_SOURCE_HELP = ("Where to pull from: `huggingface` (`hf`, the default) or `modelscope`. "
                "Default: `modelscope` when VLLM_USE_MODELSCOPE is true.")

ModelArg = Annotated[str, typer.Argument(metavar="MODEL", show_default=False,
                                         help="Hub id (`org/name`) or a local model folder (checked, not copied).")]
SourceOption = Annotated[str | None, typer.Option("--source", help=_SOURCE_HELP, show_default=False)]
RevisionOption = Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit. Default: main "
                                                    "(master on ModelScope).", show_default=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")]


def pull(
    model: ModelArg,
    source: SourceOption = None,
    revision: RevisionOption = None,
    include: Annotated[list[str] | None, typer.Option(
        "--include", help="Also download files matching this pattern (repeatable), e.g. `'*.gguf'`; "
                          "by default only what serving needs.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Pull even when the fit check says it does not fit "
                                                        "or the repo has no safetensors weights.")] = False,
    max_model_len: Annotated[int | None, typer.Option(
        min=1, help="Context length for the fit check. Default: what `serve` would use.",
        show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no messages; errors only.")]
    = False,
    json_out: JsonOption = False,
) -> None:
    """Download MODEL for serving: config, tokenizer and safetensors weights, resumable and verified."""
    from vmetal import hub

    result = hub.pull(model, source=source, revision=revision, include=include or [], force=force,
                      max_model_len=max_model_len, view=TerminalView(quiet or json_out))
    if json_out:
        print(pull_json(result))



# ----------------------------------------------------------------------------------------- list / rm


def _status(m: Any) -> str:
    if not m.complete:
        return "incomplete"
    return "ok" if Path(m.path).is_dir() else "missing"


def list_models(json_out: JsonOption = False) -> None:
    """List the models pulled: size, source, revision, when pulled and last used."""
    from vmetal.hub import registry

    models = registry.pulled_models()
    if json_out:
        print(json.dumps([{**m.__dict__, "state": _status(m)} for m in models]))
        return
    if not models:
        say("no models pulled yet; `vmetal pull MODEL` fetches one")
        return
    # Plain aligned columns, as `ollama list`: the same on a terminal and in a pipe, never truncated.
    rows = [("MODEL", "SIZE", "SOURCE", "REVISION", "PULLED", "LAST USED", "STATUS")]
    now = time.time()
    for m in models:
        rev = m.revision if m.commit is None or m.revision == m.commit else f"{m.revision} ({m.commit[:7]})"
        rows.append((m.id, human_size(m.size), m.source, rev,
                     human_ago(m.pulled_at, now) if m.complete else "-", human_ago(m.last_used, now), _status(m)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())


def rm(
    model: Annotated[str, typer.Argument(metavar="MODEL", show_default=False, help="Hub id as pulled.")],
    revision: RevisionOption = None,
    source: SourceOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove a pulled model (its files in the hub cache and its entry in `vmetal list`)."""
    from vmetal import hub
    from vmetal.hub import registry
    from vmetal.hub.common import SOURCE_ALIASES

    src = SOURCE_ALIASES.get(source.lower()) if source else None
    if source and src is None:
        raise VmetalError(f"unknown source `{source}`: expected `huggingface` or `modelscope`", exit_code=USAGE)
    entries = registry.find(model, source=src, revision=revision)
    if not entries:
        if Path(model).expanduser().is_dir():
            raise VmetalError(f"`{model}` is a local folder vmetal did not pull; it is left alone",
                              exit_code=USAGE)
        raise VmetalError(f"`{model}` is not among the pulled models", hint="`vmetal list` shows them",
                          exit_code=USAGE)
    total = sum(e.size for e in entries)
    what = ", ".join(f"{e.id} @ {e.revision}" for e in entries)
    if not yes:
        if not sys.stdin.isatty() and sys.stdin is sys.__stdin__:
            raise VmetalError(f"not removing {what} without confirmation", hint="pass `--yes`",
                              exit_code=USAGE)
        if not typer.confirm(f"Remove {what} ({human_size(total)})?", default=False, err=True):
            say("nothing removed")
            raise typer.Exit(1)
    hub.remove(entries, view=TerminalView(quiet=False))
    say(f"removed {what} ({human_size(total)})")
