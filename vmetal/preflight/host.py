"""Host facts: OS, chip, macOS version, Rosetta, unified memory, the Metal wired limit, MLX devices.

`vmetal doctor`, `vmetal serve`'s memory pre-flight and `vmetal.preflight.fit` read the host through this module.
Every function is cheap (no subprocess on the common path: macOS values come from `sysctlbyname` through
ctypes) and takes what it reads as optional arguments, so tests inject a Mac on Linux and the reverse:

    is_rosetta(sysctl=lambda name: {"sysctl.proc_translated": 1}.get(name))

mlx is imported inside the functions that need it, never at module level: the CLI imports this module on
every `vmetal serve`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

GiB = 1024**3
MiB = 1024**2

# MLX's macOS wheels need macOS 13.5 or newer (Metal features MLX is built against).
MIN_MACOS = (13, 5)

# name -> int | str | None (None: this host has no such sysctl, or it could not be read)
Sysctl = Callable[[str], "int | str | None"]

# sysctls whose value is a string; every other one this module reads is an integer.
_STRING_SYSCTLS = frozenset({"machdep.cpu.brand_string", "kern.osproductversion", "hw.model"})


def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _sysctlbyname(name: str) -> bytes | None:
    libc = _libc()
    size = ctypes.c_size_t(0)
    if libc.sysctlbyname(name.encode(), None, ctypes.byref(size), None, ctypes.c_size_t(0)) != 0:
        return None
    buf = ctypes.create_string_buffer(size.value)
    if libc.sysctlbyname(name.encode(), buf, ctypes.byref(size), None, ctypes.c_size_t(0)) != 0:
        return None
    return buf.raw[: size.value]


def _sysctl_command(name: str) -> str | None:
    try:
        out = subprocess.run(["/usr/sbin/sysctl", "-n", name], capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def sysctl(name: str) -> int | str | None:
    """A macOS sysctl value (int, or str for the string ones); None elsewhere or when it does not exist."""
    if sys.platform != "darwin":
        return None
    try:
        raw = _sysctlbyname(name)
    except (OSError, AttributeError):  # no libc / no sysctlbyname: ask the command instead
        text = _sysctl_command(name)
        if text is None or name in _STRING_SYSCTLS:
            return text
        try:
            return int(text)
        except ValueError:
            return None
    if raw is None:
        return None
    if name in _STRING_SYSCTLS:
        return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace").strip()
    if len(raw) in (1, 2, 4, 8):
        return int.from_bytes(raw, sys.byteorder, signed=len(raw) < 8)
    return None


def is_macos(system: str | None = None) -> bool:
    return (system or platform.system()).lower() == "darwin"


def macos_version(system: str | None = None, mac_ver: str | None = None) -> tuple[int, ...] | None:
    """(14, 5) on macOS 14.5; None on other systems."""
    if not is_macos(system):
        return None
    text = platform.mac_ver()[0] if mac_ver is None else mac_ver
    try:
        return tuple(int(p) for p in text.split(".") if p != "")
    except ValueError:
        return None


def is_rosetta(sysctl: Sysctl = sysctl) -> bool | None:
    """True when this (x86_64) process is translated by Rosetta 2; None when the host cannot say (not a Mac)."""
    value = sysctl("sysctl.proc_translated")
    return None if value is None else value == 1


def is_apple_silicon(system: str | None = None, machine: str | None = None,
                     sysctl: Sysctl = sysctl) -> bool:
    """The hardware is Apple Silicon, even when this Python runs as x86_64 under Rosetta."""
    if not is_macos(system):
        return False
    if (machine or platform.machine()) == "arm64":
        return True
    return sysctl("hw.optional.arm64") == 1


def chip(system: str | None = None, sysctl: Sysctl = sysctl, cpuinfo: str | None = None) -> str:
    """The CPU's marketing name ("Apple M3 Pro", "Intel(R) Xeon(R) …"), or the machine name."""
    if is_macos(system):
        name = sysctl("machdep.cpu.brand_string")
        if isinstance(name, str) and name:
            return name
    else:
        if cpuinfo is None:
            try:
                with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                    cpuinfo = f.read(64 * 1024)
            except OSError:
                cpuinfo = ""
        for line in cpuinfo.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def total_memory() -> int:
    """Physical memory in bytes (on Apple Silicon: the unified memory CPU and GPU share)."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - psutil is a dependency, but fall back to POSIX rather than fail
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def wired_limit_mb(sysctl: Sysctl = sysctl) -> int | None:
    """`sysctl iogpu.wired_limit_mb`: 0 means macOS's default; None where it does not exist (not a Mac)."""
    value = sysctl("iogpu.wired_limit_mb")
    return value if isinstance(value, int) else None


def is_paravirtual(info: Mapping[str, Any]) -> bool:
    """Whether `mx.device_info()` (or `info` of `MlxDevices`) describes a VM's paravirtual Metal device.

    That is what Metal calls the GPU of a macOS virtual machine (Apple's Virtualization framework: GitHub's
    macos-14/15/26 arm64 runners, UTM, Tart, Parallels): "Apple Paravirtual device", which forwards to the
    host's GPU. MLX and `mx.fast.metal_kernel` work there, but `device_info()` reports the VM's share (on
    GitHub's runners 7 GiB of memory, a 4.7 GiB working set), llama.cpp reports it without simdgroup reductions
    (GPU family Common3), and numerics and speed are the VM's, not Apple silicon's.
    """
    return "paravirtual" in str(info.get("device_name") or "").lower()


@dataclass(frozen=True)
class MlxDevices:
    """What MLX can compute on here."""

    version: str | None = None
    metal: bool = False
    cuda: bool = False
    cpu: bool = False
    default: str | None = None  # "gpu" or "cpu": MLX's default device
    info: Mapping[str, Any] = field(default_factory=dict)  # mx.device_info() of the GPU, if any
    error: str | None = None  # why mlx could not be imported or used

    @property
    def gpu(self) -> bool:
        return self.metal or self.cuda

    @property
    def paravirtual(self) -> bool:
        """MLX's Metal device is a VM's paravirtual GPU, not Apple silicon's own (see `is_paravirtual`)."""
        return self.metal and is_paravirtual(self.info)

    @property
    def names(self) -> list[str]:
        return [n for n, have in (("Metal", self.metal), ("CUDA", self.cuda), ("CPU", self.cpu)) if have]


def _probe(fn: Callable[[], Any]) -> bool:
    try:
        return bool(fn())
    except Exception:  # noqa: BLE001 - a probe that raises means that backend is missing
        return False


def mlx_devices() -> MlxDevices:
    """Import MLX and ask which devices it has; each one is used for one tiny computation."""
    try:
        import mlx.core as mx
    except Exception as exc:  # noqa: BLE001 - a broken install shows up as any exception type
        return MlxDevices(error=f"{type(exc).__name__}: {exc}")
    metal = _probe(lambda: mx.metal.is_available())
    cuda = _probe(lambda: mx.cuda.is_available()) if hasattr(mx, "cuda") else False

    def computes(device: Any) -> bool:
        out = mx.add(mx.array([1, 2]), 1, stream=device)
        mx.eval(out)
        return out.tolist() == [2, 3]

    cpu = _probe(lambda: computes(mx.cpu))
    error = None
    if metal or cuda:
        try:
            if not computes(mx.gpu):
                error = "a test computation on the MLX GPU gave a wrong result"
        except Exception as exc:  # noqa: BLE001
            error = f"the MLX GPU is listed but a test computation failed: {type(exc).__name__}: {exc}"
    info: dict[str, Any] = {}
    if metal or cuda:
        try:
            get_info = getattr(mx, "device_info", None) or mx.metal.device_info
            info = dict(get_info())
        except Exception:  # noqa: BLE001 - informational only
            info = {}
    try:
        default = "gpu" if mx.default_device() == mx.gpu else "cpu"
    except Exception:  # noqa: BLE001
        default = None
    return MlxDevices(version=getattr(mx, "__version__", None), metal=metal, cuda=cuda, cpu=cpu,
                      default=default, info=info, error=error)


def memory_for_mlx(devices: MlxDevices | None = None, total: int | None = None) -> int:
    """Bytes MLX may use for a model: what the engine budgets with (see `vmetal.engine.worker`).

    On Metal that is the device's recommended working set (the share of unified memory macOS lets the GPU
    wire, raised with `sysctl iogpu.wired_limit_mb`), which in a VM is the paravirtual device's own limit
    (4.7 GiB of the 7 GiB a GitHub runner reports as `memory_size`); on CUDA the card's memory; on the CPU,
    system memory.
    Pass `devices` to skip probing MLX, `total` to skip reading the system memory.
    """
    if devices is None:
        devices = mlx_devices()
    if devices.gpu:
        for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
            value = devices.info.get(key)
            if value:
                return int(value)
    return int(total if total is not None else total_memory())


@dataclass(frozen=True)
class HostFacts:
    system: str
    machine: str  # what this Python runs as (x86_64 under Rosetta)
    chip: str
    apple_silicon: bool
    macos: tuple[int, ...] | None
    rosetta: bool | None
    total_memory: int
    wired_limit_mb: int | None
    python: str


def host_facts(*, system: str | None = None, machine: str | None = None, sysctl: Sysctl = sysctl,
               mac_ver: str | None = None, memory: int | None = None) -> HostFacts:
    """Everything above except MLX, in one call (no subprocess on macOS, /proc reads on Linux)."""
    system = system or platform.system()
    machine = machine or platform.machine()
    return HostFacts(
        system=system,
        machine=machine,
        chip=chip(system, sysctl),
        apple_silicon=is_apple_silicon(system, machine, sysctl),
        macos=macos_version(system, mac_ver),
        rosetta=is_rosetta(sysctl) if is_macos(system) else None,
        total_memory=total_memory() if memory is None else memory,
        wired_limit_mb=wired_limit_mb(sysctl) if is_macos(system) else None,
        python=platform.python_version(),
    )
