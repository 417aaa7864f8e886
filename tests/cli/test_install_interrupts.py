"""`install.sh` and `vmetal uninstall` interrupted for real: the previous venv still works, or is cleanly gone.

Cheap stand-ins for the expensive parts, the real scripts for the rest:

- The venv is a small real one (`python -m venv --without-pip`, marked the way install.sh marks it), so
  install.sh judges it out of date and rebuilds it: it renames it to `PATH.old`, creates a new venv at PATH,
  upgrades pip, and then fails to install vLLM, because pip may not use an index (`PIP_NO_INDEX=1`). That
  is the whole rebuild-and-roll-back path in a few seconds, without a download.
- Interrupts: Ctrl-C (SIGINT) and SIGKILL of install.sh at random points of that rebuild; SIGKILL of
  `vmetal uninstall --yes` at random points while it deletes a venv of a few thousand files.

After each: the old venv is at its path byte for byte and its Python runs, or (SIGKILL, which allows no
clean-up) the next `install.sh` or `vmetal uninstall` puts things right: the old venv back unchanged, or
nothing of vmetal's left at all.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO
from vmetal.install.plan import IN_PROGRESS_NAME, MARKER_NAME

pytestmark = pytest.mark.slow

PLAN_PY = REPO / "vmetal" / "install" / "plan.py"


def fingerprint(path: Path) -> dict[str, str]:
    """Every entry under `path`: file contents' digest, link target, or `dir`."""
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def works(venv: Path) -> bool:
    return subprocess.run([str(venv / "bin" / "python"), "-c", "import sys; print(sys.prefix)"],
                          capture_output=True, text=True, timeout=60).stdout.strip() == str(venv)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A marked venv with a few thousand small files, so that deleting it takes a moment."""
    venv = tmp_path_factory.mktemp("template") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python*/site-packages"))
    for i in range(40):
        pkg = site / f"pkg{i}"
        pkg.mkdir()
        for j in range(100):
            (pkg / f"m{j}.py").write_text(f"X = {i * 100 + j}\n" * 20)
    subprocess.run([str(venv / "bin" / "python"), str(PLAN_PY), "--write-marker", str(venv / MARKER_NAME),
                    "--source", str(REPO)], check=True, cwd="/", timeout=120)
    return venv


@pytest.fixture
def venv(template, tmp_path) -> Path:
    dest = tmp_path / "venv"
    subprocess.run(["cp", "-a", str(template), str(dest)], check=True)
    return dest


def leftovers(venv: Path) -> list[str]:
    """What install.sh or uninstall may leave beside the venv."""
    return sorted(p.name for p in venv.parent.iterdir() if p.name.startswith(venv.name + "."))


def uninstall_argv(venv: Path) -> list[str]:
    return [sys.executable, "-m", "vmetal.cli.app", "uninstall", "--yes", "--venv", str(venv)]


def install_sh(venv: Path) -> subprocess.Popen:
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.Popen(["bash", str(REPO / "install.sh"), "--venv", str(venv), "--python", sys.executable,
                             "--torch-index", "none"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(proc: subprocess.Popen, line_start: str) -> list[str]:
    """Read `proc`'s output until a line starts with `line_start` (a step of the rebuild has begun)."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line.rstrip("\n"))
        if line.lstrip().startswith(line_start):
            return seen
    raise AssertionError(f"install.sh ended before `{line_start}`:\n" + "\n".join(seen))


# The rebuild's steps, in order: an interrupt is sent a random moment after one of them begins.
STEPS = ("==> [1] setting the current venv aside", "==> [2] creating a venv", "==> [3] upgrading pip",
         "==> [4] installing")


@pytest.mark.parametrize("step", STEPS)
def test_ctrl_c_at_any_step_of_a_rebuild_leaves_the_old_venv(venv, step):
    rng = random.Random(step)
    before = fingerprint(venv)
    proc = install_sh(venv)
    try:
        wait_for(proc, step)
        time.sleep(rng.uniform(0, 0.5))
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole foreground group
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode in (1, 130), out
    assert fingerprint(venv) == before, out
    assert works(venv)
    assert leftovers(venv) == [], out


@pytest.mark.parametrize(("step", "then"), [(STEPS[1], "install.sh"), (STEPS[3], "uninstall")])
def test_sigkill_mid_rebuild_then_the_next_run_restores_or_removes_it(venv, step, then):
    rng = random.Random(step + then)
    before = fingerprint(venv)
    proc = install_sh(venv)
    wait_for(proc, step)
    time.sleep(rng.uniform(0, 0.5))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    old = venv.with_name(venv.name + ".old")
    # No chance to clean up: the old venv waits, untouched, beside the new one (marked as unfinished).
    assert fingerprint(old) == before
    assert (venv / IN_PROGRESS_NAME).is_file() or not venv.exists()

    if then == "install.sh":
        again = install_sh(venv)
        out, _ = again.communicate(timeout=300)
        assert "a previous install.sh run was interrupted; restoring the venv it had set aside" in out, out
        assert again.returncode == 1 and "rolled back" in out, out  # no index: this run fails too
        assert fingerprint(venv) == before and works(venv)
        assert leftovers(venv) == []
    else:
        result = subprocess.run(uninstall_argv(venv), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert not venv.exists() and leftovers(venv) == [], result.stderr


def test_uninstall_killed_at_random_points_leaves_the_venv_whole_or_gone(template, tmp_path):
    rng = random.Random(9)
    counts = {"whole": 0, "mid-delete": 0, "gone": 0}
    # How long a whole uninstall takes here (start-up included): the window the kills are drawn from.
    venv = tmp_path / "timing"
    subprocess.run(["cp", "-a", str(template), str(venv)], check=True)
    started = time.monotonic()
    subprocess.run(uninstall_argv(venv), check=True, capture_output=True, timeout=120)
    whole = time.monotonic() - started
    for round_no in range(5):
        venv = tmp_path / f"venv{round_no}"
        subprocess.run(["cp", "-a", str(template), str(venv)], check=True)
        before = fingerprint(venv)
        proc = subprocess.Popen(uninstall_argv(venv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if round_no % 2:  # any time in its life
            time.sleep(rng.uniform(0.2, 1.0) * whole)
        else:  # once the deletion has begun (the venv renamed away), a moment into it
            deadline = time.monotonic() + 60
            while venv.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.02))
        proc.kill()
        proc.wait(30)
        if venv.exists():
            assert fingerprint(venv) == before and works(venv)
            counts["whole"] += 1
        else:
            counts["mid-delete" if leftovers(venv) else "gone"] += 1
        finish = subprocess.run(uninstall_argv(venv), capture_output=True, text=True, timeout=120)
        assert finish.returncode == 0, finish.stderr
        assert not venv.exists() and leftovers(venv) == [], (leftovers(venv), finish.stderr)
        shutil.rmtree(venv, ignore_errors=True)
    assert counts["mid-delete"], counts  # the kills that matter: between the rename and the last file
    print(f"\nuninstall SIGKILLed 5 times: {counts}")
