"""`vmetal install`: create or bring up to date the managed venv by running this checkout's `install.sh`.

One implementation behind both: `install.sh` is the installer (it has to work before any venv exists,
under macOS's bash 3.2), and this command only finds it, passes the flags through, streams its output and
exits with its status. Idempotence, the lock, and the rollback of a failed step to the previous working
venv are all `install.sh`'s (see the comment at its top).

`install.sh` installs vmetal from the checkout it sits in, so it is looked up next to the `vmetal/` package:
an editable install (`./install.sh --dev`) has it there; a vmetal installed from a wheel has no checkout,
and the command says so instead of guessing.
"""

from __future__ import annotations

import enum
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Annotated, Any

import typer

from vmetal.errors import VmetalError
from vmetal.install.plan import DEFAULT_VENV_NAME, VENV_ENV

SCRIPT_NAME = "install.sh"

COMMAND_SETTINGS: dict[str, Any] = {
    "epilog": "Runs `install.sh` from the vmetal checkout this command belongs to; its exit status is this "
              "command's (0 done, 1 failed with the previous venv untouched, 2 bad usage).",
}


class MlxExtra(str, enum.Enum):
    cpu = "cpu"
    cuda13 = "cuda13"


def checkout_root() -> Path:
    """The folder above the imported `vmetal` package: the checkout, for an editable install."""
    import vmetal

    return Path(vmetal.__file__).resolve().parent.parent


def find_install_script(root: Path | None = None) -> Path:
    root = checkout_root() if root is None else root
    script = root / SCRIPT_NAME
    if script.is_file() and (root / "pyproject.toml").is_file() and (root / "vmetal" / "install" / "plan.py").is_file():
        return script
    raise VmetalError(
        f"`vmetal install` runs `install.sh` from a vmetal checkout, and this vmetal ({root / 'vmetal'}) "
        f"is not in one (no `{script}`)",
        hint="clone the vmetal repository and run `./install.sh` in it; its `--dev` install gives a `vmetal` "
             "whose `vmetal install` works")


def script_args(*, venv: Path | None, python: str | None, vllm_version: str | None, mlx_extra: str | None,
                torch_index: str | None, dev: bool, dry_run: bool) -> list[str]:
    """install.sh's arguments for these flags; only the flags given, so its defaults stay its own."""
    args: list[str] = []
    if venv is not None:
        # install.sh resolves a relative path against its working directory, which is ours; `~` is
        # expanded here because a shell did not see `--venv=~/x`.
        args += ["--venv", str(venv.expanduser())]
    if python is not None:
        args += ["--python", python]
    if vllm_version is not None:
        args += ["--vllm-version", vllm_version]
    if mlx_extra is not None:
        args += ["--mlx-extra", mlx_extra]
    if torch_index is not None:
        args += ["--torch-index", torch_index]
    if dev:
        args.append("--dev")
    if dry_run:
        args.append("--dry-run")
    return args


def _fileno(stream: IO[str]) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return None


def _pump(source: IO[bytes], sink: IO[str]) -> None:
    for line in iter(source.readline, b""):
        sink.write(line.decode("utf-8", errors="replace"))
        sink.flush()
    source.close()


def _exit_code(code: int) -> int:
    # A child killed by a signal reports -N; shells report that as 128+N.
    return 128 - code if code < 0 else code


def run_script(script: Path, args: list[str]) -> int:
    """Run `bash script args…` with our stdout/stderr; its exit status (128+N if killed by signal N).

    Where stdout and stderr are real files (a terminal, a pipe) the child writes to them directly, so it
    sees the terminal as a terminal; otherwise (inside `CliRunner`, say) its output is copied line by line.
    Ctrl-C reaches install.sh from the terminal, and it rolls back before exiting: this process waits for it
    and hands SIGTERM/SIGHUP on to it, so the rollback is never cut short. The handlers are in place before
    install.sh starts: a signal that arrives before it starts stops the install with nothing to undo, one
    that arrives while it starts is handed on once it has (install.sh ignores a repeat during its rollback).
    """
    bash = shutil.which("bash")
    if bash is None:
        raise VmetalError("`bash` not found on PATH; `install.sh` needs it")
    cmd = [bash, str(script), *args]
    out, err = _fileno(sys.stdout), _fileno(sys.stderr)
    direct = out is not None and err is not None
    sys.stdout.flush()
    sys.stderr.flush()

    started: list[subprocess.Popen] = []  # the child, once it exists
    early: list[int] = []  # signals that came before the child was known

    def on_signal(signum: int, frame: object) -> None:
        if not started:
            early.append(signum)
        elif signum != signal.SIGINT and started[0].poll() is None:
            started[0].send_signal(signum)
        # SIGINT: a terminal's Ctrl-C reaches install.sh too (our process group); it rolls back, we wait.

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        # A Python handler, not SIG_IGN: the child must not inherit an ignored SIGINT (bash could not trap it),
        # and exec resets handlers to the default.
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        if early:
            return 128 + early[0]  # stopped before install.sh ran: nothing to roll back
        try:
            started.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                            stdout=out if direct else subprocess.PIPE,
                                            stderr=err if direct else subprocess.PIPE))
        except OSError as exc:
            raise VmetalError(f"cannot run `{script}`: {exc}") from None
        child = started[0]
        if early:
            child.send_signal(early[0])
        pumps = []
        if not direct:
            assert child.stdout is not None and child.stderr is not None
            pumps = [threading.Thread(target=_pump, args=(child.stdout, sys.stdout), daemon=True),
                     threading.Thread(target=_pump, args=(child.stderr, sys.stderr), daemon=True)]
            for pump in pumps:
                pump.start()
        code = child.wait()
        for pump in pumps:
            pump.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return _exit_code(code)


def install(
    venv: Annotated[Path | None, typer.Option(
        "--venv", metavar="PATH", show_default=False,
        help=f"Where the venv goes. Default: ${VENV_ENV}, else ~/{DEFAULT_VENV_NAME}.")] = None,
    python: Annotated[str | None, typer.Option(
        "--python", metavar="PATH", show_default=False,
        help="Interpreter for a new venv. Default: python3.12 on macOS; on Linux python3 if >= 3.11, "
             "else the newest python3.1x found.")] = None,
    vllm_version: Annotated[str | None, typer.Option(
        "--vllm-version", metavar="V", show_default=False,
        help="vLLM release. Default: the tested pin (vmetal/install/plan.py).")] = None,
    mlx_extra: Annotated[MlxExtra | None, typer.Option(
        "--mlx-extra", show_default=False,
        help="Linux only: MLX's `cpu` build (default), or `cuda13` on an NVIDIA host.")] = None,
    torch_index: Annotated[str | None, typer.Option(
        "--torch-index", metavar="URL", show_default=False,
        help="Linux only: where the +cpu torch comes from. Default: PyTorch's CPU index when reachable; "
             "`none` to rely on pip's own configuration.")] = None,
    dev: Annotated[bool, typer.Option("--dev", help="Editable install of the checkout, with the test "
                                                    "extras.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print each step and change nothing.")] = False,
) -> None:
    """Create the vmetal venv (vLLM, MLX, mlx-lm, vmetal), or bring it up to date.

    Safe to re-run: a venv that is already right only gets vmetal reinstalled. A failed step leaves the previous venv working, or none at all.
    """  # noqa: E501 - Typer keeps a docstring's line breaks in --help
    script = find_install_script()
    args = script_args(venv=venv, python=python, vllm_version=vllm_version,
                       mlx_extra=mlx_extra.value if mlx_extra else None, torch_index=torch_index,
                       dev=dev, dry_run=dry_run)
    raise typer.Exit(run_script(script, args))
