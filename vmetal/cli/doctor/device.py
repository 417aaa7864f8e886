"""The Metal device MLX computes on: Apple silicon's own GPU, or a macOS VM's paravirtual one.

The difference decides what a run proves. GitHub's macOS arm64 runners (macos-14/15/26) are VMs whose GPU is
the "Apple Paravirtual device": MLX and the Metal kernels run there, so serving and behavioural tests mean
what they mean on a Mac; but the memory is the VM's (a 4.7 GiB working set of 7 GiB), the numerics are the
paravirtual driver's (projects report kernel-vs-reference parity that holds at 1e-4 on Apple silicon
diverging there), and every speed figure measures the VM. A green CI run on such a runner says nothing about
either, so doctor says which device this is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

from vmetal import envs
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


# --- The Metal kernels -----------------------------------------------------------------------------------
KERNELS_TITLE = "Metal kernels"
SELF_CHECK_TIMEOUT_S = 60.0  # importing MLX and compiling one kernel: seconds; a hung GPU must not hang doctor
SELF_CHECK_MODULE = "vmetal.engine.runner.attention.metal"


def run_self_check(environ: Mapping[str, str], timeout: float = SELF_CHECK_TIMEOUT_S) -> dict[str, Any]:
    """The engine's start-up self-check of the paged-attention kernel, in a child (a kernel that faults takes
    its process down): {ok, error, tolerance, shape, device} as it printed them, or {failed: why}."""
    try:
        proc = subprocess.run([sys.executable, "-m", SELF_CHECK_MODULE], env=dict(environ), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"failed": f"no answer within {timeout:g} s"}
    except OSError as exc:
        return {"failed": f"could not start {sys.executable}: {exc}"}
    lines = proc.stdout.strip().splitlines()
    try:
        return dict(json.loads(lines[-1]))
    except (IndexError, ValueError):
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}, no output"])[-1]
        return {"failed": tail}


def check_metal_kernels(devices: Any, environ: Mapping[str, str],
                        run: Callable[[Mapping[str, str]], dict[str, Any]] = run_self_check) -> Check:
    """`metal_kernels`: what the engine's start-up self-check would decide (`VLLM_METAL_KERNELS`): the Metal
    paged-attention kernel against the pure-MLX reference, run where MLX has a Metal device."""
    try:
        setting = envs.load_config(environ).kernels
    except envs.EnvError:
        setting = None  # the `env` check reports the bad value; the engine would not start at all
    details: dict[str, Any] = {"setting": {None: "auto", True: "1", False: "0"}[setting], "ran": False}
    off = f"{envs.KERNELS}=0"
    if not devices.metal:
        if setting is True:
            return _fail("metal_kernels", KERNELS_TITLE, f"{envs.KERNELS}=1 asks for them, but MLX has no Metal "
                         "device here: the paged KV path would refuse to start",
                         f"set {envs.KERNELS}=auto (or 0) off a Mac", **details)
        return _ok("metal_kernels", KERNELS_TITLE, "not used: no Metal device (the paged KV path computes "
                   "with the pure-MLX reference)", **details)
    if setting is False:
        return _ok("metal_kernels", KERNELS_TITLE, f"off ({off}): the paged KV path computes with the pure-MLX "
                   "reference, unchecked", **details)
    result = run(environ)
    details.update(ran=True, **{k: result.get(k) for k in ("ok", "error", "tolerance", "shape", "device")})
    if "failed" in result:
        details["failed"] = result["failed"]
        return _warn("metal_kernels", KERNELS_TITLE, f"the self-check did not finish: {result['failed']}",
                     f"run `python -m {SELF_CHECK_MODULE}` to see why; {off} serves the paged KV path "
                     "with the pure-MLX reference meanwhile", **details)
    measured = (f"relative error {result['error']:.2e} against the pure-MLX reference (tolerance "
                f"{result['tolerance']:.0e}) on {result['shape']}")
    if result["ok"]:
        return _ok("metal_kernels", KERNELS_TITLE, f"paged attention agrees: {measured}", **details)
    if setting is True:
        return _fail("metal_kernels", KERNELS_TITLE, f"paged attention DISAGREES: {measured}, and "
                     f"{envs.KERNELS}=1 makes the engine serve with it anyway (wrong outputs)",
                     f"unset {envs.KERNELS} (auto falls back to the reference) and report the bug-report "
                     "block below", **details)
    return _warn("metal_kernels", KERNELS_TITLE, f"paged attention DISAGREES: {measured}; the engine will "
                 "serve the paged KV path with the pure-MLX reference instead",
                 "report the bug-report block below; serving stays correct, at the reference's speed",
                 **details)
