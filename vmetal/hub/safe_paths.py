"""What a hub (or a registry entry) may name inside the model cache, and nothing outside it.

A hub's file list, the commit it reports, a `--revision` and the paths `vmetal pull` recorded all end up
joined onto a cache folder. A name such as `../../.bashrc`, `/etc/passwd` or a commit of `../x` would
otherwise make a pull write, or `vmetal rm` delete, outside that folder. Hubs built on git never list such
names, so one is refused outright (a hub that sends one is broken or hostile), before any byte is written.

Deletions are also checked against what is on disk: a folder of the cache that is a symbolic link is never
followed, so `vmetal rm` cannot be steered outside the cache by a link planted in it.

Stdlib only: `vmetal.hub.common` imports this for every pull and `rm`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_SHA1 = re.compile(r"^[0-9a-fA-F]{40}$")


class UnsafePathError(ValueError):
    """A name that would reach outside the folder it is meant to stay in; `what` says whose name it is."""

    def __init__(self, message: str, *, what: str, name: str) -> None:
        super().__init__(message)
        self.what = what
        self.name = name


def _problem(name: str) -> str | None:
    if not name:
        return "it is empty"
    if "\0" in name or any(ord(c) < 32 for c in name):
        return "it holds control characters"
    if "\\" in name:
        return "it holds a backslash"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "it is an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "it climbs out with `..`"
    if "" in parts or "." in parts:
        return "it has an empty or `.` component"
    return None


def check_relative(name: str, what: str) -> str:
    """`name` as a safe path relative to some folder (components joined by `/`), or UnsafePathError."""
    problem = _problem(name)
    if problem:
        raise UnsafePathError(f"{what} `{name!s}` is not a safe relative path: {problem}", what=what, name=name)
    return name


def check_component(name: str, what: str) -> str:
    """`name` as one safe path component (no `/` at all)."""
    check_relative(name, what)
    if "/" in name:
        raise UnsafePathError(f"{what} `{name}` is not a single folder name", what=what, name=name)
    return name


def check_digest(value: str | None, kind: str, what: str) -> str | None:
    """A hub digest that is used as a file name: 64 hex digits for sha256, 40 for a git blob id."""
    if value is None or value == "":
        return None
    pattern = _SHA256 if kind == "sha256" else _SHA1
    if not pattern.fullmatch(value):
        raise UnsafePathError(f"{what} has a {kind} that is not {64 if kind == 'sha256' else 40} hex digits "
                              f"(`{value[:80]}`)", what=what, name=value)
    return value


def is_inside(root: Path, path: Path) -> bool:
    """`path`, with every symbolic link resolved, is `root` or below it (`root` resolved too)."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def linked_component(root: Path, path: Path) -> Path | None:
    """The first folder from `root` (excluded) down to `path` (included) that is a symbolic link, if any."""
    try:
        rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(root))
    except ValueError:
        return path
    current = Path(os.path.abspath(root))
    for part in rel.parts:
        current = current / part
        if current.is_symlink():
            return current
    return None
