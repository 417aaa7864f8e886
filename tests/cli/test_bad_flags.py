"""Every CLI flag with an out-of-range or malformed value, every ENV.md variable with malformed values:
exit 2 with an error that names the flag or variable, and nothing started.

The numeric and choice flags are found by walking the app itself, so a flag added later is swept too; flags
whose values the commands validate themselves are listed by hand. tests/unit/test_envs.py checks each parser;
here every variable goes through `vmetal serve` as a user meets it. A value that slipped through would start
a server: `ServerProcess.start` is replaced by one that fails the test.
"""

from __future__ import annotations

import enum
import math

import pytest
import typer
from typer.testing import CliRunner

from vmetal import envs
from vmetal.cli.app import app
from vmetal.server.process import ServerProcess, free_port

runner = CliRunner()

# The positional arguments a command needs before it looks at anything else.
ARGS = {"pull": ["acme/x"], "rm": ["acme/x"], "convert": ["acme/x"], "serve": ["--demo"], "completion": ["bash"]}


@pytest.fixture(autouse=True)
def nothing_starts(monkeypatch, tmp_path):
    def refuse(self):
        raise AssertionError(f"a server was started with {self.argv}")

    monkeypatch.setattr(ServerProcess, "start", refuse)
    monkeypatch.setenv("VMETAL_HOME", str(tmp_path / "vmetal"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in envs.VARIABLES:
        monkeypatch.delenv(var.name, raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)


def _commands(command, path=()):
    subs = getattr(command, "commands", None)
    if subs:
        for name, sub in subs.items():
            yield from _commands(sub, (*path, name))
    else:
        yield path, command


def _bad_values(option) -> list[str]:
    annotation = option.type_descriptor.annotation
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return ["bogus-choice"]
    if annotation not in (int, float):
        return []
    bad = ["abc", ""]
    if option.min is not None:
        bad.append(str(option.min - 1) if annotation is int else str(option.min - 0.5))
    if option.max is not None:
        bad.append(str(option.max + 1))
    if annotation is float:
        bad.append("nan")
    if annotation is int:
        bad.append("1.5")
    return bad


def typed_cases() -> list[tuple[list[str], str, str]]:
    out = []
    for path, command in _commands(typer.main.get_command(app)):
        for option in command.params:
            if option.param_type_name != "option" or option.is_flag:
                continue
            for value in _bad_values(option):
                out.append(([*path, option.opts[0], value, *ARGS.get(path[0], [])], option.opts[0], value))
    return out


TYPED = typed_cases()

# Flags whose values the commands check themselves: (argv, the name the error must carry).
VALIDATED = [
    (["serve", "--demo", "--paged", "--memory-fraction", v], "VLLM_METAL_MEMORY_FRACTION")
    for v in ("1.5", "0", "-0.1", "abc", "nan", "inf")
] + [
    (["serve", "--demo", "--memory-fraction", "0.5"], "VLLM_METAL_MEMORY_FRACTION"),  # needs --paged
] + [
    (["serve", "--demo", "--block-size", v], "VLLM_METAL_BLOCK_SIZE") for v in ("12", "0", "-16", "64", "1024")
] + [
    (["serve", "--demo", "--host", "no such host!"], "no such host!"),
    (["serve", "--demo", "--api-key", ""], "--api-key"),
    (["serve", "--demo", "--api-key", "   "], "--api-key"),
    (["serve", "acme/x", "--demo"], "--demo"),
    (["serve", "./no/such/folder"], "./no/such/folder"),
    (["pull", "acme/x", "--source", "bogus"], "bogus"),
    (["pull", "acme/x", "--revision", "../../etc"], "../../etc"),
    (["pull", "acme/x", "--revision", "/abs"], "/abs"),
    (["pull", "./no/such/folder"], "./no/such/folder"),
    (["rm", "acme/x", "--source", "bogus"], "bogus"),
    (["rm", "acme/x", "--yes"], "acme/x"),
    (["bench", "online", "--url", "http://127.0.0.1:9/v1", "--concurrency", "0,8"], "--concurrency"),
    (["bench", "online", "--url", "http://127.0.0.1:9/v1", "--concurrency", "abc"], "--concurrency"),
    (["bench", "online", "--url", "http://127.0.0.1:9/v1", "--concurrency", "-1"], "--concurrency"),
    (["bench", "online", "--url", "http://127.0.0.1:9/v1", "--request-rate", "-1"], "--request-rate"),
    (["bench", "online", "--url", "http://127.0.0.1:9/v1", "--request-rate", "abc"], "--request-rate"),
    (["bench", "online", "--url", "http://127.0.0.1:9/v1", "--compare", "mlx,bogus"], "--compare"),
    (["bench", "online", "--url", "http://127.0.0.1:9/v1", "--serve-args", '"unclosed'], "--serve-args"),
    (["bench", "online", "--url", "http://127.0.0.1:9/v1", "--dataset", "/no/such.jsonl"], "/no/such.jsonl"),
    (["bench", "offline", "--compare", "bogus"], "--compare"),
    (["completion", "tcsh"], "tcsh"),
    (["serve", "--demo", "--json"], "--detach"),  # JSON is what a detached server prints
    (["stop", "acme/x"], "acme/x"),  # no server of it
    (["stop", "acme/x", "--all"], "--all"),
]


def _error_text(result) -> str:
    # Typer renders Click's usage errors in a panel; vmetal's own are `error: …` lines.
    return " ".join(result.stderr.replace("│", " ").split())


@pytest.mark.parametrize("argv, flag, value", TYPED, ids=[" ".join(c[0][:3]) for c in TYPED])
def test_out_of_range_typed_flag(argv, flag, value):
    r = runner.invoke(app, argv)
    assert r.exit_code == 2, (argv, r.output)
    text = _error_text(r)
    assert f"'{flag}'" in text or f"`{flag}`" in text, text
    assert "Traceback" not in r.output


def test_the_sweep_covers_every_numeric_and_choice_flag():
    flags = {(c[0][0], c[1]) for c in TYPED}
    for expected in [("serve", "--port"), ("serve", "--max-model-len"), ("serve", "--ready-timeout"),
                     ("serve", "--device"), ("doctor", "--probe-timeout"), ("chat", "--top-p"),
                     ("chat", "--temperature"), ("pull", "--max-model-len"), ("bench", "--num-prompts")]:
        assert expected in flags
    assert len(TYPED) >= 80


@pytest.mark.parametrize("argv, name", VALIDATED, ids=[" ".join(a[:4]) for a, _ in VALIDATED])
def test_out_of_range_validated_flag(argv, name):
    r = runner.invoke(app, argv)
    assert r.exit_code == 2, (argv, r.output)
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    if lines:
        assert len(lines) == 1 and name in lines[0], r.stderr
    else:  # a Click usage error (an argument's choices), in Typer's panel
        assert "Invalid value" in _error_text(r) and name in _error_text(r)
    assert "Traceback" not in r.output


# ------------------------------------------------------------------------------------ ENV.md variables

MALFORMED = {
    envs.MEMORY_FRACTION: ["0", "1.01", "-0.5", "abc", "nan", "inf", "0,7", "70%"],
    envs.USE_MLX: ["2", "on", "enabled", "-1", "1.0"],
    envs.MLX_DEVICE: ["tpu", "metal", "cuda", "gpu0", "0"],
    envs.BLOCK_SIZE: ["0", "12", "-16", "64", "16.0", "abc", "1e1"],
    envs.USE_PAGED_ATTENTION: ["2", "on", "paged", "yes please"],
    envs.DEBUG: ["2", "verbose", "on"],
    envs.USE_MODELSCOPE: ["2", "maybe", "modelscope"],
    envs.MODELSCOPE_CACHE: ["relative/cache", "~/cache", "./cache"],
    envs.PREFIX_CACHE: ["2", "enable", "on"],
    envs.PREFIX_CACHE_FRACTION: ["0", "1.5", "-0.1", "abc", "nan", "inf"],
    envs.KERNELS: ["2", "automatic", "metal", "on"],
}
ENV_CASES = [(name, value) for name, values in MALFORMED.items() for value in values]


def test_every_variable_of_env_md_is_swept():
    assert set(MALFORMED) == {v.name for v in envs.VARIABLES}


@pytest.mark.parametrize("name, value", ENV_CASES, ids=[f"{n}={v}" for n, v in ENV_CASES])
def test_malformed_variable_stops_serve(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    if name == envs.MEMORY_FRACTION:
        monkeypatch.setenv(envs.USE_PAGED_ATTENTION, "1")  # where a fraction is allowed at all
    r = runner.invoke(app, ["serve", "--demo", "--port", str(free_port())])
    assert r.exit_code == 2, r.output
    [line] = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert f"{name}=" in line and "expected" in line
    assert "Traceback" not in r.output


def test_nan_never_passes_a_float_range():
    # Click's own range check lets NaN through (every comparison with it is false); Typer's does not.
    assert not (math.nan < 1)
    r = runner.invoke(app, ["serve", "--demo", "--ready-timeout", "nan"])
    assert r.exit_code == 2
