"""`vmetal doctor`: is this machine ready to serve with vLLM on MLX? One line per check, a fix for each problem.

    vmetal doctor            # ✓ / ! / ✗ per check, the ENV.md variables, a block to paste into bug reports
    vmetal doctor -v         # plus every check's details
    vmetal doctor --json     # the same as data (schema below)
    vmetal doctor --smoke    # plus a real greedy generation through vLLM on a tiny model built locally
    vmetal doctor --cluster hosts.json [--model M]   # plus every node of a multi-node serve, over ssh

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
    metal_device         kind ("apple_silicon"|"paravirtual"|"none"), paravirtual (bool: a macOS VM's GPU),
                         device_name, architecture, memory_size, max_recommended_working_set_size (null
                         where not reported; off a Mac the check is "ok" and says there is no Metal device)
    metal_kernels        setting ("auto"|"1"|"0": VLLM_METAL_KERNELS), ran (bool: the self-check ran, only
                         on a Metal device), ok, error (relative), tolerance, shape, device (null unless it
                         ran), failed (str, only when the check's child did not answer)
    memory               total_bytes, mlx_bytes (what MLX may use), wired_limit_mb (int|null), available_bytes
    env                  variables: [{name, value, source ("default"|"environment"), valid, error}],
                         related: {name: value or "set (masked)" or "unset"}, device (resolved MLX device)
    disk                 caches: [{name, path, free_bytes}]
    hub_huggingface      url, reachable (bool|null: not checked), http_status, error
    hub_modelscope       url, reachable, http_status, error, use_modelscope (bool)
    port                 host, port, free (bool)
    model_fit            model, path, plus vmetal.preflight.fit.FitReport.as_dict() keys   (with --model)
    remote_code          trust_remote_code (bool: `--trust-remote-code` after `--`), code_files (the model's)
    smoke                model, tokens, tokens_per_s, load_s, matches_mlx_lm, error   (with --smoke)
    cluster_node         one per node of --cluster's hostfile: node, ips, hostname, python, versions (object),
                         model_digest (str|null), port, clock_offset_s, unreachable (addresses)  (cluster.py)

The checks live in `vmetal/cli/doctor/`, one module per concern (`machine`, `device`, `packages`, `plugin`,
`serving`, `hub`, `remote_code`, `smoke`; `base` holds `Check`); this module runs them in the order above and
prints them. It imports them (`base` aside) only when the command runs, so `vmetal --help` stays fast.

`python -m vmetal.cli.doctor.smoke MODEL` is the child process of `--smoke` (spawn-safe: vLLM's engine
processes re-import that module, and only its `__main__` guard runs the generation).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from vmetal import __version__, envs
from vmetal.cli import PASSTHROUGH
from vmetal.cli.doctor.base import Check, _fail, _gib, _truthy, _warn, dist_version, mask, secret_values

SCHEMA_VERSION = 1
STATUSES = ("ok", "warn", "fail")
SYMBOLS = {"ok": "✓", "warn": "!", "fail": "✗"}
ASCII_SYMBOLS = {"ok": "+", "warn": "!", "fail": "x"}
STYLES = {"ok": "green", "warn": "yellow", "fail": "bold red"}

PROBE_TIMEOUT_S = 20.0

COMMAND_SETTINGS: dict[str, Any] = {
    # `vmetal doctor -- --trust-remote-code`: the arguments `vmetal serve` will pass to vLLM, judged too.
    "context_settings": PASSTHROUGH,
}


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
               vllm_args: tuple[str, ...] = (), cluster: Path | None = None, ssh: str | None = None,
               remote_python: str | None = None) -> list[Check]:
    # Called through their modules, so that a test replacing e.g. `plugin.start_vllm_probe` is heard.
    from vmetal.cli.doctor import device, hub, machine, packages, plugin, serving
    from vmetal.cli.doctor.remote_code import check_remote_code
    from vmetal.preflight import host as machine_facts  # not `host`: that is the address to check

    # Slowest first: vLLM's import takes seconds; everything else overlaps with it.
    probe_started = time.monotonic()
    try:
        probe: Any = plugin.start_vllm_probe(environ, probe_timeout)
    except OSError as exc:
        probe = plugin.FailedProbe(f"could not start {sys.executable}: {exc}")
    hf = _Task(lambda: hub.check_hub_huggingface(environ), "hub_huggingface")
    ms = _Task(lambda: hub.check_hub_modelscope(environ), "hub_modelscope")

    facts = machine_facts.host_facts()
    devices = machine_facts.mlx_devices()
    local: list[Check] = []
    for id, fn in (("host", lambda: machine.check_host(facts)),
                   ("python_arch", lambda: machine.check_python_arch(facts)),
                   ("python_version", lambda: machine.check_python_version(facts)),
                   ("packages", lambda: packages.check_packages(facts.system)),
                   ("entry_point", lambda: plugin.check_entry_point(environ)),
                   ):
        value = _guarded(fn, id)
        local.extend(value if isinstance(value, list) else [value])
    after = [_guarded(fn, id) for id, fn in (("mlx_devices", lambda: machine.check_mlx_devices(devices, facts)),
                                             ("metal_device", lambda: device.check_metal_device(devices, facts)),
                                             ("metal_kernels", lambda: device.check_metal_kernels(devices,
                                                                                                  environ)),
                                             ("memory", lambda: machine.check_memory(facts, devices)),
                                             ("env", lambda: serving.check_env(environ, devices)),
                                             ("disk", lambda: hub.check_disk(environ)))]
    port_check = _guarded(lambda: serving.check_port(host, port), "port")
    fit_check = _guarded(lambda: serving.check_model_fit(model, max_model_len), "model_fit") if model else None

    hubs = []
    for task, id, title in ((hf, "hub_huggingface", "Hugging Face"), (ms, "hub_modelscope", "ModelScope")):
        value = task.get(hub.HUB_TIMEOUT_S + 0.5)
        if value is None:
            value = _warn(id, title, f"no answer within {hub.HUB_TIMEOUT_S:g} s (DNS or network hangs)",
                          "check the network or proxy (HTTPS_PROXY); HF_HUB_OFFLINE=1 skips the hub")
        assert isinstance(value, Check)
        value.elapsed_s = task.elapsed or hub.HUB_TIMEOUT_S
        hubs.append(value)

    platform_check = _guarded(lambda: plugin.check_vllm_platform(probe.result(), environ, probe_timeout),
                              "vllm_platform")
    assert isinstance(platform_check, Check)
    platform_check.elapsed_s = time.monotonic() - probe_started

    checks = [*local, platform_check, *after, *hubs, port_check]
    if fit_check:
        checks.append(fit_check)
    checks.append(_guarded(lambda: check_remote_code(
        Path(model).expanduser() if model else None, list(vllm_args),
        lambda status, summary, fix, **d: Check("remote_code", "Remote code", status, summary, fix, d)),
        "remote_code"))
    if smoke:
        from vmetal.cli.doctor.smoke import check_smoke

        checks.append(_guarded(lambda: check_smoke(environ), "smoke"))
    if cluster is not None:
        from vmetal.cli.doctor import cluster as cluster_checks

        checks.extend(cluster_checks.check_cluster(cluster, model, ssh or cluster_checks.SSH, remote_python))
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
    if d("metal_device", "paravirtual"):
        devices += f" ({d('metal_device', 'device_name')}: a VM)"
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
                                                             "`vmetal/cli/doctor/__init__.py`).")] = False,
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
    cluster: Annotated[Path | None, typer.Option(help="Also check every node of this hostfile (mlx.launch's JSON: "
                                                      '[{"ssh": HOST, "ips": [ADDRESS]}, ...]) over ssh: same '
                                                      "versions, same --model files, ring port reachable, clock.",
                                                 show_default=False)] = None,
    ssh: Annotated[str, typer.Option(help="How --cluster reaches a node: a command taking HOST then a shell "
                                          "command, as ssh does.")] = "ssh -o BatchMode=yes -o ConnectTimeout=5",
    remote_python: Annotated[str | None, typer.Option(help="vmetal's Python on the nodes. Default: this one's "
                                                           "path, under each node's home when under ours.",
                                                      show_default=False)] = None,
    node_facts: Annotated[bool, typer.Option("--node-facts", hidden=True,
                                             help="What --cluster runs on each node: its facts as one JSON line, "
                                                  "then a port held open for the asking node.")] = False,
) -> None:
    """Check this machine for vmetal: one line per check, a fix for each problem; exit 1 if any failed."""
    if node_facts:
        from vmetal.cli.doctor.cluster import answer

        port = os.environ.get("VLLM_METAL_RING_PORT", "")
        answer(model, int(port) if port.isdigit() else None)
        raise typer.Exit(0)
    started = time.monotonic()
    environ = dict(os.environ)
    if smoke and not json_output:
        from vmetal.cli.output import say

        say("--smoke: building or reusing the demo model and generating with vLLM (~30 s)")
    checks = run_checks(environ, host=host, port=port, probe_timeout=probe_timeout, model=model,
                        max_model_len=max_model_len, smoke=smoke, vllm_args=tuple(ctx.args), cluster=cluster,
                        ssh=ssh, remote_python=remote_python)
    elapsed = time.monotonic() - started
    if json_output:
        data = as_json(checks, environ, elapsed)
        print(mask(json.dumps(data, indent=2, ensure_ascii=False), secret_values(environ)))
        code = data["exit_code"]
    else:
        render(checks, environ, elapsed, verbose)
        code = 1 if any(c.status == "fail" for c in checks) else 0
    raise typer.Exit(code)

