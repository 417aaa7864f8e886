"""`--api-key` guards every endpoint but `/health`, a public bind without a key warns, secrets stay out of logs.

The slow test starts a real `vmetal -v serve` (vLLM's OpenAI server with the plugin) with a key and walks every
route its OpenAPI schema lists: without the key, or with a wrong one, each answers 401; with it, the OpenAI,
Anthropic and Prometheus endpoints answer 200. vLLM 0.32 itself guards only `/v1`, `/v2`, `/inference`,
`/cohere`; `vmetal.server.api_auth` closes the rest.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest
from typer.testing import CliRunner

from tests.support import fakes
from tests.support.cli_server import CliServer
from vmetal import envs
from vmetal.cli import options
from vmetal.cli.app import app
from vmetal.server.process import API_AUTH_MIDDLEWARE, API_KEYS_ENV, ServerProcess, free_port, passthrough_api_keys

runner = CliRunner()
KEY = "vmk-3f9c2e7a51d04b86"
HF_SECRET = "hf_TopSecretToken0123456789"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for var in envs.VARIABLES:
        monkeypatch.delenv(var.name, raising=False)
    for var in ("VLLM_API_KEY", API_KEYS_ENV, "VLLM_LOGGING_LEVEL"):
        monkeypatch.delenv(var, raising=False)
    # `-v` sets VLLM_METAL_DEBUG and VLLM_LOGGING_LEVEL in this process; both restored after each test.
    monkeypatch.setenv("VLLM_METAL_DEBUG", "0")


# ------------------------------------------------------------------------- how the server is started


def test_key_from_the_flag_guards_every_route():
    server = ServerProcess("/m", api_key=KEY, environ={})
    assert server.argv[server.argv.index("--middleware") + 1] == API_AUTH_MIDDLEWARE
    assert server.environ["VLLM_API_KEY"] == KEY and API_KEYS_ENV not in server.environ
    assert KEY not in " ".join(server.argv)  # not in `ps` output


def test_key_after_double_dash_guards_every_route_too():
    server = ServerProcess("/m", environ={}, vllm_args=["--api-key", "a1b2c3", "x9y8z7", "--max-num-seqs", "2"])
    assert API_AUTH_MIDDLEWARE in server.argv
    assert server.environ[API_KEYS_ENV] == "a1b2c3\nx9y8z7"
    assert passthrough_api_keys(["--api-key=k1k1", "--port", "1"]) == ["k1k1"]


def test_no_key_no_guard_and_a_stale_key_list_is_dropped():
    server = ServerProcess("/m", environ={API_KEYS_ENV: "stale-key"})
    assert "--middleware" not in server.argv and API_KEYS_ENV not in server.environ


def test_middleware_keys_follow_vllms_precedence():
    from vmetal.server.api_auth import configured_keys

    assert configured_keys({"VLLM_API_KEY": "env-key", API_KEYS_ENV: "p1\np2"}) == ["p1", "p2"]
    assert configured_keys({"VLLM_API_KEY": "env-key"}) == ["env-key"]
    assert configured_keys({}) == []


# ------------------------------------------------------------------------- the CLI's warnings


@pytest.fixture
def fake(monkeypatch):
    fakes.install(monkeypatch)
    monkeypatch.setattr(options, "demo_model", lambda: "/demo")


@pytest.mark.parametrize("host, key_args, warned", [
    ("0.0.0.0", [], True),
    ("0.0.0.0", ["--api-key", KEY], False),
    ("0.0.0.0", ["--", "--api-key", KEY], False),   # vLLM's own flag counts as a key too
    ("127.0.0.1", [], False),
    ("localhost", [], False),
])
def test_public_bind_without_a_key_warns(fake, host, key_args, warned):
    flags = [a for a in key_args if a != "--"] if "--" not in key_args else []
    after = key_args[key_args.index("--"):] if "--" in key_args else []
    r = runner.invoke(app, ["serve", "--demo", "--host", host, "--port", str(free_port()), *flags, *after])
    assert r.exit_code == 0, r.output
    assert ("accepts connections from other machines" in r.stderr) is warned
    assert KEY not in r.output


def test_trust_remote_code_is_said_when_on(fake):
    r = runner.invoke(app, ["serve", "--demo", "--port", str(free_port())])
    assert "trust-remote-code" not in r.stderr
    r = runner.invoke(app, ["serve", "--demo", "--port", str(free_port()), "--", "--trust-remote-code"])
    assert r.exit_code == 0 and "warning: `--trust-remote-code` is on" in r.stderr


# ------------------------------------------------------------------------- secrets in debug output


def test_pull_debug_output_masks_token_and_url_credentials(monkeypatch, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("VMETAL_HOME", str(tmp_path / "vmetal"))
    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    monkeypatch.setenv("HF_ENDPOINT", f"http://hubuser:hunter2pw@127.0.0.1:{closed}")
    r = runner.invoke(app, ["-v", "pull", "acme/x"])
    assert r.exit_code == 1, r.output
    assert "Traceback" in r.stderr and "error: cannot reach" in r.stderr  # -v really printed details
    assert HF_SECRET not in r.output and "hunter2pw" not in r.output and "****" in r.output


def test_verbose_turns_on_vllms_debug_logs_unless_the_user_chose_a_level(monkeypatch):
    assert runner.invoke(app, ["-v", "list"]).exit_code == 0
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG" and os.environ["VLLM_METAL_DEBUG"] == "1"
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "WARNING")
    assert runner.invoke(app, ["-v", "list"]).exit_code == 0
    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"


# ------------------------------------------------------------------------- a real server


def _request(base: str, method: str, path: str, key: str | None, body: dict | None = None) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture(scope="module")
def keyed_server(qwen3_model, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("keyed") / "serve.log"
    env = {**os.environ, "HF_TOKEN": HF_SECRET, "VLLM_METAL_DEBUG": "0"}
    env.pop("VLLM_API_KEY", None)
    # The key reaches vLLM on its own command line (after `--`), which vLLM prefers and logs among its
    # arguments: both the guard and the masking are exercised by the harder path.
    argv = ["-v", "serve", str(qwen3_model), "--port", str(port), "--max-model-len", "256", "--served-model-name",
            "m", "--", "--api-key", KEY]
    with CliServer(argv, log, env) as server:
        server.wait_for()
        yield f"http://127.0.0.1:{port}", log


@pytest.mark.slow
def test_every_route_but_health_needs_the_key(keyed_server):
    base, _ = keyed_server
    status, text = _request(base, "GET", "/openapi.json", KEY)
    assert status == 200
    routes = [(m.upper(), p) for p, ops in json.loads(text)["paths"].items() for m in ops]
    assert len(routes) >= 20
    unguarded = []
    for method, path in routes:
        concrete = path.replace("{response_id}", "x").replace("{", "").replace("}", "")
        for key in (None, "wrong-key"):
            status, _ = _request(base, method, concrete, key, {} if method != "GET" else None)
            if (status == 401) == (path == "/health"):
                unguarded.append((method, path, key, status))
    assert unguarded == []
    for path in ("/openapi.json", "/docs", "/metrics"):
        assert _request(base, "GET", path, None)[0] == 401
    assert _request(base, "GET", "/health", None)[0] == 200


@pytest.mark.slow
@pytest.mark.parametrize("method, path, body", [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"model": "m", "prompt": "Hello", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                                      "max_tokens": 2}),
    ("POST", "/v1/messages", {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    ("GET", "/metrics", None),
    ("POST", "/tokenize", {"model": "m", "prompt": "Hello"}),
    ("POST", "/invocations", {"model": "m", "prompt": "Hello", "max_tokens": 2}),
])
def test_the_key_opens_them(keyed_server, method, path, body):
    base, _ = keyed_server
    assert _request(base, method, path, None, body)[0] == 401
    assert _request(base, method, path, KEY[:-1], body)[0] == 401
    status, text = _request(base, method, path, KEY, body)
    assert status == 200, text


@pytest.mark.slow
def test_server_log_holds_no_secret(keyed_server):
    base, log = keyed_server
    # A request of its own: the engine's debug lines are written per step, and this test may run first.
    status, body = _request(base, "POST", "/v1/completions", KEY, {"model": "m", "prompt": "Hi", "max_tokens": 2})
    assert status == 200, body
    text = log.read_text()
    assert "vmetal: serving m" in text and "DEBUG" in text  # -v: vLLM's debug logs were on
    assert KEY not in text and HF_SECRET not in text
