"""What `vmetal pull`, `list` and `rm` show: a pull's messages and per-file progress (`TerminalView`, the
`vmetal.hub.PullView` of the CLI), ages, and the `--json` summary of a pull.

Progress follows `vmetal.hub.common.PullProgress`: bars with bytes, rate and ETA on a terminal (`RichProgress`),
one line per fetched file otherwise (`LineProgress`). Messages go to stderr, the `--json` summary to stdout.
rich is imported inside the functions: the CLI imports this module for `--help`.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from vmetal.cli.output import say, warn
from vmetal.hub.common import human_size


def human_ago(when: float | None, now: float | None = None) -> str:
    if not when:
        return "never"
    delta = max(0.0, (now or time.time()) - when)
    for size, unit in ((86400 * 7, "week"), (86400, "day"), (3600, "hour"), (60, "minute")):
        if delta >= size:
            count = int(delta // size)
            return f"{count} {unit}{'s' if count > 1 else ''} ago"
    return "just now"


# ----------------------------------------------------------------------------------------- progress


class RichProgress:
    """Per-file and total bars (bytes, rate, ETA) on stderr; only used when stderr is a terminal."""

    def __init__(self, model: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.console = Console(stderr=True, highlight=False)
        self.progress = Progress(
            TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(), console=self.console, transient=False)
        self.model = model
        self.total: Any = None
        self.tasks: dict[str, Any] = {}
        self.lock = threading.Lock()

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def plan(self, total: int, present: int) -> None:
        self.total = self.progress.add_task(f"{self.model} (total)", total=total, completed=present)

    def file_started(self, file: Any, done: int) -> None:
        with self.lock:
            task = self.tasks.get(file.path)
            if task is None:
                self.tasks[file.path] = self.progress.add_task(file.path, total=file.size, completed=done)
                return
            before = self.progress.tasks[task].completed if task < len(self.progress.tasks) else 0
            self.progress.update(task, completed=done)
            if self.total is not None:
                self.progress.advance(self.total, done - before)

    def advance(self, file: Any, n: int) -> None:
        task = self.tasks.get(file.path)
        if task is not None:
            self.progress.advance(task, n)
        if self.total is not None:
            self.progress.advance(self.total, n)

    def file_finished(self, file: Any) -> None:
        task = self.tasks.get(file.path)
        if task is not None:
            self.progress.update(task, completed=file.size)

    def note(self, message: str) -> None:
        self.progress.console.print(f"vmetal: {message}", markup=False, soft_wrap=True)


class LineProgress:
    """Not a terminal (or `--quiet`): no bars; notes as plain lines unless quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def plan(self, total: int, present: int) -> None: ...
    def file_started(self, file: Any, done: int) -> None: ...
    def advance(self, file: Any, n: int) -> None: ...

    def file_finished(self, file: Any) -> None:
        say(f"fetched {file.path} ({human_size(file.size)})", quiet=self.quiet)

    def note(self, message: str) -> None:
        say(message, quiet=self.quiet)


def progress_for(model: str, quiet: bool) -> Any:
    from rich.console import Console

    if not quiet and Console(stderr=True).is_terminal:
        return RichProgress(model)
    return LineProgress(quiet)


class TerminalView:
    """A pull's messages on stderr (none when `quiet`; warnings always) and its progress."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def say(self, message: str) -> None:
        say(message, quiet=self.quiet)

    def warn(self, message: str) -> None:
        warn(message)

    def progress(self, repo_id: str) -> Any:
        return progress_for(repo_id, self.quiet)


def pull_json(result: Any) -> str:
    """The `--json` summary of a pull (`vmetal.hub.PullResult`), the same from every hub; a local folder's
    has only what was checked."""
    fit = result.fit.as_dict() if result.fit else None
    entry, stats = result.entry, result.stats
    if entry is None:
        return json.dumps({"model": str(result.path), "source": "local", "path": str(result.path), "fit": fit})
    return json.dumps({
        "model": entry.id, "source": entry.source, "revision": entry.revision, "commit": entry.commit,
        **entry.extra, "path": entry.path, "files": [f.path for f in result.files], "size": entry.size,
        "downloaded": stats.downloaded, "resumed": stats.resumed_from, "refetched": stats.refetched,
        "reused": stats.reused, "fit": fit,
    })
