"""`vmetal serve --detach`, `vmetal ps`, `vmetal stop`: argument handling in-process, and real detached servers of
the tiny qwen3 model run through the console script, as a CI script runs them.

The servers' records land in this module's temporary VMETAL_HOME (tests/conftest.py). The slow tests start at
most two servers at once; a failure to start costs vLLM's import (~10 s here), the rest ~20 s per server.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from tests.support import fakes
from tests.support.fakes import still_running
from vmetal import envs
from vmetal.cli import options
from vmetal.cli.app import app
from vmetal.server import background, detached
from vmetal.server.process import check_port_free, free_port

runner = CliRunner()
SCRIPT = Path(sys.executable).with_name("vmetal")
VMETAL = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "vmetal.cli.app"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for var in envs.VARIABLES:
        monkeypatch.delenv(var.name, raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    monkeypatch.delenv(background.ID_ENV, raising=False)
    yield
    for server in background.records():  # a failed test leaves no server behind for the next one
        background.stop(server)


def vmetal(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*VMETAL, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def family(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def started_from(log: str) -> list[psutil.Process]:
    """Every live process whose environment names `log`: what one `serve --detach` started, at any depth."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(background.LOG_ENV) == log:
                found.append(proc)
        except psutil.Error:
            continue
    return still_running(found, timeout=0)


def record(model: str, pid: int = 2**22 + 1, port: int = 8000) -> background.Server:
    """A record of a server whose process is gone (no such PID)."""
    server = background.Server(id=f"{pid}-1", pid=pid, started=time.time() - 60, command="x", model=model,
                               source=f"/models/{model}", host="127.0.0.1", port=port, log=None)
    background._write(server)
    return server


# ------------------------------------------------------------------------------------ without a server


def test_json_needs_detach(monkeypatch):
    built = fakes.install(monkeypatch)  # were it let through, a stand-in would be built, not a server
    monkeypatch.setattr(options, "demo_model", lambda: "/demo")
    result = runner.invoke(app, ["serve", "--demo", "--json", "--port", str(free_port())])
    assert result.exit_code == 2 and built == []
    assert errors(result.stderr) == [("error: `--json` goes with `--detach`: a server in the foreground prints "
                                      "its log, not JSON")]


def test_ps_and_stop_with_no_server():
    result = runner.invoke(app, ["ps"])
    assert result.exit_code == 0 and result.stdout == "" and "no vmetal server is running" in result.stderr
    assert json.loads(runner.invoke(app, ["ps", "--json"]).stdout) == []
    result = runner.invoke(app, ["stop"])
    assert result.exit_code == 1 and errors(result.stderr) == ["error: no vmetal server is running"]
    result = runner.invoke(app, ["stop", "acme/x"])
    assert result.exit_code == 2 and errors(result.stderr) == ["error: no vmetal server of `acme/x` is running"]
    result = runner.invoke(app, ["stop", "--all"])
    assert result.exit_code == 0 and "no vmetal server is running" in result.stderr
    result = runner.invoke(app, ["stop", "acme/x", "--all"])
    assert result.exit_code == 2 and len(errors(result.stderr)) == 1


def test_stop_without_a_name_needs_one_when_several_are_recorded():
    record("alpha")
    record("beta", pid=2**22 + 2)
    result = runner.invoke(app, ["stop"])
    assert result.exit_code == 2
    assert errors(result.stderr) == ["error: 2 vmetal servers are recorded (alpha, beta): name one, or pass `--all`"]
    listed = json.loads(runner.invoke(app, ["ps", "--json"]).stdout)
    assert [(s["model"], s["status"], s["uptime_s"]) for s in listed] == [("alpha", "dead", None), ("beta", "dead", None)]
    result = runner.invoke(app, ["stop", "alpha"])
    assert result.exit_code == 0 and "`alpha` at http://127.0.0.1:8000/v1" in result.stderr
    assert "had already stopped" in result.stderr
    assert [s.model for s in background.records()] == ["beta"]


def test_detached_server_gets_the_arguments_of_a_foreground_one(monkeypatch, qwen3_model):
    """What `--detach` hands the background `vmetal serve` builds the same vLLM server as the command given
    in the foreground: folder, name, address, flags, the arguments after `--`; the API key only through the
    environment."""
    given = [str(qwen3_model), "--port", str(free_port()), "--max-model-len", "128", "--paged", "--block-size",
             "32", "--device", "cpu", "--api-key", "sk-detach-123", "--no-thinking", "--ready-timeout", "42",
             "--", "--max-num-batched-tokens", "256"]
    started = {}

    def fake_start(args, **kwargs):
        started.update(args=list(args), **kwargs)
        return background.Server(id="1-1", pid=4242, started=time.time(), command="x", model=kwargs["model"],
                                 source=args[0], host="127.0.0.1", port=kwargs["port"], log="/logs/x.log")

    monkeypatch.setattr(detached, "start", fake_start)
    result = runner.invoke(app, ["serve", "--detach", "--json", *given])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert (shown["pid"], shown["status"], shown["log"]) == (4242, "running", "/logs/x.log")
    assert "sk-detach-123" not in " ".join(started["args"]) and started["api_key"] == "sk-detach-123"
    assert started["ready_timeout"] == 42 and "--detach" not in started["args"] and "--json" not in started["args"]

    built = fakes.install(monkeypatch)
    assert runner.invoke(app, ["serve", *given]).exit_code == 0
    monkeypatch.setenv("VLLM_API_KEY", "sk-detach-123")
    assert runner.invoke(app, ["serve", *started["args"]]).exit_code == 0
    foreground, background_one = built
    assert foreground.model == background_one.model == str(qwen3_model)
    for key in ("host", "port", "served_model_name", "config", "vllm_args"):
        assert foreground.kwargs[key] == background_one.kwargs[key], key
    assert background_one.kwargs["served_model_name"] == str(qwen3_model)


def test_text_output_is_the_url_on_stdout_and_the_pid_on_stderr(monkeypatch):
    monkeypatch.setattr(options, "demo_model", lambda: "/demo")
    monkeypatch.setattr(detached, "start", lambda args, **kw: background.Server(
        id="1-1", pid=4242, started=time.time(), command="x", model=kw["model"], source="/demo", host="127.0.0.1",
        port=kw["port"], log="/logs/x.log"))
    port = free_port()
    result = runner.invoke(app, ["serve", "--demo", "--detach", "--port", str(port)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"http://127.0.0.1:{port}/v1\n"
    assert (f"vmetal: serving vmetal-demo at http://127.0.0.1:{port}/v1 in the background (PID 4242, log "
            "/logs/x.log); `vmetal stop vmetal-demo` stops it") in result.stderr


# ------------------------------------------------------------------------------------ real servers


@pytest.mark.slow
def test_two_detached_servers_listed_one_killed_both_stopped(qwen3_model):
    ports = {"alpha": free_port(), "beta": free_port()}
    starts = {name: subprocess.Popen([*VMETAL, "serve", str(qwen3_model), "--served-model-name", name, "--port",
                                      str(port), "--max-model-len", "128", "--max-num-seqs", "4", "--detach",
                                      *(["--json"] if name == "alpha" else [])],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for name, port in ports.items()}
    out = {name: proc.communicate(timeout=300) for name, proc in starts.items()}
    for name, proc in starts.items():
        assert proc.returncode == 0, out[name][1]
    alpha = json.loads(out["alpha"][0])
    url = {name: f"http://127.0.0.1:{port}/v1" for name, port in ports.items()}
    assert alpha["model"] == "alpha" and alpha["url"] == url["alpha"] and alpha["status"] == "running"
    assert Path(alpha["log"]).parent == envs.vmetal_home() / "logs"
    assert out["beta"][0] == url["beta"] + "\n"
    beta_pid = int(re.search(r"in the background \(PID (\d+), log ", out["beta"][1]).group(1))

    from openai import OpenAI

    reply = OpenAI(base_url=url["alpha"], api_key="-", max_retries=0, timeout=60).completions.create(
        model="alpha", prompt="Hello", max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens == 4

    # The state outlives the commands that started the servers: a fresh `vmetal ps` lists both.
    listed = vmetal("ps")
    assert listed.returncode == 0
    rows = [line.split() for line in listed.stdout.splitlines()]
    assert rows[0] == ["MODEL", "URL", "PID", "UPTIME", "STATUS"]
    assert sorted((r[0], r[1], r[2], r[4]) for r in rows[1:]) == [
        ("alpha", url["alpha"], str(alpha["pid"]), "running"), ("beta", url["beta"], str(beta_pid), "running")]
    as_json = {s["model"]: s for s in json.loads(vmetal("ps", "--json").stdout)}
    assert {m: (s["pid"], s["status"]) for m, s in as_json.items()} == {
        "alpha": (alpha["pid"], "running"), "beta": (beta_pid, "running")}
    assert all(s["uptime_s"] > 0 for s in as_json.values())

    # alpha's vLLM server (the child of the `vmetal serve` that leads its session) is killed by hand.
    alpha_family = family(alpha["pid"])
    [vllm_server] = psutil.Process(alpha["pid"]).children()
    vllm_server.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = {s["model"]: s["status"] for s in json.loads(vmetal("ps", "--json").stdout)}
        if states["alpha"] == "dead":
            break
        time.sleep(1)
    assert states == {"alpha": "dead", "beta": "running"}
    listed = vmetal("ps")
    assert sorted((r.split()[0], r.split()[-1]) for r in listed.stdout.splitlines()[1:]) == [
        ("alpha", "dead"), ("beta", "running")]
    assert "`alpha` (PID" in listed.stderr and "is dead: the vLLM server exited by itself with code -9" in listed.stderr
    assert still_running(alpha_family, timeout=10) == []
    cleared = vmetal("stop", "alpha")
    assert cleared.returncode == 0 and "had already stopped" in cleared.stderr, cleared.stderr

    # Two stops at once: one stops beta, the other finds it stopped or stopping; nothing of beta is left.
    beta_family = family(beta_pid)
    assert len(beta_family) >= 3  # vmetal serve, vLLM's server, its EngineCore (and helpers)
    stops = [subprocess.Popen([*VMETAL, "stop", "--all"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    said = [proc.communicate(timeout=120)[1] for proc in stops]
    assert [proc.returncode for proc in stops] == [0, 0], said
    assert sum(f"vmetal: stopped `beta` at {url['beta']} (PID {beta_pid})" in s for s in said) == 1, said
    assert not any("Traceback" in s for s in said)
    assert still_running(beta_family, timeout=10) == []
    check_port_free("127.0.0.1", ports["beta"])
    assert json.loads(vmetal("ps", "--json").stdout) == []


@pytest.mark.slow
def test_a_server_that_fails_to_start_makes_detach_fail_with_its_log(qwen3_model):
    started = time.monotonic()
    result = vmetal("serve", str(qwen3_model), "--port", str(free_port()), "--max-model-len", "128", "--detach",
                    "--ready-timeout", "120", "--", "--bogus-flag")
    took = time.monotonic() - started
    assert result.returncode == 1 and took < 120, (took, result.stderr)
    [line] = errors(result.stderr)
    assert line.startswith("error: the server did not start: `vmetal serve` exited with code 1; the last lines "
                           "of its log ")
    log = line.split("of its log ", 1)[1].rstrip(":")
    assert Path(log).is_file() and Path(log).parent == envs.vmetal_home() / "logs"
    assert "  vllm: error: unrecognized arguments: --bogus-flag" in result.stderr.splitlines()
    assert result.stdout == ""
    assert started_from(log) == [] and json.loads(vmetal("ps", "--json").stdout) == []


@pytest.mark.slow
def test_detach_stops_a_server_that_does_not_answer_in_time(qwen3_model):
    port = free_port()
    result = vmetal("serve", str(qwen3_model), "--port", str(port), "--detach", "--ready-timeout", "3")
    assert result.returncode == 1
    [line] = errors(result.stderr)
    assert line.startswith("error: the server did not answer within 3 s and was stopped; the last lines of its log")
    assert "hint: a large model may need longer: raise `--ready-timeout`" in result.stderr
    log = re.search(r"of its log (\S+?):?$", line).group(1)
    assert started_from(log) == []
    check_port_free("127.0.0.1", port)
    assert json.loads(vmetal("ps", "--json").stdout) == []
    assert os.path.getsize(log) > 0
