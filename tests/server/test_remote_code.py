"""`trust_remote_code` is off unless asked for: a model's own Python never runs by default, and `vmetal doctor`
says when `--trust-remote-code` is on (and which of the model's files would then run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vmetal.cli.app import app
from vmetal.cli.doctor.remote_code import check_remote_code, code_files
from vmetal.server.process import free_port

runner = CliRunner()


@pytest.fixture
def code_model(qwen3_model, tmp_path) -> tuple[Path, Path]:
    """The tiny qwen3 with `model_file` and `auto_map` naming Python files that leave a marker when run."""
    folder = tmp_path / "model"
    shutil.copytree(qwen3_model, folder)
    marker = tmp_path / "RAN"
    for name in ("evil_model.py", "evil_config.py"):
        (folder / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_file"] = "evil_model.py"
    cfg["auto_map"] = {"AutoConfig": "evil_config.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, marker


def make(status, summary, fix, **details):
    return {"status": status, "summary": summary, "fix": fix, **details}


def test_the_engine_loader_never_runs_model_code(code_model):
    from vmetal.engine.models import load

    folder, marker = code_model
    with pytest.raises(ValueError, match="trust_remote_code"):
        load(str(folder))
    assert not marker.exists()


def test_code_files_are_found(code_model):
    folder, _ = code_model
    assert code_files(folder) == ["evil_config.py", "evil_model.py"]


def test_off_by_default_and_said_when_on(code_model, qwen3_model):
    folder, _ = code_model
    off = check_remote_code(folder, [], make)
    assert off["status"] == "ok" and off["summary"].startswith("off") and "will not run" in off["summary"]
    on = check_remote_code(folder, ["--trust-remote-code"], make)
    assert on["status"] == "warn" and "evil_model.py" in on["summary"] and "--trust-remote-code" in on["fix"]
    assert check_remote_code(None, ["--max-num-seqs", "2"], make)["status"] == "ok"
    assert check_remote_code(qwen3_model, ["--trust-remote-code"], make)["status"] == "warn"


def test_doctor_cli_reports_it(code_model):
    folder, marker = code_model
    args = ["doctor", "--json", "--model", str(folder), "--port", str(free_port()), "--probe-timeout", "60"]
    r = runner.invoke(app, [*args, "--", "--trust-remote-code"])
    check = {c["id"]: c for c in json.loads(r.stdout)["checks"]}["remote_code"]
    assert check["status"] == "warn" and check["details"]["trust_remote_code"] is True
    assert check["details"]["code_files"] == ["evil_config.py", "evil_model.py"]
    assert not marker.exists()
