"""The Metal device MLX computes on: Apple silicon's own GPU, or a macOS VM's paravirtual one.

The difference decides what a run proves. GitHub's macOS arm64 runners (macos-14/15/26) are VMs whose GPU is
the "Apple Paravirtual device": MLX and the Metal kernels run there, so serving and behavioural tests mean
what they mean on a Mac; but the memory is the VM's (a 4.7 GiB working set of 7 GiB), the numerics are the
paravirtual driver's (projects report kernel-vs-reference parity that holds at 1e-4 on Apple silicon
diverging there), and every speed figure measures the VM. A green CI run on such a runner says nothing about
either, so doctor says which device this is.
"""

from __future__ import annotations

from typing import Any

from vmetal.cli.doctor.base import Check, _fail, _gib, _ok, _warn

TITLE = "Metal device"

# What a VM's paravirtual device does and does not stand for, in the words doctor prints.
VM_HOLDS = "serving and behavioural tests hold"
VM_DIFFERS = ("memory is the VM's working set, kernel numerics may differ from Apple silicon beyond strict "
              "tolerances, and speed figures measure the VM")


def _details(devices: Any, kind: str) -> dict[str, Any]:
    info = dict(devices.info or {}) if devices.metal else {}
    return dict(kind=kind, device_name=info.get("device_name"), architecture=info.get("architecture"),
                memory_size=info.get("memory_size"),
                max_recommended_working_set_size=info.get("max_recommended_working_set_size"),
                paravirtual=bool(devices.paravirtual))


def _sizes(details: dict[str, Any]) -> str:
    memory, working = details["memory_size"], details["max_recommended_working_set_size"]
    parts = [f"{_gib(memory)} memory" if memory else None,
             f"{_gib(working)} working set for MLX" if working else None]
    return ", ".join(p for p in parts if p) or "sizes not reported"


def check_metal_device(devices: Any, facts: Any) -> Check:
    """`metal_device`: names the device and says whether it is a VM's paravirtual GPU."""
    mac = facts.system == "Darwin"
    if not devices.metal:
        details = _details(devices, "none")
        if not mac:
            where = "CUDA" if devices.cuda else "the CPU"
            return _ok("metal_device", TITLE, f"none (not a Mac: MLX computes on {where} here)", **details)
        if devices.version is None:
            return _warn("metal_device", TITLE, "not known: MLX does not import",
                         "fix the `MLX devices` check first", **details)
        return _fail("metal_device", TITLE, "none: MLX sees no Metal device on this Mac, so it computes on the CPU",
                     "run on Apple silicon with MLX's Metal build (`MLX devices` says how); a macOS VM needs a "
                     "paravirtual GPU", **details)
    if devices.paravirtual:
        details = _details(devices, "paravirtual")
        return _warn("metal_device", TITLE,
                     f"{details['device_name']}: a macOS VM's GPU, not Apple silicon ({_sizes(details)}); "
                     f"{VM_HOLDS}, but {VM_DIFFERS}",
                     "benchmark, size models and run the strict Metal tests on a Mac itself (README, \"Use in "
                     "CI\": the self-hosted job)", **details)
    details = _details(devices, "apple_silicon")
    name = details["device_name"] or facts.chip
    return _ok("metal_device", TITLE, f"{name} (Apple silicon; {_sizes(details)})", **details)
