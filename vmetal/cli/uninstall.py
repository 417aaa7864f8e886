"""`vmetal uninstall`: delete what vmetal created, and nothing else.

What counts as vmetal's, and how each is recognised:

* the venv: created by `install.sh`, which leaves `.vmetal-venv` in it when done (or
  `.vmetal-install-in-progress` while it builds); a venv without either is refused, whatever its name;
* what `install.sh` may leave beside it: `PATH.old` (a previous venv it set aside, with its marker) and a
  stale `PATH.install-lock`; a live lock means an install is running, and the uninstall is refused;
* with `--models`: the models `vmetal pull` recorded (`vmetal.hub.registry.pulled_models()`, when that module
  exists), each removed as `vmetal rm` removes it (its snapshot in the hub cache, and the blobs no other
  snapshot uses), and the demo model (`vmetal.demo.default_demo_dir()`).

The whole plan is checked before anything is deleted, so a refusal deletes nothing. A folder is first
renamed to `PATH.vmetal-deleting` (atomic), then removed, its ownership marker last: an interrupted
uninstall leaves the venv either intact at its path or gone from it, and a later run finishes the job.
The venv goes last, since this command may be running from it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from vmetal.cli.output import say, warn
from vmetal.errors import VmetalError
from vmetal.install.plan import DEFAULT_VENV_NAME, IN_PROGRESS_NAME, MARKER_NAME, VENV_ENV, default_venv
from vmetal.install.venv_checks import read_marker

DELETING_SUFFIX = ".vmetal-deleting"
OLD_SUFFIX = ".old"  # install.sh's set-aside venv during a rebuild
LOCK_SUFFIX = ".install-lock"  # install.sh's lock directory (holds a `pid` file)
PROOF_FILES = (MARKER_NAME, IN_PROGRESS_NAME)

COMMAND_SETTINGS: dict[str, Any] = {
    "epilog": "Deletes only what vmetal created: a venv without install.sh's `.vmetal-venv` marker is refused.",
}


@dataclass(frozen=True)
class Target:
    path: Path
    what: str  # for the list the user confirms
    size: int | None = None
    entry: Any = None  # a `vmetal.hub.registry` entry: removed the way `vmetal rm` removes it


def _is_ours(venv: Path) -> bool:
    """A folder install.sh made: its finished marker (readable JSON), or its in-progress file."""
    return read_marker(str(venv / MARKER_NAME)) is not None or (venv / IN_PROGRESS_NAME).is_file()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _too_wide(path: Path) -> bool:
    """`/`, the home folder or one above it: never deleted, marker or not."""
    home = Path.home().resolve()
    real = path.resolve()
    return real == Path(real.anchor) or real == home or real in home.parents


def du(path: Path) -> int:
    """Bytes in `path` (apparent sizes, links not followed)."""
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files + dirs:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def human(size: int | None) -> str:
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _leftover(path: Path) -> Path:
    return path.with_name(path.name + DELETING_SUFFIX)


def _leftover_target(path: Path, proof_needed: bool) -> Target | None:
    """What an interrupted uninstall of `path` left (`path.vmetal-deleting`), if we may finish it."""
    left = _leftover(path)
    if not (left.exists() or left.is_symlink()):
        return None
    if left.is_dir() and not left.is_symlink():
        # Proof files go last, so a leftover still holding anything else still holds its proof.
        if not proof_needed or _is_ours(left) or not any(left.iterdir()):
            return Target(left, "left by an interrupted `vmetal uninstall`")
    elif not proof_needed:
        return Target(left, "left by an interrupted `vmetal uninstall`")
    warn(f"leaving `{left}` alone: it is not recognisably vmetal's")
    return None


def venv_targets(venv: Path) -> list[Target]:
    """The venv and what install.sh left beside it; VmetalError if any of it is not vmetal's to delete."""
    targets: list[Target] = []
    lock = venv.with_name(venv.name + LOCK_SUFFIX)
    if lock.is_dir():
        try:
            pid = int((lock / "pid").read_text().strip())
        except (OSError, ValueError):
            pid = None
        if pid is not None and _pid_alive(pid):
            raise VmetalError(f"`install.sh` (pid {pid}) is working on `{venv}`",
                              hint="wait for it to finish, then run `vmetal uninstall` again")
        if {p.name for p in lock.iterdir()} <= {"pid"}:
            targets.append(Target(lock, "a stale lock of `install.sh`"))

    left = _leftover_target(venv, proof_needed=True)
    if left:
        targets.append(left)

    if venv.is_symlink():
        raise VmetalError(f"`{venv}` is a symbolic link, and vmetal never makes one; it deletes neither the "
                          "link nor what it points to", hint="delete the link yourself if you want it gone")
    if venv.exists():
        if not venv.is_dir():
            raise VmetalError(f"`{venv}` is a file, not a venv made by vmetal; refusing to delete it")
        if _too_wide(venv):
            raise VmetalError(f"refusing to delete `{venv}`: it is / or your home folder (or above it)")
        # install.sh marks a new venv unfinished before `python -m venv` writes anything, so a build killed
        # that early has no pyvenv.cfg yet and is still install.sh's own.
        if not (venv / "pyvenv.cfg").is_file() and not (venv / IN_PROGRESS_NAME).is_file():
            raise VmetalError(f"`{venv}` is not a venv (no `pyvenv.cfg` in it); refusing to delete it",
                              hint="pass the venv vmetal made with `--venv PATH`")
        if not _is_ours(venv):
            raise VmetalError(
                f"`{venv}` was not created by vmetal (no `{MARKER_NAME}` marker in it); refusing to delete it",
                hint="vmetal deletes only the venvs that `install.sh` created; remove this one yourself if you "
                     f"are sure, or pass the one vmetal made with `--venv PATH` (default: ${VENV_ENV}, "
                     f"else ~/{DEFAULT_VENV_NAME})")
        marker = read_marker(str(venv / MARKER_NAME)) or {}
        when = str(marker.get("created_at") or "")[:10]
        made = f"created by {marker.get('created_by') or 'install.sh'}" + (f" on {when}" if when else "")
        if marker.get("vllm_version"):
            made += f", vLLM {marker['vllm_version']}"
        if not marker:
            made = "an unfinished build of install.sh"
        targets.append(Target(venv, f"the vmetal venv ({made})"))

    old = venv.with_name(venv.name + OLD_SUFFIX)
    left = _leftover_target(old, proof_needed=True)
    if left:
        targets.append(left)
    if old.is_dir() and not old.is_symlink():
        if (old / "pyvenv.cfg").is_file() and _is_ours(old):
            targets.append(Target(old, "the previous venv, set aside by an interrupted `install.sh`"))
        else:
            warn(f"leaving `{old}` alone: it has no `{MARKER_NAME}` marker")
    return targets


def _pulled_models() -> list[Any]:
    """What `vmetal pull` recorded; none while there is no `vmetal.hub.registry` (or no `pulled_models`)."""
    try:
        registry = importlib.import_module("vmetal.hub.registry")
    except ModuleNotFoundError as exc:
        if exc.name == "vmetal.hub.registry":
            return []
        raise
    pulled = getattr(registry, "pulled_models", None)
    return [] if pulled is None else list(pulled())


def _entry_target(entry: Any) -> Target:
    """A registry entry (`id`, `revision`, `source`, `path`, `size`), or a bare path."""
    if isinstance(entry, (str, os.PathLike)):
        return Target(Path(os.path.abspath(Path(entry).expanduser())), "a model pulled by `vmetal pull`")
    path = Path(os.path.abspath(Path(entry.path).expanduser()))
    status = "" if getattr(entry, "status", "complete") == "complete" else f", {entry.status}"
    return Target(path, f"`{entry.id}` @ {entry.revision} from {entry.source}{status}, as `vmetal rm` removes it",
                  size=getattr(entry, "size", None), entry=entry)


def model_targets(pulled: Iterable[Any], demo: Path | None) -> list[Target]:
    targets: list[Target] = []
    seen: set[Path] = set()
    wanted = [_entry_target(e) for e in pulled]
    if demo is not None:
        wanted.append(Target(Path(os.path.abspath(demo)), "the demo model"))
    for target in wanted:
        if target.entry is None:
            if target.path in seen:
                continue
            seen.add(target.path)
            left = _leftover_target(target.path, proof_needed=False)
            if left:
                targets.append(left)
            if not (target.path.exists() or target.path.is_symlink()):
                continue
        if _too_wide(target.path):
            raise VmetalError(f"refusing to delete `{target.path}` ({target.what}): it is / or your home folder "
                              "(or above it)", hint="the registry of pulled models looks wrong; report this")
        targets.append(target)
    return targets


def _remove_pulled(entry: Any) -> None:
    # One implementation of "remove a pulled model", `vmetal rm`'s (shared blobs, the registry entry).
    from vmetal import hub
    from vmetal.cli.pull.view import TerminalView
    from vmetal.hub.common import human_size

    hub.remove([entry], view=TerminalView(quiet=False))
    say(f"removed {entry.id} @ {entry.revision} ({human_size(entry.size)})")


def _remove_tree_proof_last(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    for child in path.iterdir():
        if child.name in PROOF_FILES:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    for name in PROOF_FILES:
        with contextlib.suppress(FileNotFoundError):
            (path / name).unlink()
    path.rmdir()


def remove(path: Path) -> None:
    """Rename `path` out of the way (atomic), then delete it; its ownership marker goes last."""
    if path.name.endswith(DELETING_SUFFIX):
        doomed = path
    else:
        doomed = _leftover(path)
        os.rename(path, doomed)
    _remove_tree_proof_last(doomed)


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def _running_from(venv: Path) -> bool:
    try:
        return Path(sys.prefix).resolve() == venv.resolve()
    except OSError:
        return False


def uninstall(
    venv: Annotated[Path | None, typer.Option(
        "--venv", metavar="PATH", show_default=False,
        help=f"The venv to delete. Default: ${VENV_ENV}, else ~/{DEFAULT_VENV_NAME}.")] = None,
    models: Annotated[bool, typer.Option("--models", help="Also delete the models vmetal pulled and the "
                                                          "demo model.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask; for scripts.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be deleted and stop.")] = False,
) -> None:
    """Delete the vmetal venv (and with --models, the models vmetal pulled), after listing them."""
    venv = Path(os.path.abspath((venv or default_venv()).expanduser()))
    # In the order they go: the venv (and what install.sh left beside it) last, as this command may be
    # running from it.
    targets = venv_targets(venv)
    if models:
        from vmetal.demo import default_demo_dir

        targets = model_targets(_pulled_models(), default_demo_dir()) + targets

    if not targets:
        typer.echo(f"vmetal uninstall: nothing to delete (no vmetal venv at {venv}"
                   + (", no models)" if models else ")"), err=True)
        return

    sized = [t if t.size is not None else Target(t.path, t.what, du(t.path), t.entry) for t in targets]
    total = sum(t.size or 0 for t in sized)
    verb = "would delete" if dry_run else "will delete"
    typer.echo(f"vmetal uninstall {verb} {len(sized)} path{'s' if len(sized) > 1 else ''} "
               f"({human(total)}):", err=True)
    width = max(len(str(t.path)) for t in sized)
    for t in sized:
        typer.echo(f"  {str(t.path):<{width}}  {human(t.size):>8}  {t.what}")
    self_venv = venv.exists() and _running_from(venv)
    if self_venv:
        typer.echo(f"note: `vmetal` is running from {venv}; it finishes this command, and then the `vmetal` "
                   "command is gone with the venv", err=True)

    if dry_run:
        typer.echo("dry run: nothing was deleted", err=True)
        return
    if not yes:
        if not _stdin_is_tty():
            raise VmetalError("not deleting without a confirmation, and standard input is not a terminal to "
                              "ask on", hint="pass `--yes` to delete the paths listed above")
        if not typer.confirm("Delete these?", default=False, err=True):
            typer.echo("nothing was deleted", err=True)
            raise typer.Exit(1)

    if self_venv:
        # Whatever reports an error after the venv is gone must already be imported.
        import rich.console
        import rich.text  # noqa: F401

    for t in sized:
        if t.entry is not None:
            _remove_pulled(t.entry)  # says what it removed
            continue
        try:
            remove(t.path)
        except OSError as exc:
            raise VmetalError(f"could not delete `{t.path}`: {exc}",
                              hint="fix the cause and run `vmetal uninstall` again: it finishes what was "
                                   "left") from None
        typer.echo(f"deleted {t.path}", err=True)
    if models:
        from vmetal.demo import default_demo_dir

        with contextlib.suppress(OSError):  # the `demo` folder vmetal made, if now empty
            default_demo_dir().parent.rmdir()
