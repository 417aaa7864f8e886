"""The README's "Use in CI" recipe: the commands it lists, the GitHub Actions job it shows and the `ci-recipe` job
of .github/workflows/macos.yml are the same (as test_completions.py keeps the completions from drifting), and the
commands run here, on Linux, as a CI script runs them (install.sh aside: the venv of this test run stands in)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO
from vmetal.server.process import check_port_free, free_port

README = REPO / "README.md"
WORKFLOW = REPO / ".github" / "workflows" / "macos.yml"
JOB = "ci-recipe"
PORT = "8000"


def section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.DOTALL | re.MULTILINE)
    assert match, f"README has no `## {title}` section"
    return match.group(1)


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.DOTALL | re.MULTILINE)


def commands(script: str) -> list[str]:
    return [line.strip() for line in script.splitlines() if line.strip() and not line.strip().startswith("#")]


@pytest.fixture(scope="module")
def recipe() -> dict:
    yaml = pytest.importorskip("yaml")
    text = section(README.read_text(encoding="utf-8"), "Use in CI")
    [script] = blocks(text, "bash")
    [actions] = blocks(text, "yaml")
    return {"commands": commands(script), "job": yaml.safe_load(actions)["jobs"][JOB],
            "workflow_job": yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))["jobs"][JOB]}


def job_commands(job: dict) -> list[str]:
    return [line for step in job["steps"] for line in commands(str(step.get("run", "")))]


def test_the_readme_shows_the_workflow_job_as_it_is(recipe):
    assert recipe["job"] == recipe["workflow_job"], (
        f"README's GitHub Actions block and the `{JOB}` job of {WORKFLOW.name} differ: change both")


def test_the_job_runs_the_readme_commands_in_order(recipe):
    assert job_commands(recipe["workflow_job"]) == recipe["commands"]


def test_the_recipe_does_what_the_issue_asks(recipe):
    """install, serve --demo --detach, a request with curl and one with the openai client, bench online --json
    against that server, stop; doctor's JSON and the server's log kept as artifacts on every macOS runner."""
    lines = recipe["commands"]

    def index(prefix: str) -> int:
        hits = [i for i, line in enumerate(lines) if line.startswith(prefix)]
        assert len(hits) == 1, (prefix, lines)
        return hits[0]

    order = [index("./install.sh"), index("vmetal doctor --json"), index("vmetal serve --demo --detach"),
             index("curl "), index("python -c 'from openai import OpenAI"),
             index(f"vmetal bench online --url http://127.0.0.1:{PORT}/v1"), index("vmetal stop")]
    assert order == sorted(order)
    assert lines[index("vmetal bench online")].split(" > ")[0].endswith("--json")
    upload = [s for s in recipe["workflow_job"]["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact@")]
    assert len(upload) == 1 and upload[0]["if"] == "always()"
    kept = upload[0]["with"]["path"].split()
    assert "doctor.json" in kept and "~/.cache/vmetal/logs/" in kept
    assert {"macos-14", "macos-15"} <= set(recipe["workflow_job"]["strategy"]["matrix"]["os"])


@pytest.mark.slow
def test_the_recipe_runs_here(recipe, tmp_path, user_dirs):
    """Every command but install.sh, with this run's venv for ~/.venv-vllm-metal and a free port for 8000."""
    port = str(free_port())
    venv = str(Path(sys.executable).parent.parent)
    lines = [line.replace("$HOME/.venv-vllm-metal", venv).replace(f":{PORT}", f":{port}")
             .replace(f"--port {PORT}", f"--port {port}")
             for line in recipe["commands"] if not line.startswith("./install.sh")]
    assert not any(PORT in line for line in lines), lines
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-4000:]
    doctor = json.loads((tmp_path / "doctor.json").read_text())
    assert doctor["ok"] is True
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["concurrency"], r["completed"], r["failed"]) for r in bench["runs"]] == [(1, 8, 0), (4, 8, 0)]
    # curl's and the openai client's replies reached stdout; the URL printed by --detach too.
    assert f"http://127.0.0.1:{port}/v1\n" in done.stdout and '"object":"text_completion"' in done.stdout
    assert re.search(rf"vmetal: stopped `vmetal-demo` at http://127.0.0.1:{port}/v1 \(PID \d+\)", done.stderr)
    [log] = (user_dirs / ".cache" / "vmetal" / "logs").glob("serve-vmetal-demo-*.log")
    assert "serving vmetal-demo at" in log.read_text()
    check_port_free("127.0.0.1", int(port))
