"""The machine: OS and chip, the Python that runs vmetal, MLX's devices, and memory (unified or RAM)."""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

from vmetal.cli.doctor.base import Check, GiB, _fail, _gib, _ok, _pip, _warn


def check_host(facts: Any) -> Check:
    from vmetal.preflight.host import MIN_MACOS

    title = "OS and chip"
    details = dict(system=facts.system, machine=facts.machine, chip=facts.chip,
                   apple_silicon=facts.apple_silicon,
                   macos=".".join(map(str, facts.macos)) if facts.macos else None)
    if facts.system == "Darwin":
        version = details["macos"] or "unknown"
        if not facts.apple_silicon:
            return _fail("host", title, f"macOS {version} on an Intel Mac ({facts.chip}): MLX's Metal backend "
                         "needs Apple Silicon", "run vmetal on an Apple Silicon (M-series) Mac", **details)
        if facts.macos and facts.macos < MIN_MACOS:
            need = ".".join(map(str, MIN_MACOS))
            return _fail("host", title, f"macOS {version} on {facts.chip}: MLX needs macOS {need} or newer",
                         f"update macOS to {need} or newer (System Settings > General > Software Update)",
                         **details)
        return _ok("host", title, f"macOS {version}, {facts.chip} (Apple Silicon)", **details)
    if facts.system == "Linux":
        from vmetal.install.plan import LINUX_MACHINES

        if facts.machine not in LINUX_MACHINES:
            return _fail("host", title, f"Linux {facts.machine}: vLLM's CPU build is not published for it",
                         "use a Linux x86_64/aarch64 host or an Apple Silicon Mac", **details)
        return _ok("host", title, f"Linux {facts.machine}, {facts.chip} (no Metal here: MLX computes on "
                   "CPU, or CUDA with `mlx[cuda13]`)", **details)
    return _fail("host", title, f"{facts.system} {facts.machine}: vmetal runs on macOS (Apple Silicon) and Linux",
                 "use an Apple Silicon Mac, or Linux (on Windows: WSL2)", **details)


def check_python_arch(facts: Any) -> Check:
    title = "Python architecture"
    details = dict(machine=facts.machine, rosetta=facts.rosetta, executable=sys.executable)
    if facts.rosetta:
        return _fail("python_arch", title, f"{sys.executable} is an x86_64 Python running under Rosetta: "
                     "MLX has no Metal there and vLLM's macOS wheel is arm64 only",
                     "use a native arm64 Python 3.12 (`/opt/homebrew/bin/python3.12`, from `brew install "
                     "python@3.12`) and run `./install.sh --python /opt/homebrew/bin/python3.12`", **details)
    return _ok("python_arch", title, f"native {facts.machine}", **details)


def check_python_version(facts: Any) -> Check:
    from vmetal.install.plan import LINUX_MIN_PYTHON, MACOS_PYTHON

    title = "Python version"
    have = tuple(int(p) for p in facts.python.split(".")[:2])
    if facts.system == "Darwin":
        tested = ".".join(map(str, MACOS_PYTHON))
        if have != MACOS_PYTHON:
            return _warn("python_version", title, f"Python {facts.python}; vLLM's macOS wheel is built for "
                         f"{tested} only", f"make a Python {tested} venv: `./install.sh --python "
                         "/opt/homebrew/bin/python3.12`", version=facts.python, tested=tested)
        return _ok("python_version", title, f"{facts.python} (tested: {tested})", version=facts.python,
                   tested=tested)
    tested = ">=" + ".".join(map(str, LINUX_MIN_PYTHON))
    if have < LINUX_MIN_PYTHON:
        return _fail("python_version", title, f"Python {facts.python}; vmetal needs {tested}",
                     f"install Python {tested[2:]} or newer and run `./install.sh --python PATH`",
                     version=facts.python, tested=tested)
    return _ok("python_version", title, f"{facts.python} (tested: {tested})", version=facts.python, tested=tested)


def check_mlx_devices(devices: Any, facts: Any) -> Check:
    from vmetal.install.plan import LINUX_MLX_EXTRAS, MLX_VERSION

    title = "MLX devices"
    info = {k: v for k, v in dict(devices.info).items() if isinstance(v, (str, int, float, bool))}
    details = dict(version=devices.version, devices=devices.names, default=devices.default, device_info=info)
    mac = facts.system == "Darwin"
    if devices.version is None and devices.error:
        return _fail("mlx_devices", title, f"MLX does not import: {devices.error}",
                     _pip(f"mlx{'' if mac else '[cpu]'}=={MLX_VERSION}") + " (reinstall)", **details)
    if devices.error:
        return _fail("mlx_devices", title, devices.error, "reinstall MLX: " + _pip(f"mlx=={MLX_VERSION}"),
                     **details)
    shown = ", ".join(devices.names) or "none"
    if devices.metal:
        name = info.get("device_name") or facts.chip
        return _ok("mlx_devices", title, f"{shown} (Metal: {name})", **details)
    if devices.cuda:
        return _ok("mlx_devices", title, f"{shown} (CUDA: {info.get('device_name', 'GPU')})", **details)
    if mac and facts.apple_silicon and not facts.rosetta:
        return _fail("mlx_devices", title, f"MLX sees no Metal device ({shown})",
                     "reinstall MLX with its Metal backend: " + _pip(f"mlx=={MLX_VERSION}")
                     + "; a macOS VM without GPU access cannot use Metal", **details)
    if not mac and (os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi")):
        cuda = next(iter(k for k in LINUX_MLX_EXTRAS if k.startswith("cuda")), "cuda13")
        return _warn("mlx_devices", title, f"{shown}: this host has an NVIDIA GPU but MLX has no CUDA backend",
                     "for CUDA: " + _pip(f"mlx[{cuda}]=={MLX_VERSION}") + " (or `./install.sh --mlx-extra "
                     f"{cuda}`)", **details)
    return _ok("mlx_devices", title, f"{shown} (no MLX GPU on this host; MLX computes on the CPU)", **details)


def check_memory(facts: Any, devices: Any) -> Check:
    from vmetal.preflight.host import memory_for_mlx

    title = "Memory"
    try:
        import psutil

        free = int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001
        free = None
    budget = memory_for_mlx(devices, facts.total_memory)
    details = dict(total_bytes=facts.total_memory, mlx_bytes=budget, wired_limit_mb=facts.wired_limit_mb,
                   available_bytes=free)
    total = facts.total_memory
    if facts.system == "Darwin" and devices.paravirtual:
        # A VM: the paravirtual GPU's working set is the limit, whatever the wired limit says.
        summary = (f"{_gib(total)} in this VM; MLX may use {_gib(budget)}, the working set of its paravirtual "
                   "GPU")
        if budget < 8 * GiB:
            return _warn("memory", title, summary + ": little room for models",
                         "use small or 4-bit models and a short `--max-model-len`, or a larger VM or a Mac itself",
                         **details)
        return _ok("memory", title, summary, **details)
    if facts.system == "Darwin":
        limit = facts.wired_limit_mb
        wired = ("iogpu.wired_limit_mb=0 (macOS default)" if not limit else f"iogpu.wired_limit_mb={limit}")
        summary = f"{_gib(total)} unified; MLX may use {_gib(budget)}; {wired}"
        if limit and limit * 1024**2 > 0.9 * total:
            safe = int(total * 0.75 / 1024**2)
            return _warn("memory", title, summary + ": leaves macOS under 10 % of memory",
                         f"lower it: `sudo sysctl iogpu.wired_limit_mb={safe}` (0 restores the default)",
                         **details)
        if total < 8 * GiB:
            return _warn("memory", title, summary + ": little room for models",
                         "use small or 4-bit models and a short `--max-model-len`", **details)
        return _ok("memory", title, summary + " (raise with `sudo sysctl iogpu.wired_limit_mb=N`)", **details)
    summary = f"{_gib(total)} RAM" + (f", {_gib(free)} free now" if free is not None else "")
    summary += f"; MLX may use {_gib(budget)}"
    if free is not None and free < 2 * GiB:
        return _warn("memory", title, summary + ": under 2 GiB free", "close other programs or use a smaller model",
                     **details)
    return _ok("memory", title, summary, **details)
