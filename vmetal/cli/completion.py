"""Shell completion: `vmetal completion SHELL`, and the scripts checked in under `completions/`.

The scripts are Typer's own (Click's shell-completion classes), generated from the app through Typer's
completion protocol: the app run with `_VMETAL_COMPLETE=source_<shell>` prints the script (Typer's order,
`source_bash`, not Click's `bash_source`), stripped as Typer's `--show-completion` prints it (zsh reads
`#compdef` only on a file's first line); the zsh one gets one line more, so that it also works from
$fpath on the first Tab (see ZSH_FPATH_SUFFIX).

They do not list the commands: on Tab the shell runs `vmetal` with `_VMETAL_COMPLETE=complete_<shell>`,
and the app answers from its current commands, options and choices. So a new command completes without
regenerating anything; the checked-in files change only when Typer's templates or the program name do, and
`tests/cli/test_completions.py` fails when they drift.

Typer registers its shell classes only while it builds an app that has `--install-completion`; vmetal's
apps do not (`make_app`), so this module registers them when a completion is asked for. It is imported by
`app.py` before the app runs, and imports nothing heavy: Tab runs the whole `vmetal` start-up, which must
stay free of mlx, torch and vllm.

Regenerate the checked-in files with `python -m vmetal.cli.completion --write` (`--check` to compare).
"""

from __future__ import annotations

import enum
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

PROG_NAME = "vmetal"
COMPLETE_VAR = "_VMETAL_COMPLETE"


class Shell(str, enum.Enum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


# The names each shell looks for (bash-completion: the command's name; zsh's fpath: `_` + the name).
FILE_NAMES = {Shell.bash: "vmetal.bash", Shell.zsh: "_vmetal", Shell.fish: "vmetal.fish"}

# Typer's zsh script defines `_vmetal_completion` and binds it with `compdef`, which is all that sourcing it
# needs. Installed as `_vmetal` on $fpath, zsh autoloads the file as the function `_vmetal` on the first Tab,
# and that first Tab would only do the binding; this line makes it complete too (when sourced, funcstack
# does not start with `_vmetal`, so it does nothing).
ZSH_FPATH_SUFFIX = """
# vmetal: autoloaded from $fpath as `_vmetal`, complete on the first Tab too, not only from the second on.
if [[ ${funcstack[1]-} == _vmetal ]]; then _vmetal_completion "$@"; fi
"""

_registered = False


def register_shells() -> None:
    """Register Typer's bash/zsh/fish completion classes, as building an app with `add_completion` does."""
    global _registered
    if _registered:
        return
    # Public API only: building any app that has add_completion=True registers them (process-wide).
    throwaway = typer.Typer(add_completion=True)
    throwaway.callback()(lambda: None)
    typer.main.get_command(throwaway)
    _registered = True


if os.environ.get(COMPLETE_VAR):
    register_shells()


def script(shell: Shell | str, app: typer.Typer) -> str:
    """The completion script for `shell`, generated from `app` as a shell would ask for it."""
    from typer.testing import CliRunner

    shell = Shell(shell)
    register_shells()
    result = CliRunner().invoke(app, [], env={COMPLETE_VAR: f"source_{shell.value}"}, prog_name=PROG_NAME)
    return _finish(shell, result.exit_code, result.stdout, result.output)


def script_of_installed(shell: Shell | str) -> str:
    """The completion script for `shell`, asked of `python -m vmetal.cli.app` exactly as a shell asks `vmetal`
    (for `--write`/`--check`, which therefore need no reference to the app: `app.py` imports this module)."""
    import subprocess

    shell = Shell(shell)
    env = {**os.environ, COMPLETE_VAR: f"source_{shell.value}"}
    # argv[0] is what the scripts name the program: Typer takes the name from it.
    code = f"import sys; sys.argv[0] = {PROG_NAME!r}; from vmetal.cli.app import main; main()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    return _finish(shell, done.returncode, done.stdout, done.stderr)


def _finish(shell: Shell, exit_code: int, stdout: str, output: str) -> str:
    text = stdout.strip()
    if exit_code != 0 or not text:
        raise RuntimeError(f"generating the {shell.value} completion failed (exit {exit_code}): {output.strip()}")
    text += "\n"
    if shell is Shell.zsh:
        text += ZSH_FPATH_SUFFIX
    return text


def checkout_completions_dir() -> Path:
    """`completions/` of the checkout this vmetal is imported from (editable installs)."""
    import vmetal

    return Path(vmetal.__file__).resolve().parent.parent / "completions"


def generate_all(app: typer.Typer | None = None) -> dict[str, str]:
    """File name -> content, for every shell: from `app`, or from the installed `vmetal` when None."""
    return {FILE_NAMES[shell]: script(shell, app) if app is not None else script_of_installed(shell)
            for shell in Shell}


def command_for(app: typer.Typer):  # noqa: ANN201 - a Typer command function
    """The `vmetal completion SHELL` command, printing `app`'s scripts (given by app.py, which mounts it)."""

    def completion(
        shell: Annotated[Shell, typer.Argument(metavar="SHELL", help="bash, zsh or fish.", show_default=False)],
    ) -> None:
        """Print the completion script for SHELL (bash, zsh or fish); see the README for installing it."""
        sys.stdout.write(script(shell, app))

    return completion


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vmetal.cli.completion",
                                     description="Regenerate (or check) the completion scripts in completions/.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="write the scripts")
    mode.add_argument("--check", action="store_true", help="exit 1 if a checked-in script differs")
    parser.add_argument("--dir", type=Path, default=None,
                        help="folder of the scripts (default: completions/ of this checkout)")
    args = parser.parse_args(argv)

    folder = args.dir or checkout_completions_dir()
    if args.write:
        folder.mkdir(parents=True, exist_ok=True)
    elif not folder.is_dir():
        print(f"error: no folder {folder}", file=sys.stderr)
        return 1
    stale = []
    for name, content in generate_all().items():
        path = folder / name
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current == content:
            continue
        stale.append(path)
        if args.write:
            path.write_text(content, encoding="utf-8")
            print(f"wrote {path}")
    if args.check:
        for path in stale:
            print(f"{path} differs from the app; run `python -m vmetal.cli.completion --write`", file=sys.stderr)
        return 1 if stale else 0
    if not stale:
        print(f"{folder}: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
