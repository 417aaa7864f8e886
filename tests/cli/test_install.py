"""`vmetal install` (a front for install.sh) and `vmetal uninstall` (deletes only what vmetal created).

Nothing gets installed: `install` runs install.sh with `--dry-run`, or a stand-in script. `uninstall` works
on real venvs (`python -m venv`, marked the way install.sh marks them) under a temporary HOME.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.support import REPO
from vmetal.cli import install as install_cmd
from vmetal.cli import uninstall as uninstall_cmd
from vmetal.cli.app import app
from vmetal.install.plan import IN_PROGRESS_NAME, MARKER_NAME

PLAN_PY = REPO / "vmetal" / "install" / "plan.py"

runner = CliRunner()


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """A HOME of its own, and none of the variables that would point vmetal elsewhere."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("VMETAL_VENV", "VMETAL_HOME", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hf-cache"))
    return home


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# --- vmetal install ------------------------------------------------------------------------------


def test_install_help_lists_flags():
    result = runner.invoke(app, ["install", "--help"])
    assert result.exit_code == 0
    for flag in ("--venv", "--python", "--vllm-version", "--mlx-extra", "--torch-index", "--dev", "--dry-run"):
        assert flag in result.stdout


def test_flags_map_to_install_sh_options(tmp_path):
    assert install_cmd.script_args(venv=None, python=None, vllm_version=None, mlx_extra=None, torch_index=None,
                                   dev=False, dry_run=False) == []
    assert install_cmd.script_args(venv=Path("~/v"), python="/usr/bin/python3.12", vllm_version="0.31.0",
                                   mlx_extra="cuda13", torch_index="none", dev=True, dry_run=True) == [
        "--venv", str(Path.home() / "v"), "--python", "/usr/bin/python3.12", "--vllm-version", "0.31.0",
        "--mlx-extra", "cuda13", "--torch-index", "none", "--dev", "--dry-run"]


def test_install_finds_install_sh_of_this_checkout():
    assert install_cmd.find_install_script() == REPO / "install.sh"


def test_dry_run_prints_every_step_and_creates_nothing(tmp_path):
    venv = tmp_path / "venv"
    before = tree(tmp_path)
    result = runner.invoke(app, ["install", "--dry-run", "--dev", "--venv", str(venv), "--torch-index", "none"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"venv:   {venv}" in out
    assert "==> [1] creating a venv" in out
    for needle in ("-m venv", "pip install --upgrade pip", "install --editable", "--write-marker"):
        assert needle in out, needle
    assert "dry run: nothing was changed (mode: fresh)" in out
    assert tree(tmp_path) == before, "a dry run must not create anything"
    assert not venv.exists()


def test_options_reach_install_sh(tmp_path):
    result = runner.invoke(app, ["install", "--dry-run", "--venv", str(tmp_path / "v"), "--vllm-version",
                                 "0.31.0", "--torch-index", "none"])
    assert result.exit_code == 0, result.output
    assert "0.31.0" in result.stdout


def test_dry_run_streams_straight_through_a_real_process(tmp_path):
    # Outside CliRunner stdout/stderr are real files: install.sh writes to them directly.
    env = {**os.environ, "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "vmetal.cli.app", "install", "--dry-run", "--venv",
                          str(tmp_path / "v"), "--torch-index", "none"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "==> [1] creating a venv" in out.stdout and "dry run: nothing was changed" in out.stdout
    assert not (tmp_path / "v").exists()


def test_usage_error_of_install_sh_is_mirrored():
    result = runner.invoke(app, ["install", "--dry-run", "--vllm-version", "latest"])
    assert result.exit_code == 2
    assert "--vllm-version must be a release number" in result.stderr


def test_bad_mlx_extra_is_a_usage_error():
    result = runner.invoke(app, ["install", "--mlx-extra", "cuda99"])
    assert result.exit_code == 2


@pytest.mark.parametrize(("body", "code"), [("exit 0", 0), ("exit 7", 7), ("kill -TERM $$", 128 + 15)])
def test_exit_status_is_install_sh_s(tmp_path, monkeypatch, body, code):
    script = tmp_path / "install.sh"
    script.write_text(f'echo "to stdout $*"\necho "to stderr" >&2\n{body}\n')
    monkeypatch.setattr(install_cmd, "find_install_script", lambda: script)
    result = runner.invoke(app, ["install", "--dev"])
    assert result.exit_code == code
    assert result.stdout == "to stdout --dev\n"
    assert result.stderr == "to stderr\n"


def test_without_a_checkout_it_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(install_cmd, "checkout_root", lambda: tmp_path)
    result = runner.invoke(app, ["install", "--dry-run"])
    assert result.exit_code == 1
    assert "error: `vmetal install` runs `install.sh` from a vmetal checkout" in result.stderr
    assert "hint:" in result.stderr


# --- vmetal uninstall: helpers ---------------------------------------------------------------------


def make_venv(path: Path, *, marked: bool = True) -> Path:
    """A real venv; marked by vmetal/install/plan.py run with the venv's Python, as install.sh does."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    (path / "lib" / "junk.txt").write_text("x" * 1000)
    if marked:
        subprocess.run([str(path / "bin" / "python"), str(PLAN_PY), "--write-marker", str(path / MARKER_NAME),
                        "--source", str(REPO), "--editable"], check=True, cwd="/", timeout=120)
    return path


@pytest.fixture(scope="module")
def venv_template(tmp_path_factory) -> Path:
    """One real venv, copied per test: `python -m venv` takes seconds on a busy 2-core machine."""
    return make_venv(tmp_path_factory.mktemp("template") / "venv")


def copy_venv(template: Path, dest: Path) -> Path:
    subprocess.run(["cp", "-a", str(template), str(dest)], check=True)
    return dest


def uninstall(*args: str, input: str | None = None):
    return runner.invoke(app, ["uninstall", *args], input=input)


# --- vmetal uninstall --------------------------------------------------------------------------------


def test_marker_is_what_install_sh_writes(venv_template):
    marker = json.loads((venv_template / MARKER_NAME).read_text())
    assert marker["created_by"] == "install.sh" and marker["format"] == 1


def test_yes_deletes_the_default_venv(home, venv_template):
    venv = copy_venv(venv_template, home / ".venv-vllm-metal")
    result = uninstall("--yes")
    assert result.exit_code == 0, result.output
    assert str(venv) in result.stdout
    assert f"deleted {venv}" in result.stderr
    assert not venv.exists()
    assert sorted(p.name for p in home.iterdir()) == [], "nothing may be left beside it"


def test_venv_flag_and_environment_variable(home, tmp_path, venv_template, monkeypatch):
    a = copy_venv(venv_template, tmp_path / "a")
    b = copy_venv(venv_template, tmp_path / "b")
    monkeypatch.setenv("VMETAL_VENV", str(a))
    assert uninstall("--yes", "--venv", str(b)).exit_code == 0
    assert a.exists() and not b.exists()
    assert uninstall("--yes").exit_code == 0
    assert not a.exists()


def test_refuses_a_venv_vmetal_did_not_create(home, tmp_path):
    venv = make_venv(tmp_path / "theirs", marked=False)
    before = tree(venv)
    result = uninstall("--yes", "--venv", str(venv))
    assert result.exit_code == 1
    assert "was not created by vmetal" in result.stderr and MARKER_NAME in result.stderr
    assert tree(venv) == before


def test_refuses_a_folder_that_is_not_a_venv_even_with_a_marker(home, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / MARKER_NAME).write_text(json.dumps({"format": 1, "created_by": "install.sh"}))
    result = uninstall("--yes", "--venv", str(folder))
    assert result.exit_code == 1
    assert "is not a venv" in result.stderr
    assert folder.exists() and (folder / MARKER_NAME).exists()


def test_refuses_home_even_marked(home):
    (home / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (home / MARKER_NAME).write_text(json.dumps({"format": 1}))
    result = uninstall("--yes", "--venv", str(home))
    assert result.exit_code == 1
    assert home.exists() and (home / "pyvenv.cfg").exists()


def test_refuses_a_symlink(home, tmp_path, venv_template):
    real = copy_venv(venv_template, tmp_path / "real")
    link = home / ".venv-vllm-metal"
    link.symlink_to(real)
    result = uninstall("--yes")
    assert result.exit_code == 1
    assert "symbolic link" in result.stderr
    assert link.is_symlink() and (real / MARKER_NAME).exists()


def test_non_tty_without_yes_refuses(home, venv_template):
    venv = copy_venv(venv_template, home / ".venv-vllm-metal")
    result = uninstall()  # CliRunner's stdin is not a terminal
    assert result.exit_code == 1
    assert "--yes" in result.stderr
    assert str(venv) in result.stdout, "it still lists what it would delete"
    assert (venv / MARKER_NAME).exists()


@pytest.mark.parametrize(("answer", "code", "gone"), [("y\n", 0, True), ("n\n", 1, False), ("\n", 1, False)])
def test_asks_on_a_terminal(home, venv_template, monkeypatch, answer, code, gone):
    venv = copy_venv(venv_template, home / ".venv-vllm-metal")
    monkeypatch.setattr(uninstall_cmd, "_stdin_is_tty", lambda: True)
    result = uninstall(input=answer)
    assert result.exit_code == code, result.output
    assert "Delete these?" in result.stderr
    assert venv.exists() is not gone


def test_dry_run_lists_and_deletes_nothing(home, venv_template):
    venv = copy_venv(venv_template, home / ".venv-vllm-metal")
    before = tree(home)
    result = uninstall("--dry-run", "--models")
    assert result.exit_code == 0, result.output
    assert str(venv) in result.stdout
    assert "would delete 1 path" in result.stderr and "dry run: nothing was deleted" in result.stderr
    assert tree(home) == before


def test_nothing_to_delete(home):
    result = uninstall("--yes", "--models")
    assert result.exit_code == 0
    assert "nothing to delete" in result.stderr


def test_models_deletes_the_demo_model_and_pulled_paths(home, tmp_path, venv_template, monkeypatch):
    from vmetal.demo import default_demo_dir

    venv = copy_venv(venv_template, home / ".venv-vllm-metal")
    demo = default_demo_dir()
    demo.mkdir(parents=True)
    (demo / "config.json").write_text("{}")
    pulled = tmp_path / "pulled-model"
    pulled.mkdir()
    (pulled / "model.safetensors").write_bytes(b"0" * 2048)
    monkeypatch.setattr(uninstall_cmd, "_pulled_models", lambda: [str(pulled)])

    without = uninstall("--dry-run")
    assert str(demo) not in without.stdout, "models go only with --models"
    result = uninstall("--yes", "--models")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [str(pulled), str(demo), str(venv)], "the venv goes last"
    assert not demo.exists() and not pulled.exists() and not venv.exists()
    assert not demo.parent.exists(), "the `demo` folder vmetal made goes too once empty"


def test_models_from_the_registry_go_the_way_vmetal_rm_removes_them(home, monkeypatch):
    registry = pytest.importorskip("vmetal.hub.registry")
    pytest.importorskip("vmetal.hub.huggingface_store")
    commit = "a" * 40
    storage = home / "hf-cache" / "models--org--tiny"
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir()
    (storage / "blobs" / "abc").write_text("{}")
    (snapshot / "config.json").symlink_to(storage / "blobs" / "abc")
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    registry.upsert(registry.PulledModel(id="org/tiny", source="huggingface", revision="main", path=str(snapshot),
                                         commit=commit, size=2, files=1, status=registry.COMPLETE))
    unrelated = home / "hf-cache" / "models--someone--else"
    unrelated.mkdir()

    listed = uninstall("--dry-run", "--models")
    assert listed.exit_code == 0, listed.output
    assert str(snapshot) in listed.stdout and "org/tiny" in listed.stdout
    result = uninstall("--yes", "--models")
    assert result.exit_code == 0, result.output
    assert not storage.exists()
    assert registry.pulled_models() == []
    assert unrelated.exists()


def test_no_registry_means_no_pulled_models(monkeypatch):
    real_import = uninstall_cmd.importlib.import_module

    def no_registry(name, *args):
        if name == "vmetal.hub.registry":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args)

    monkeypatch.setattr(uninstall_cmd.importlib, "import_module", no_registry)
    assert uninstall_cmd._pulled_models() == []


def test_an_interrupted_uninstall_leaves_the_venv_gone_and_the_next_one_finishes(home, venv_template, monkeypatch):
    venv = copy_venv(venv_template, home / ".venv-vllm-metal")
    real_rmtree = uninstall_cmd.shutil.rmtree
    calls = []

    def dies_midway(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("simulated: disk went away")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(uninstall_cmd.shutil, "rmtree", dies_midway)
    first = uninstall("--yes")
    assert first.exit_code == 1
    leftover = home / ".venv-vllm-metal.vmetal-deleting"
    assert not venv.exists(), "the venv is gone from its path, not half there"
    assert (leftover / MARKER_NAME).is_file(), "the proof that it is vmetal's goes last"

    monkeypatch.setattr(uninstall_cmd.shutil, "rmtree", real_rmtree)
    second = uninstall("--yes")
    assert second.exit_code == 0, second.output
    assert "interrupted" in second.stdout
    assert not leftover.exists()


def test_install_sh_leftovers_go_too_and_a_running_install_stops_it(home, venv_template):
    venv = copy_venv(venv_template, home / ".venv-vllm-metal")
    old = copy_venv(venv_template, home / ".venv-vllm-metal.old")
    lock = home / ".venv-vllm-metal.install-lock"
    lock.mkdir()
    (lock / "pid").write_text(str(os.getpid()))  # alive: an install is running
    result = uninstall("--yes")
    assert result.exit_code == 1
    assert f"(pid {os.getpid()})" in result.stderr
    assert venv.exists() and old.exists()

    (lock / "pid").write_text("999999999")  # stale
    result = uninstall("--yes")
    assert result.exit_code == 0, result.output
    assert not venv.exists() and not old.exists() and not lock.exists()


def test_an_unfinished_build_of_install_sh_counts_as_vmetal_s(home, venv_template):
    venv = copy_venv(venv_template, home / ".venv-vllm-metal")
    (venv / MARKER_NAME).unlink()
    (venv / IN_PROGRESS_NAME).write_text("pid 1\n")
    result = uninstall("--yes")
    assert result.exit_code == 0, result.output
    assert "unfinished" in result.stdout
    assert not venv.exists()


def test_deletes_the_venv_it_runs_from_and_says_so(home, venv_template):
    venv = copy_venv(venv_template, home / ".venv-vllm-metal")
    # The venv's own Python, finding vmetal and its dependencies where this test's Python finds them.
    # (An editable install may find vmetal through an import hook that a bare PYTHONPATH does not
    # replay, so the package's own folder goes first.)
    import vmetal

    roots = [str(Path(vmetal.__file__).resolve().parents[1])] + [p for p in sys.path if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(roots)}
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "vmetal.cli.app", "uninstall", "--yes"],
                         capture_output=True, text=True, env=env, cwd=home, stdin=subprocess.DEVNULL, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"`vmetal` is running from {venv}" in out.stderr
    assert f"deleted {venv}" in out.stderr
    assert not venv.exists()


# --- vmetal install: signals reach install.sh, and its rollback is waited for -------------------------

FAKE_INSTALL = """
trap 'sleep 0.3; echo "rolled back after $1"; exit $2' {sig}
echo started
while :; do sleep 0.05; done
"""

RUN_WITH_FAKE = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal, even if started with it ignored
from pathlib import Path
from vmetal.cli import install
script = Path(sys.argv[1])
install.find_install_script = lambda: script
sys.argv = ["vmetal", "install"]
from vmetal.cli.app import main
main()
"""


# Exit codes no shell or Python would make up: seeing them proves vmetal waited for the rollback's own.
@pytest.mark.parametrize(("sig", "whom", "code"), [("INT", "group", 42), ("TERM", "parent", 43)])
def test_ctrl_c_and_term_wait_for_install_sh_to_roll_back(tmp_path, sig, whom, code):
    import signal

    script = tmp_path / "install.sh"
    script.write_text(FAKE_INSTALL.format(sig=sig).replace("$1", sig).replace("$2", str(code)))
    proc = subprocess.Popen([sys.executable, "-c", RUN_WITH_FAKE, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "started\n"
        # No sleep: vmetal's handlers were in place before install.sh started, which printed `started`.
        signum = getattr(signal, f"SIG{sig}")
        if whom == "group":  # a terminal's Ctrl-C reaches the whole foreground group
            os.killpg(proc.pid, signum)
        else:  # `kill PID` of vmetal alone: handed on to install.sh
            proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of its group, install.sh included
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, err
    assert out == f"rolled back after {sig}\n"


# A venv-changing install.sh in miniature: it copies the venv aside before changing it, and its trap puts the
# copy back, so at no point can a signal lose the previous venv, whatever it interrupts.
FAKE_REBUILD = """
V=$1
ROLLBACK=""
undo() {
  trap '' INT TERM HUP
  if [ -n "$ROLLBACK" ]; then rm -rf "$V"; mv "$V.old" "$V"; echo "rolled back"; fi
  exit 42
}
trap undo INT TERM HUP
cp -R "$V" "$V.old"
ROLLBACK=1
echo new > "$V/version"
echo started
while :; do sleep 0.05; done
"""

# vmetal install with the signal sent by the process itself at a chosen point around install.sh's start.
RUN_SIGNALLED = """
import os, signal, subprocess, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal
from pathlib import Path
from vmetal.cli import install
script, venv, when, sig, whom = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
signum = getattr(signal, "SIG" + sig)
real_popen = subprocess.Popen


def send():
    if whom == "group":  # a terminal's Ctrl-C: vmetal and install.sh (once it exists) alike
        os.killpg(0, signum)
    else:
        os.kill(os.getpid(), signum)


def popen(cmd, **kwargs):
    if when == "before":
        send()
    child = real_popen([*cmd, venv], **kwargs)
    if when == "after":
        send()
    return child


install.find_install_script = lambda: script
install.subprocess.Popen = popen
sys.argv = ["vmetal", "install"]
from vmetal.cli.app import main
main()
"""


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize(("sig", "whom"), [("INT", "group"), ("TERM", "parent"), ("HUP", "parent")])
def test_a_signal_as_install_sh_starts_never_loses_the_previous_venv(tmp_path, when, sig, whom):
    """The signal handlers are installed before install.sh starts (they were installed after, and a Ctrl-C in
    that window skipped the rollback). Sent just before install.sh starts: it never runs, and vmetal exits
    128+N. Sent just after: it reaches install.sh (from the terminal, or handed on by vmetal), which stops
    and rolls back (42) or dies before changing anything; vmetal waits and exits with its code. Either way
    the previous venv is there, unchanged, and no process is left."""
    import signal

    script = tmp_path / "install.sh"
    script.write_text(FAKE_REBUILD)
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / "version").write_text("old\n")
    proc = subprocess.Popen([sys.executable, "-c", RUN_SIGNALLED, str(script), str(venv), when, sig, whom],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            start_new_session=True)
    out = err = ""
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"processes of vmetal install were left running: {err or 'no output'}")
    signum = getattr(signal, f"SIG{sig}")
    if when == "before":
        assert (proc.returncode, out) == (128 + signum, ""), err
    else:
        assert proc.returncode in (42, 128 + signum), err
        assert "started" not in out or "rolled back" in out
    assert (venv / "version").read_text() == "old\n"
