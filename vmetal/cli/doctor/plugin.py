"""The plugin as vLLM sees it: vmetal's entry point, and the platform a child importing vLLM selects."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmetal import ACTIVATE_ENV, PLATFORM_QUALNAME, envs
from vmetal.cli.doctor.base import Check, _fail, _ok, _warn

_PROBE_MARK = "VMETAL_PROBE "


def plugin_entry_points() -> list[Any]:
    """The installed `vllm.platform_plugins` entry points (what vLLM itself loads)."""
    from importlib.metadata import entry_points

    return list(entry_points(group="vllm.platform_plugins"))


def check_entry_point(environ: Mapping[str, str]) -> Check:
    import vmetal

    title = "Plugin entry point"
    reinstall = ("reinstall vmetal into this Python: `./install.sh`, or "
                 f"`{sys.executable} -m pip install -e .` in a vmetal checkout")
    eps = plugin_entry_points()
    ours = [ep for ep in eps if ep.name == "vmetal"]
    others = sorted({ep.name for ep in eps if ep.name != "vmetal"})
    active = vmetal.should_activate(dict(environ))
    if not ours:
        return _fail("entry_point", title, "vmetal's `vllm.platform_plugins` entry point is missing: vLLM "
                     "never loads the plugin", reinstall, value=None, distribution=None, module_file=None,
                     active_by_default=active, other_plugins=others)
    ep = ours[0]
    dist = getattr(getattr(ep, "dist", None), "name", None)
    details = dict(value=ep.value, distribution=dist, module_file=getattr(vmetal, "__file__", None),
                   active_by_default=active, other_plugins=others)
    if ep.value != "vmetal:register":
        return _fail("entry_point", title, f"the entry point is `{ep.value}`, not `vmetal:register`", reinstall,
                     **details)
    try:
        func = ep.load()
    except Exception as exc:  # noqa: BLE001 - whatever vLLM would hit
        return _fail("entry_point", title, f"`vmetal:register` does not load: {type(exc).__name__}: {exc}",
                     reinstall, **details)
    if getattr(vmetal, "__file__", None) is None:
        return _fail("entry_point", title, "`vmetal` imports as a namespace package: a folder named `vmetal` on "
                     "sys.path shadows the installed package", "run from another directory (or `python -P`)",
                     **details)
    if func is not vmetal.register:
        return _warn("entry_point", title, "the entry point loads a different `vmetal` than this one",
                     "remove the other vmetal install (`pip list | grep vmetal`)", **details)
    if len(ours) > 1:
        return _warn("entry_point", title, f"{len(ours)} `vmetal` entry points are installed (two installs?)",
                     "uninstall the extra copy: `pip uninstall vmetal`, then `./install.sh`", **details)
    if others:
        return _warn("entry_point", title, f"other platform plugins are installed too ({', '.join(others)}); vLLM "
                     "refuses to start when two activate", f"uninstall the one you do not use: "
                     f"`pip uninstall {others[0]}`", **details)
    switched_off = (environ.get(ACTIVATE_ENV) or "").strip().lower() in ("0", "false", "no")
    if sys.platform == "darwin" and switched_off:
        return _warn("entry_point", title, f"{ACTIVATE_ENV}={environ[ACTIVATE_ENV]} turns the plugin off for "
                     "plain `vllm` commands", f"unset {ACTIVATE_ENV}", **details)
    when = "active by default" if active else f"active when {ACTIVATE_ENV}=1 (`vmetal serve` sets it)"
    return _ok("entry_point", title, f"`vmetal = vmetal:register` ({dist or 'unknown distribution'}); {when}",
               **details)


class VllmProbe:
    """A child Python that imports vLLM with the plugin enabled and reports the platform vLLM selects."""

    SCRIPT = (
        "import json, sys, time\n"
        "t = time.perf_counter(); out = {}\n"
        "try:\n"
        "    import vllm\n"
        "    out['vllm_version'] = getattr(vllm, '__version__', None)\n"
        "    from vllm.platforms import current_platform\n"
        "    cls = type(current_platform)\n"
        "    out['platform'] = cls.__module__ + '.' + cls.__qualname__\n"
        "    import vmetal\n"
        "    out['vmetal_file'] = getattr(vmetal, '__file__', None)\n"
        "except BaseException as exc:\n"
        "    out['error'] = type(exc).__name__ + ': ' + str(exc)\n"
        "out['import_s'] = round(time.perf_counter() - t, 2)\n"
        f"print({_PROBE_MARK!r} + json.dumps(out), flush=True)\n"
    )

    def __init__(self, environ: Mapping[str, str], timeout: float) -> None:
        self.timeout = timeout
        env = dict(environ)
        env[ACTIVATE_ENV] = "1"
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        self.started = time.monotonic()
        # -P: a `vmetal` or `vllm` folder in the working directory must not shadow the installs.
        self.proc = subprocess.Popen([sys.executable, "-P", "-c", self.SCRIPT], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, errors="replace")

    def result(self) -> dict[str, Any]:
        remaining = max(0.1, self.timeout - (time.monotonic() - self.started))
        try:
            out, err = self.proc.communicate(timeout=remaining)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            return {"timed_out": True, "elapsed_s": round(time.monotonic() - self.started, 2)}
        elapsed = round(time.monotonic() - self.started, 2)
        for line in reversed(out.splitlines()):
            if line.startswith(_PROBE_MARK):
                return {**json.loads(line[len(_PROBE_MARK):]), "timed_out": False, "elapsed_s": elapsed}
        tail = (err or out).strip().splitlines()[-5:]
        return {"timed_out": False, "elapsed_s": elapsed,
                "error": f"the probe exited with code {self.proc.returncode}: " + " | ".join(tail)}


class FailedProbe:
    def __init__(self, error: str) -> None:
        self.error = error

    def result(self) -> dict[str, Any]:
        return {"timed_out": False, "error": self.error}


def start_vllm_probe(environ: Mapping[str, str], timeout: float) -> VllmProbe:
    """Start the probe now; its `result()` waits for it (monkeypatched in tests: it costs seconds)."""
    return VllmProbe(environ, timeout)


def check_vllm_platform(result: Mapping[str, Any], environ: Mapping[str, str], timeout: float) -> Check:
    import vmetal

    title = "vLLM platform"
    details = {k: result.get(k) for k in ("platform", "vllm_version", "import_s", "vmetal_file", "timed_out",
                                          "error")}
    if result.get("timed_out"):
        return _warn("vllm_platform", title, f"no answer within {timeout:g} s (importing vLLM is slow here; "
                     "the first run after an install also compiles bytecode)",
                     "run again, with more time if needed: `vmetal doctor --probe-timeout 60`", **details)
    if result.get("error"):
        error = str(result["error"])
        fix = ("install vLLM: `./install.sh`" if "No module named 'vllm'" in error else
               "run `VMETAL_ENABLE=1 python -c 'import vllm.platforms as p; print(p.current_platform)'` "
               f"to see the traceback (with {envs.DEBUG}=1 and VLLM_LOGGING_LEVEL=DEBUG)")
        return _fail("vllm_platform", title, f"importing vLLM failed: {error}", fix, **details)
    selected = result.get("platform")
    took = f" (vLLM import {result['import_s']:.1f} s)" if result.get("import_s") is not None else ""
    if selected == PLATFORM_QUALNAME:
        mine = getattr(vmetal, "__file__", None)
        theirs = result.get("vmetal_file")
        if mine and theirs and Path(mine).resolve() != Path(theirs).resolve():
            return _warn("vllm_platform", title, f"vLLM loads vmetal from {theirs}, this command from {mine}",
                         "remove the other vmetal install so both are the same", **details)
        return _ok("vllm_platform", title, f"vLLM {result.get('vllm_version')} selects `MetalPlatform`{took}",
                   **details)
    if environ.get("VLLM_TARGET_DEVICE", "").strip().lower() == "cpu":
        return _warn("vllm_platform", title, f"vLLM selects `{selected}`: VLLM_TARGET_DEVICE=cpu makes it skip "
                     "platform plugins (`vmetal serve` unsets it for its server, plain `vllm` does not)",
                     "unset VLLM_TARGET_DEVICE", **details)
    return _fail("vllm_platform", title, f"vLLM selects `{selected}`, not `MetalPlatform`",
                 "see the `Plugin entry point` check; `vmetal doctor -v` shows which vmetal vLLM sees",
                 **details)
