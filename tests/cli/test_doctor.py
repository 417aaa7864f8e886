"""`vmetal doctor`: the JSON schema, exit codes with faults injected, fixes, masking, host facts.

Only `test_json_schema_and_exit_0_here` starts the real vLLM probe (a child importing vLLM, ~4 s); the other
tests stand a fake in for it. `--smoke` (a real generation, ~30 s) is marked slow.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import vmetal
from vmetal import PLATFORM_QUALNAME, envs
from vmetal.cli import doctor
from vmetal.cli.app import app
from vmetal.cli.doctor import base, device, hub, machine, packages, plugin, serving
from vmetal.cli.doctor.smoke import SMOKE_TOKENS
from vmetal.preflight import host as system
from vmetal.server.process import free_port

runner = CliRunner()

CHECK_IDS = ["host", "python_arch", "python_version", "vllm_version", "mlx_version", "mlx_lm_version",
             "transformers_version", "entry_point", "vllm_platform", "mlx_devices", "metal_device", "metal_kernels",
             "memory", "env", "disk", "hub_huggingface", "hub_modelscope", "port", "remote_code"]
TOP_KEYS = {"schema": int, "vmetal_version": str, "ok": bool, "exit_code": int, "elapsed_s": float,
            "counts": dict, "checks": list, "report": str}
CHECK_KEYS = {"id": str, "title": str, "status": str, "summary": str, "details": dict, "elapsed_s": float}
SECRET = "hf_secretvalue"


def closed_port() -> int:
    """A local port nothing listens on: connecting is refused at once, with no network involved."""
    return free_port()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path, request):
    for var in envs.VARIABLES:
        monkeypatch.delenv(var.name, raising=False)
    for name in ("VLLM_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "VLLM_TARGET_DEVICE", "HF_ENDPOINT",
                 "MODELSCOPE_DOMAIN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VMETAL_HOME", str(tmp_path / "vmetal-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # ModelScope is always probed: point it at a refused local port so no test waits on DNS.
    monkeypatch.setenv("MODELSCOPE_DOMAIN", f"http://127.0.0.1:{closed_port()}")
    if "real_probe" not in request.fixturenames:
        monkeypatch.setattr(plugin, "start_vllm_probe", lambda environ, timeout: FakeProbe())


@pytest.fixture
def real_probe():
    """Requested by the one test that imports vLLM for real."""


class FakeProbe:
    answer: dict = {}

    def result(self):
        return {"platform": PLATFORM_QUALNAME, "vllm_version": "0.32.0", "import_s": 0.0,
                "vmetal_file": vmetal.__file__, "timed_out": False, "error": None, **FakeProbe.answer}


@pytest.fixture(autouse=True)
def probe_answer():
    FakeProbe.answer = {}
    yield FakeProbe.answer


def run_json(*args: str) -> tuple[int, dict]:
    result = runner.invoke(app, ["doctor", "--json", "--port", str(free_port()), *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.stdout)


def run_human(*args: str):
    return runner.invoke(app, ["doctor", "--port", str(free_port()), *args])


def by_id(data: dict) -> dict[str, dict]:
    return {c["id"]: c for c in data["checks"]}


def assert_schema(data: dict) -> None:
    assert set(data) == set(TOP_KEYS)
    for key, kind in TOP_KEYS.items():
        assert isinstance(data[key], kind), key
    assert data["schema"] == doctor.SCHEMA_VERSION == 1
    assert data["vmetal_version"] == vmetal.__version__
    ids = [c["id"] for c in data["checks"]]
    assert len(ids) == len(set(ids))
    assert [i for i in ids if i in CHECK_IDS] == CHECK_IDS
    for check in data["checks"]:
        assert set(check) == set(CHECK_KEYS) | {"fix"}
        for key, kind in CHECK_KEYS.items():
            assert isinstance(check[key], kind), (check["id"], key)
        assert check["status"] in {"ok", "warn", "fail"}
        assert check["summary"] and "\n" not in check["summary"]
        if check["status"] == "ok":
            assert check["fix"] is None
        else:
            assert isinstance(check["fix"], str) and check["fix"], check["id"]
    counts = {s: sum(c["status"] == s for c in data["checks"]) for s in ("ok", "warn", "fail")}
    assert data["counts"] == counts
    assert data["ok"] == (data["exit_code"] == 0) == (counts["fail"] == 0)
    assert data["report"].startswith(f"vmetal {vmetal.__version__} | ")


def test_json_schema_and_exit_0_here(real_probe):
    started = time.monotonic()
    code, data = run_json()
    took = time.monotonic() - started
    assert_schema(data)
    checks = by_id(data)
    assert code == 0, [c for c in data["checks"] if c["status"] == "fail"]
    # The real probe: vLLM, with the plugin enabled, picks our platform.
    assert checks["vllm_platform"]["status"] == "ok"
    assert checks["vllm_platform"]["details"]["platform"] == PLATFORM_QUALNAME
    assert checks["entry_point"]["details"]["value"] == "vmetal:register"
    env = checks["env"]["details"]
    assert [v["name"] for v in env["variables"]] == [v.name for v in envs.VARIABLES]
    assert {v["source"] for v in env["variables"]} == {"default"}
    # MLX on the CPU here: the scheduler keeps vLLM's CPU defaults (a GPU's: tests/unit/test_batching.py).
    assert env["device"] == "cpu" and env["batch_defaults"] is None
    assert checks["env"]["summary"].endswith("MLX device `cpu`: vLLM's CPU defaults a step (2,048 tokens, "
                                             "128 requests)")
    # Not a speed test (how fast doctor answers is benchmarks/bench_cli.py's): the checks run beside the vLLM
    # probe, so doctor ends within the probe's own timeout and the rest of its checks, with room for a
    # loaded shared host. Longer means something waited in series or hung.
    assert took < doctor.PROBE_TIMEOUT_S + 40, took


def test_human_output_has_a_fix_for_every_problem_and_a_bug_report():
    result = run_human()
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "```text" in lines and lines[-1] == "```"
    block = lines[lines.index("```text") + 1:-1]
    lines = lines[:lines.index("```text")]
    problems = [i for i, line in enumerate(lines) if line.startswith(("! ", "✗ "))]
    assert problems, "offline here: the hub checks warn"  # HF_HUB_OFFLINE skips HF; ModelScope is refused
    for i in problems:
        assert lines[i + 1].startswith("    fix: "), lines[i]
    checks = [line for line in lines if line[:2] in ("✓ ", "! ", "✗ ")]
    assert len(checks) == len(CHECK_IDS)
    for var in envs.VARIABLES:
        assert any(line.strip().startswith(var.name) and "default" in line for line in lines), var.name
    assert block[0].startswith(f"vmetal {vmetal.__version__} | ") and any(b.startswith("checks: ") for b in block)
    assert "nothing is broken" in result.stdout


def test_verbose_shows_details():
    result = run_human("-v")
    assert result.exit_code == 0
    assert "    executable: " in result.stdout and "    platform: vmetal.engine.platform.MetalPlatform" in result.stdout
    assert "    HF_HUB_OFFLINE" in result.stdout  # related variables


def test_invalid_env_combination_fails(monkeypatch):
    monkeypatch.setenv(envs.MEMORY_FRACTION, "0.7")
    code, data = run_json()
    assert code == 1 and not data["ok"]
    env = by_id(data)["env"]
    assert env["status"] == "fail"
    assert "VLLM_METAL_MEMORY_FRACTION=0.7" in env["summary"] and "auto" in env["fix"]
    (fraction,) = [v for v in env["details"]["variables"] if v["name"] == envs.MEMORY_FRACTION]
    assert fraction["source"] == "environment" and fraction["valid"] is False

    human = run_human()
    assert human.exit_code == 1
    assert "✗ Environment: invalid combination" in human.stdout and "1 failed" in human.stdout


def test_invalid_values_are_each_marked(monkeypatch):
    monkeypatch.setenv(envs.BLOCK_SIZE, "12")
    monkeypatch.setenv(envs.DEBUG, "maybe")
    code, data = run_json()
    env = by_id(data)["env"]
    assert code == 1 and env["status"] == "fail" and "(and 1 more)" in env["summary"]
    invalid = {v["name"] for v in env["details"]["variables"] if not v["valid"]}
    assert invalid == {envs.BLOCK_SIZE, envs.DEBUG}


def test_unbuilt_path_and_gpu_without_gpu_fail(monkeypatch):
    devices = system.MlxDevices(version="0", cpu=True)

    def unbuilt(cfg):
        if not cfg.use_mlx:
            raise envs.EnvError(f"{envs.USE_MLX}=0 is not in this release", variable=envs.USE_MLX, value="0")

    monkeypatch.setattr(envs, "check_available", unbuilt)
    check = serving.check_env({envs.USE_MLX: "0"}, devices)
    assert check.status == "fail" and check.fix == f"unset {envs.USE_MLX}"
    check = serving.check_env({envs.MLX_DEVICE: "gpu"}, devices)
    assert check.status == "fail" and "cpu" in check.fix
    assert serving.check_env({}, devices).details["device"] == "cpu"


def test_missing_entry_point_fails(monkeypatch):
    monkeypatch.setattr(plugin, "plugin_entry_points", lambda: [])
    code, data = run_json()
    check = by_id(data)["entry_point"]
    assert code == 1 and check["status"] == "fail"
    assert "entry point is missing" in check["summary"] and "install" in check["fix"]


def test_other_platform_plugin_warns(monkeypatch):
    from importlib.metadata import EntryPoint

    eps = [EntryPoint("vmetal", "vmetal:register", "vllm.platform_plugins"),
           EntryPoint("other", "other:register", "vllm.platform_plugins")]
    monkeypatch.setattr(plugin, "plugin_entry_points", lambda: eps)
    check = plugin.check_entry_point({})
    assert check.status == "warn" and "other" in check.summary and "pip uninstall other" in check.fix


def test_occupied_port_fails():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, data = run_json("--port", str(port))
    check = by_id(data)["port"]
    assert code == 1 and check["status"] == "fail"
    assert f"port {port}" in check["summary"] and "--port" in check["fix"]
    assert check["details"] == {"host": "127.0.0.1", "port": port, "free": False}


@pytest.mark.parametrize("answer, status", [
    ({}, "ok"),
    ({"timed_out": True, "platform": None}, "warn"),
    ({"platform": "vllm.platforms.cpu.CpuPlatform"}, "fail"),
    ({"platform": None, "error": "ModuleNotFoundError: No module named 'vllm'"}, "fail"),
])
def test_vllm_platform_outcomes(probe_answer, answer, status):
    probe_answer.update(answer)
    code, data = run_json()
    check = by_id(data)["vllm_platform"]
    assert check["status"] == status and code == (1 if status == "fail" else 0)


def test_target_device_cpu_is_explained(monkeypatch, probe_answer):
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    probe_answer.update(platform="vllm.platforms.cpu.CpuPlatform")
    check = by_id(run_json()[1])["vllm_platform"]
    assert check["status"] == "warn" and check["fix"] == "unset VLLM_TARGET_DEVICE"


def test_probe_timeout_kills_the_child():
    probe = plugin.VllmProbe({"PATH": "/usr/bin:/bin"}, timeout=0.3)
    result = probe.result()
    assert result["timed_out"] is True and probe.proc.poll() is not None


def test_unreachable_hub_is_a_warning_with_a_fix(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    code, data = run_json()
    hf, ms = by_id(data)["hub_huggingface"], by_id(data)["hub_modelscope"]
    assert code == 0
    assert hf["status"] == ms["status"] == "warn"
    assert hf["details"]["reachable"] is False and "HF_HUB_OFFLINE" in hf["fix"]
    assert hf["elapsed_s"] < hub.HUB_TIMEOUT_S + 1


def test_reachable_hub_is_ok(monkeypatch):
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check = hub.check_hub_huggingface({"HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}"})
    finally:
        server.shutdown()
        server.server_close()
    assert check.status == "ok" and check.details["http_status"] < 500


def test_modelscope_without_its_package_fails(monkeypatch):
    monkeypatch.setattr(hub, "dist_version", lambda name: None if name == "modelscope" else "1")
    check = hub.check_hub_modelscope({envs.USE_MODELSCOPE: "1",
                                      "MODELSCOPE_DOMAIN": f"http://127.0.0.1:{closed_port()}"})
    assert check.status == "fail" and "pip install 'modelscope'" in check.fix


def test_secrets_never_appear(monkeypatch, probe_answer):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("VLLM_API_KEY", "sk-local-key-123")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://user:hunter2pw@127.0.0.1:{closed_port()}")
    # Even a secret that reaches a message (here, the probe's error) is masked.
    probe_answer.update(platform=None, error=f"RuntimeError: bad token {SECRET}")
    for result in (run_human("-v"), runner.invoke(app, ["doctor", "--json", "--port", str(free_port())])):
        out = result.stdout + result.stderr
        assert SECRET not in out and "sk-local-key-123" not in out and "hunter2pw" not in out
        assert "****" in out
    data = json.loads(result.stdout)
    assert by_id(data)["env"]["details"]["related"]["HF_TOKEN"] == "set (masked)"


def test_secret_names():
    assert all(map(base.is_secret_name, ["HF_TOKEN", "VLLM_API_KEY", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD"]))
    assert not any(map(base.is_secret_name, ["TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE", "KEYBOARD"]))
    assert base.secret_values({"GITHUB_TOKEN": "true", "X_KEY": "abc"}) == []


def test_missing_package_fails_with_a_pip_command(monkeypatch):
    real = packages.dist_version
    monkeypatch.setattr(packages, "dist_version", lambda name: None if name == "mlx-lm" else real(name))
    check = {c.id: c for c in packages.check_packages("Linux")}["mlx_lm_version"]
    assert check.status == "fail" and "pip install 'mlx-lm==" in check.fix


def test_untested_version_warns(monkeypatch):
    real = packages.dist_version
    monkeypatch.setattr(packages, "dist_version", lambda name: "0.31.0" if name == "mlx-lm" else real(name))
    check = {c.id: c for c in packages.check_packages("Linux")}["mlx_lm_version"]
    assert check.status == "warn" and "untested" in check.summary


def test_model_fit(monkeypatch, tmp_path):
    from tests.support.checkpoints import QWEN3_06B, model_folder

    monkeypatch.setattr(system, "memory_for_mlx", lambda *a, **k: 4 * 1024**3)
    folder = model_folder(tmp_path / "qwen3", QWEN3_06B, 1_200_000_000)
    code, data = run_json("--model", str(folder))
    check = by_id(data)["model_fit"]
    assert code == 1 and check["status"] == "fail" and "--max-model-len" in check["fix"]
    assert check["details"]["kv_bytes_per_token"] == 2 * 28 * 8 * 128 * 2
    code, data = run_json("--model", str(folder), "--max-model-len", "2048")
    assert code == 0 and by_id(data)["model_fit"]["status"] == "ok"


# --- Host facts (vmetal.preflight.host) with injected values ---------------------------------------------------


def mac_sysctl(**values):
    table = {"machdep.cpu.brand_string": "Apple M2 Pro", "hw.optional.arm64": 1, "sysctl.proc_translated": 0,
             "iogpu.wired_limit_mb": 0}
    table.update({k.replace("__", "."): v for k, v in values.items()})
    return table.get


def test_host_facts_of_a_native_mac():
    facts = system.host_facts(system="Darwin", machine="arm64", sysctl=mac_sysctl(), mac_ver="14.5",
                              memory=32 * 1024**3)
    assert (facts.chip, facts.apple_silicon, facts.macos, facts.rosetta, facts.wired_limit_mb) == (
        "Apple M2 Pro", True, (14, 5), False, 0)
    assert machine.check_host(facts).status == "ok"
    assert machine.check_python_arch(facts).status == "ok"


def test_rosetta_python_on_apple_silicon_fails():
    facts = system.host_facts(system="Darwin", machine="x86_64", sysctl=mac_sysctl(sysctl__proc_translated=1),
                              mac_ver="14.5", memory=16 * 1024**3)
    assert facts.apple_silicon and facts.rosetta
    check = machine.check_python_arch(facts)
    assert check.status == "fail" and "Rosetta" in check.summary and "arm64" in check.fix


def test_intel_mac_and_old_macos_fail():
    intel = system.host_facts(system="Darwin", machine="x86_64", mac_ver="13.6", memory=1,
                              sysctl=mac_sysctl(hw__optional__arm64=None, machdep__cpu__brand_string="Intel i7"))
    assert not intel.apple_silicon and machine.check_host(intel).status == "fail"
    old = system.host_facts(system="Darwin", machine="arm64", sysctl=mac_sysctl(), mac_ver="13.2", memory=1)
    check = machine.check_host(old)
    assert check.status == "fail" and "13.5" in check.summary and check.fix


def test_linux_facts():
    facts = system.host_facts(system="Linux", machine="x86_64", memory=8 * 1024**3)
    assert facts.macos is None and facts.rosetta is None and facts.wired_limit_mb is None
    assert not facts.apple_silicon
    assert system.chip("Linux", cpuinfo="processor: 0\nmodel name\t: Some CPU 9000\n") == "Some CPU 9000"
    assert system.sysctl("iogpu.wired_limit_mb") is None or system.is_macos()


def test_memory_check_on_a_mac():
    devices = system.MlxDevices(version="0", metal=True, cpu=True,
                                info={"max_recommended_working_set_size": 11 * 1024**3})
    facts = system.host_facts(system="Darwin", machine="arm64", sysctl=mac_sysctl(), mac_ver="14.5",
                              memory=16 * 1024**3)
    assert system.memory_for_mlx(devices, total=16 * 1024**3) == 11 * 1024**3
    check = machine.check_memory(facts, devices)
    assert check.status == "ok" and "16.0 GiB unified" in check.summary and "11.0 GiB" in check.summary
    too_high = system.host_facts(system="Darwin", machine="arm64", mac_ver="14.5", memory=16 * 1024**3,
                                 sysctl=mac_sysctl(iogpu__wired_limit_mb=16000))
    check = machine.check_memory(too_high, devices)
    assert check.status == "warn" and "sudo sysctl iogpu.wired_limit_mb=" in check.fix
    # Without an MLX GPU, MLX uses system memory.
    assert system.memory_for_mlx(system.MlxDevices(cpu=True), total=123) == 123


def test_mlx_devices_here_compute():
    devices = system.mlx_devices()
    assert devices.error is None and devices.cpu and "CPU" in devices.names


def test_no_metal_on_apple_silicon_fails():
    facts = system.host_facts(system="Darwin", machine="arm64", sysctl=mac_sysctl(), mac_ver="14.5", memory=1)
    check = machine.check_mlx_devices(system.MlxDevices(version="0.32.4", cpu=True), facts)
    assert check.status == "fail" and "Metal" in check.summary and "pip install" in check.fix


# --- The Metal device: Apple silicon or a VM's paravirtual GPU (faked device_info) -------------------------------

# What mx.device_info() reports on GitHub's macos-14/15 arm64 runners (rajveer43/VeloxQuant-MLX#395).
PARAVIRTUAL_INFO = {"device_name": "Apple Paravirtual device", "architecture": "air64_v27",
                    "memory_size": 7516192768, "max_recommended_working_set_size": 5010800640}
M2_PRO_INFO = {"device_name": "Apple M2 Pro", "architecture": "applegpu_g14s",
               "memory_size": 32 * 1024**3, "max_recommended_working_set_size": 22906503168}


def metal_devices(info: dict) -> system.MlxDevices:
    return system.MlxDevices(version="0.32.4", metal=True, cpu=True, default="gpu", info=info)


def mac_facts(memory: int = 7 * 1024**3) -> system.HostFacts:
    return system.host_facts(system="Darwin", machine="arm64", sysctl=mac_sysctl(), mac_ver="15.5", memory=memory)


def test_paravirtual_device_is_named_as_a_vm():
    check = device.check_metal_device(metal_devices(PARAVIRTUAL_INFO), mac_facts())
    assert check.status == "warn" and check.summary.startswith("Apple Paravirtual device: a macOS VM's GPU")
    # What holds there and what does not, in the one line.
    for words in ("serving and behavioural tests hold", "memory", "numerics", "speed figures", "7.0 GiB memory",
                  "4.7 GiB working set"):
        assert words in check.summary, words
    assert "strict Metal tests" in check.fix
    assert check.details == {"kind": "paravirtual", "paravirtual": True, **PARAVIRTUAL_INFO}


def test_apple_silicon_device_is_ok():
    check = device.check_metal_device(metal_devices(M2_PRO_INFO), mac_facts(32 * 1024**3))
    assert check.status == "ok" and check.summary.startswith("Apple M2 Pro (Apple silicon; 32.0 GiB memory")
    assert check.details["kind"] == "apple_silicon" and check.details["paravirtual"] is False


def test_no_metal_device_off_a_mac_is_ok_and_on_a_mac_fails():
    linux = system.host_facts(system="Linux", machine="x86_64", memory=8 * 1024**3)
    check = device.check_metal_device(system.MlxDevices(version="0", cpu=True), linux)
    assert check.status == "ok" and check.summary == "none (not a Mac: MLX computes on the CPU here)"
    assert check.details["kind"] == "none" and check.details["device_name"] is None
    check = device.check_metal_device(system.MlxDevices(version="0", cpu=True), mac_facts())
    assert check.status == "fail" and check.fix


# --- The Metal kernels' self-check (issue 18, item 5): the child faked, except where it can run here -----------

AGREES = {"ok": True, "error": 2.1e-3, "tolerance": 3e-2, "device": "Device(gpu, 0)",
          "shape": "16 query / 8 KV heads x 128, block size 16, mlx.core.bfloat16"}
DISAGREES = {**AGREES, "ok": False, "error": 0.1}


def never_run(environ):
    raise AssertionError("the self-check ran where it must not")


@pytest.mark.parametrize("setting, status, words", [
    ({}, "ok", "not used: no Metal device"),
    ({"VLLM_METAL_KERNELS": "0"}, "ok", "not used: no Metal device"),
    ({"VLLM_METAL_KERNELS": "1"}, "fail", "VLLM_METAL_KERNELS=1 asks for them, but MLX has no Metal device"),
])
def test_kernels_off_metal_never_run(setting, status, words):
    check = device.check_metal_kernels(system.MlxDevices(version="0", cpu=True), setting, run=never_run)
    assert (check.status, check.details["ran"]) == (status, False) and check.summary.startswith(words)


def test_kernels_switched_off_on_metal_are_not_checked():
    check = device.check_metal_kernels(metal_devices(M2_PRO_INFO), {"VLLM_METAL_KERNELS": "0"}, run=never_run)
    assert check.status == "ok" and check.summary.startswith("off (VLLM_METAL_KERNELS=0)")


@pytest.mark.parametrize("setting, result, status, words", [
    ({}, AGREES, "ok", "paged attention agrees: relative error 2.10e-03"),
    ({"VLLM_METAL_KERNELS": "1"}, AGREES, "ok", "paged attention agrees"),
    ({}, DISAGREES, "warn", "paged attention DISAGREES: relative error 1.00e-01"),
    ({"VLLM_METAL_KERNELS": "1"}, DISAGREES, "fail", "paged attention DISAGREES"),
    ({}, {"failed": "no answer within 60 s"}, "warn", "the self-check did not finish: no answer within 60 s"),
])
def test_kernels_on_metal_report_the_self_check(setting, result, status, words):
    check = device.check_metal_kernels(metal_devices(PARAVIRTUAL_INFO), setting, run=lambda environ: result)
    assert check.status == status and check.summary.startswith(words), check.summary
    assert check.details["ran"] is True and (check.fix is None) == (status == "ok")
    if status == "warn" and "DISAGREES" in words:
        assert "pure-MLX reference instead" in check.summary  # what the engine will do
    if status == "fail":
        assert "wrong outputs" in check.summary and "unset VLLM_METAL_KERNELS" in check.fix


def test_self_check_child_prints_its_verdict(monkeypatch):
    """The child itself, for real, with the reference standing in for the kernel (off a Mac the kernel cannot
    run): doctor reads what it prints. A child that crashes is reported with its last stderr line."""
    import subprocess
    import sys

    code = ("import sys; from vmetal.engine.runner.attention import metal, reference;"
            "metal.paged_attention = lambda *a, use_kernel: reference.paged_attention(*a) * float(sys.argv[1]);"
            "sys.exit(metal.main())")
    for factor, ok in (("1.0", True), ("1.1", False)):
        proc = subprocess.run([sys.executable, "-c", code, factor], capture_output=True, text=True, timeout=120)
        verdict = json.loads(proc.stdout)
        assert (proc.returncode, verdict["ok"]) == ((0, True) if ok else (1, False))
        assert verdict["shape"].startswith("16 query / 8 KV heads x 128, block size 16")
    monkeypatch.setattr(device, "SELF_CHECK_MODULE", "vmetal.no_such_module")
    assert "No module named vmetal.no_such_module" in device.run_self_check({**os.environ})["failed"]


def test_doctor_reports_a_vm_in_text_and_json_and_fits_models_to_its_working_set(monkeypatch, tmp_path):
    """The whole command on a faked runner VM: the device line, the memory line and `--model`'s fit all use the
    paravirtual device's 4.7 GiB working set, not the 7 GiB `memory_size`."""
    from tests.support.checkpoints import QWEN3_06B, model_folder

    facts = mac_facts()
    monkeypatch.setattr(system, "host_facts", lambda: facts)
    monkeypatch.setattr(system, "mlx_devices", lambda: metal_devices(PARAVIRTUAL_INFO))
    # 4 GiB of weights at 2048 tokens: ~5.1 GiB needed, which fits in 7 GiB but not in the 4.7 GiB working set.
    folder = model_folder(tmp_path / "qwen3", QWEN3_06B, 4 * 1024**3)
    code, data = run_json("--model", str(folder), "--max-model-len", "2048")
    checks = by_id(data)
    assert checks["metal_device"]["status"] == "warn" and checks["metal_device"]["details"]["paravirtual"] is True
    assert checks["memory"]["details"]["mlx_bytes"] == PARAVIRTUAL_INFO["max_recommended_working_set_size"]
    assert "working set of its paravirtual GPU" in checks["memory"]["summary"]
    fit = checks["model_fit"]
    assert fit["status"] == "fail" and fit["details"]["available"] == 5010800640, fit
    assert "(Apple Paravirtual device: a VM)" in data["report"]

    human = run_human()
    [line] = [line for line in human.stdout.splitlines() if line.startswith("! Metal device: ")]
    assert "Apple Paravirtual device: a macOS VM's GPU, not Apple silicon" in line
    assert human.stdout.splitlines()[human.stdout.splitlines().index(line) + 1].startswith("    fix: ")


def test_disk_uses_the_cache_folders(tmp_path):
    env = {"HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "VMETAL_HOME": str(tmp_path / "vm")}
    dirs = hub.cache_dirs(env)
    assert dirs["huggingface"] == tmp_path / "hf" / "hub" and dirs["vmetal"] == tmp_path / "vm"
    assert dirs["modelscope"] == tmp_path / ".cache" / "modelscope"
    check = hub.check_disk(env)  # none of them exists yet: their nearest existing parent counts
    assert all(c["free_bytes"] is not None for c in check.details["caches"])


@pytest.mark.slow
def test_smoke_generates_through_vllm(real_probe):
    code, data = run_json("--smoke")
    smoke = by_id(data)["smoke"]
    assert smoke["status"] == "ok", smoke
    assert smoke["details"]["tokens"] == SMOKE_TOKENS and smoke["details"]["tokens_per_s"] > 0
    assert smoke["details"]["matches_mlx_lm"] is True
    assert Path(smoke["details"]["model"], "config.json").is_file()
    assert code == 0
