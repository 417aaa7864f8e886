"""Shell completion: the checked-in scripts equal what the app generates, `vmetal completion SHELL` prints
them, and Tab really completes the app's commands in bash (and fish, zsh syntax where installed) without importing mlx,
torch or vllm. How fast a Tab answers is a benchmark (benchmarks/bench_cli.py), not a timed test: wall and CPU
time on a shared 2-core CI machine measure the neighbours as much as the code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tests.support import REPO
from vmetal.cli import completion
from vmetal.cli.app import app

COMPLETIONS = REPO / "completions"
SHELLS = ["bash", "zsh", "fish"]
HEAVY = ("mlx", "torch", "vllm", "transformers")

runner = CliRunner()


def vmetal_command() -> list[str]:
    """The console script next to this Python (what a shell runs on Tab), else the module."""
    script = Path(sys.executable).parent / "vmetal"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vmetal.cli.app"]


def command_names() -> list[str]:
    group = typer.main.get_command(app)
    return sorted(name for name, cmd in group.commands.items() if not cmd.hidden)  # type: ignore[attr-defined]


def shell_env(tmp_path: Path) -> dict[str, str]:
    """A shell environment whose PATH finds this venv's `vmetal` first, run from outside the checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("_VMETAL", "_TYPER"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(tmp_path)
    return env


# --- drift --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(completion.FILE_NAMES.values()))
def test_checked_in_scripts_match_the_app(name):
    generated = completion.generate_all(app)
    path = COMPLETIONS / name
    assert path.is_file(), f"{path} is missing; run `python -m vmetal.cli.completion --write`"
    assert path.read_text(encoding="utf-8") == generated[name], (
        f"{path} has drifted from the app; run `python -m vmetal.cli.completion --write`")


def test_no_stray_files_in_completions():
    assert sorted(p.name for p in COMPLETIONS.iterdir()) == sorted(completion.FILE_NAMES.values())


def test_write_then_check(tmp_path):
    """`--write`/`--check` ask the installed `vmetal` in a child process, as a shell does (no reference to
    the app object); what they write is what the app in this process generates."""
    assert completion.main(["--write", "--dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(completion.FILE_NAMES.values())
    assert completion.main(["--check", "--dir", str(tmp_path)]) == 0
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == completion.generate_all(app)
    (tmp_path / "vmetal.bash").write_text("# edited by hand\n")
    assert completion.main(["--check", "--dir", str(tmp_path)]) == 1
    assert completion.main(["--write", "--dir", str(tmp_path)]) == 0
    assert completion.main(["--check", "--dir", str(tmp_path)]) == 0


def test_scripts_name_the_program_and_its_variable():
    for shell in SHELLS:
        text = completion.script(shell, app)
        assert "_VMETAL_COMPLETE=complete_" + shell in text
        assert text.endswith("\n") and not text.startswith("\n")
    # zsh reads `#compdef` on the first line only (files on $fpath).
    assert completion.script("zsh", app).splitlines()[0] == "#compdef vmetal"


# --- `vmetal completion SHELL` ------------------------------------------------------------------


@pytest.mark.parametrize("shell", SHELLS)
def test_completion_command_prints_the_checked_in_script(shell):
    result = runner.invoke(app, ["completion", shell])
    assert result.exit_code == 0, result.output
    assert result.stdout == (COMPLETIONS / completion.FILE_NAMES[completion.Shell(shell)]).read_text()


@pytest.mark.parametrize("args", [["completion", "ksh"], ["completion"], ["completion", "bash", "zsh"]])
def test_completion_bad_usage_exits_2(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.stdout == ""


# --- Tab, for real -------------------------------------------------------------------------------


def bash_complete(words: list[str], env: dict[str, str]) -> list[str]:
    """What `_vmetal_completion` puts in COMPREPLY for the command line `words` (cursor on the last)."""
    script = (
        f"source {COMPLETIONS / 'vmetal.bash'}\n"
        'COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 ))\n'
        '_vmetal_completion vmetal\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    out = subprocess.run(["bash", "-c", script, "bash", *words], capture_output=True, text=True, env=env,
                         cwd=env["HOME"], timeout=60)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line]


@pytest.mark.skipif(not (Path(sys.executable).parent / "vmetal").is_file(), reason="no `vmetal` console script")
def test_bash_tab_completes_every_command_and_option(tmp_path):
    env = shell_env(tmp_path)
    assert sorted(bash_complete(["vmetal", ""], env)) == command_names()
    assert bash_complete(["vmetal", "unin"], env) == ["uninstall"]
    assert bash_complete(["vmetal", "completion", ""], env) == SHELLS
    assert bash_complete(["vmetal", "install", "--mlx-extra", ""], env) == ["cpu", "cuda13"]
    assert "--dry-run" in bash_complete(["vmetal", "uninstall", "--"], env)


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
@pytest.mark.skipif(not (Path(sys.executable).parent / "vmetal").is_file(), reason="no `vmetal` console script")
def test_fish_tab_completes_commands(tmp_path):
    env = shell_env(tmp_path)
    out = subprocess.run(["fish", "--no-config", "-c",
                          f"source {COMPLETIONS / 'vmetal.fish'}; complete -C 'vmetal '; complete -C 'vmetal unin'"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    offered = [line.split("\t")[0] for line in out.stdout.splitlines()]
    assert sorted(offered[:-1]) == command_names()
    assert offered[-1] == "uninstall"


@pytest.mark.parametrize("shell", SHELLS)
def test_scripts_parse_in_their_shell(shell):
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    path = COMPLETIONS / completion.FILE_NAMES[completion.Shell(shell)]
    out = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def complete_once(env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**env, "_VMETAL_COMPLETE": "complete_bash", "COMP_WORDS": "vmetal se", "COMP_CWORD": "1"}
    return subprocess.run(vmetal_command(), capture_output=True, text=True, env=env, cwd=env["HOME"], timeout=60)


def test_tab_imports_no_mlx_torch_or_vllm(tmp_path):
    out = complete_once({**shell_env(tmp_path), "PYTHONPROFILEIMPORTTIME": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["serve"]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines()
                if line.startswith("import time:")}
    assert "typer" in imported, "no import log: the check below would prove nothing"
    assert not imported & set(HEAVY), f"Tab imports {sorted(imported & set(HEAVY))}"
