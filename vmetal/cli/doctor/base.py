"""What every `vmetal doctor` check returns (`Check`), the helpers that build it, and secret masking."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from vmetal.server import redact

GiB = 1024**3


@dataclass
class Check:
    id: str
    title: str
    status: str
    summary: str
    fix: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "status": self.status, "summary": self.summary,
                "fix": self.fix, "details": self.details, "elapsed_s": round(self.elapsed_s, 3)}


def _ok(id: str, title: str, summary: str, **details: Any) -> Check:
    return Check(id, title, "ok", summary, None, details)


def _warn(id: str, title: str, summary: str, fix: str, **details: Any) -> Check:
    return Check(id, title, "warn", summary, fix, details)


def _fail(id: str, title: str, summary: str, fix: str, **details: Any) -> Check:
    return Check(id, title, "fail", summary, fix, details)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def _pip(requirement: str) -> str:
    return f"`{sys.executable} -m pip install '{requirement}'`"


def dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# One implementation for doctor, error lines and the server's echoed log (vmetal.server.redact).
is_secret_name, secret_values, mask = redact.is_secret_name, redact.secret_values, redact.mask
_url_without_credentials = redact.url_without_credentials
