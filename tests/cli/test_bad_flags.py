"""Every CLI flag with an out-of-range or malformed value, every ENV.md variable with malformed values:
exit 2 with an error that names the flag or variable, and nothing started.

The numeric and choice flags are found by walking the app itself, so a flag added later is swept too, in three
tests (outside the flag's bounds, not a number, not a choice): only the bounds are vmetal's own rules, the rest
is Click's parsing, checked once per kind rather than once per flag. Flags whose values the commands validate
themselves are listed by hand, one test per rule. tests/unit/test_envs.py checks each parser;
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


# Click's own type parsing, by kind of malformation: each test sweeps every flag of that type (one run of the
# command per flag and value) and reports all that let a bad value through, so the count of tests says what
# is checked, not how many flags there are.
def _options():
    for path, command in _commands(typer.main.get_command(app)):
        for option in command.params:
            if option.param_type_name == "option" and not option.is_flag:
                yield path, option


def _kind(option) -> str | None:
    annotation = option.type_descriptor.annotation
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "choice"
    return {int: "int", float: "float"}.get(annotation)


def _bad_values(option, kind: str) -> list[str]:
    """The values of `kind` that `option` must refuse: "range" is vmetal's own bounds (its `min`/`max`),
    the others are Click's parsing."""
    typ = _kind(option)
    if kind == "range":
        if typ not in ("int", "float"):
            return []
        step = 1 if typ == "int" else 0.5
        return ([str(option.min - step)] if option.min is not None else []) + \
               ([str(option.max + step)] if option.max is not None else [])
    if kind == "malformed":
        return {"int": ["abc", "", "1.5"], "float": ["abc", "", "nan"]}.get(typ, [])
    return ["bogus-choice"] if typ == "choice" else []


def _sweep(kind: str) -> list[tuple[list[str], str]]:
    return [([*path, option.opts[0], value, *ARGS.get(path[0], [])], option.opts[0])
            for path, option in _options() for value in _bad_values(option, kind)]


@pytest.mark.parametrize("kind", ["range", "malformed", "choice"])
def test_every_typed_flag_refuses_a_bad_value(kind):
    """Exit 2, an error naming the flag, no traceback: for each bounded flag outside its bounds, each number
    flag given a non-number (or NaN), each choice flag given an unknown choice."""
    cases = _sweep(kind)
    assert len(cases) >= {"range": 20, "malformed": 45, "choice": 3}[kind]
    wrong = []
    for argv, flag in cases:
        r = runner.invoke(app, argv)
        text = _error_text(r)
        if r.exit_code != 2 or not (f"'{flag}'" in text or f"`{flag}`" in text) or "Traceback" in r.output:
            wrong.append((argv, r.exit_code, text[-200:]))
    assert wrong == []


def test_the_sweep_covers_every_numeric_and_choice_flag():
    flags = {(path[0], option.opts[0]) for path, option in _options() if _kind(option)}
    for expected in [("serve", "--port"), ("serve", "--max-model-len"), ("serve", "--ready-timeout"),
                     ("serve", "--device"), ("doctor", "--probe-timeout"), ("chat", "--top-p"),
                     ("chat", "--temperature"), ("pull", "--max-model-len"), ("bench", "--num-prompts")]:
        assert expected in flags
    bounded = {(c[0][0], c[1]) for c in _sweep("range")}
    assert {("serve", "--port"), ("chat", "--top-p"), ("doctor", "--probe-timeout")} <= bounded


# Flags whose values the commands check themselves: (argv with {} for the value, the bad values, the name the
# error must carry).
VALIDATED = [
    (["serve", "--demo", "--paged", "--memory-fraction", "{}"], ["1.5", "0", "-0.1", "abc", "nan", "inf"],
     "VLLM_METAL_MEMORY_FRACTION"),
    (["serve", "--demo", "--memory-fraction", "{}"], ["0.5"], "VLLM_METAL_MEMORY_FRACTION"),  # needs --paged
    (["serve", "--demo", "--block-size", "{}"], ["12", "0", "-16", "64", "1024"], "VLLM_METAL_BLOCK_SIZE"),
    (["serve", "--demo", "--host", "{}"], ["no such host!"], "no such host!"),
    (["serve", "--demo", "--api-key", "{}"], ["", "   "], "--api-key"),
    (["serve", "{}", "--demo"], ["acme/x"], "--demo"),
    (["serve", "{}"], ["./no/such/folder"], "./no/such/folder"),
    (["pull", "acme/x", "--source", "{}"], ["bogus"], "bogus"),
    (["pull", "acme/x", "--revision", "{}"], ["../../etc", "/abs"], "{}"),
    (["pull", "{}"], ["./no/such/folder"], "./no/such/folder"),
    (["rm", "acme/x", "--source", "{}"], ["bogus"], "bogus"),
    (["rm", "{}", "--yes"], ["acme/x"], "acme/x"),
    (["bench", "online", "--url", "http://127.0.0.1:9/v1", "--concurrency", "{}"], ["0,8", "abc", "-1"],
     "--concurrency"),
    (["bench", "online", "--url", "http://127.0.0.1:9/v1", "--request-rate", "{}"], ["-1", "abc"],
     "--request-rate"),
    (["bench", "online", "--url", "http://127.0.0.1:9/v1", "--compare", "{}"], ["mlx,bogus"], "--compare"),
    (["bench", "online", "--url", "http://127.0.0.1:9/v1", "--serve-args", "{}"], ['"unclosed'], "--serve-args"),
    (["bench", "online", "--url", "http://127.0.0.1:9/v1", "--dataset", "{}"], ["/no/such.jsonl"],
     "/no/such.jsonl"),
    (["bench", "offline", "--compare", "{}"], ["bogus"], "--compare"),
    (["completion", "{}"], ["tcsh"], "tcsh"),
    (["serve", "--demo", "{}"], ["--json"], "--detach"),  # JSON is what a detached server prints
    (["serve", "--demo", "--detach", "--", "{}"], ["--headless"], "`--headless` node serves none"),
    (["stop", "{}"], ["acme/x"], "acme/x"),  # no server of it
    (["stop", "acme/x", "{}"], ["--all"], "--all"),
]


@pytest.mark.parametrize("argv, values, name", VALIDATED, ids=[" ".join(a[:4]) for a, _, _ in VALIDATED])
def test_out_of_range_validated_flag(argv, values, name):
    for value in values:
        r = runner.invoke(app, [a.replace("{}", value) for a in argv])
        assert r.exit_code == 2, (value, r.output)
        named = name.replace("{}", value)
        lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        if lines:
            assert len(lines) == 1 and named in lines[0], r.stderr
        else:  # a Click usage error (an argument's choices), in Typer's panel
            assert "Invalid value" in _error_text(r) and named in _error_text(r)
        assert "Traceback" not in r.output


def _error_text(result) -> str:
    # Typer renders Click's usage errors in a panel; vmetal's own are `error: …` lines.
    return " ".join(result.stderr.replace("│", " ").split())


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
    envs.RING_PORT: ["0", "80", "70000", "65530", "abc", "1.5", "-1"],
    envs.COMPILE: ["2", "on", "compiled"],
    envs.PACKED_PROJECTIONS: ["2", "on", "packed"],
    envs.LAUNCH_THREAD: ["2", "on", "threaded", "automatic"],
}


def test_every_variable_of_env_md_is_swept():
    assert set(MALFORMED) == {v.name for v in envs.VARIABLES}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_variable_stops_serve(monkeypatch, name):
    if name == envs.MEMORY_FRACTION:
        monkeypatch.setenv(envs.USE_PAGED_ATTENTION, "1")  # where a fraction is allowed at all
    for value in MALFORMED[name]:
        monkeypatch.setenv(name, value)
        envs.get_config.cache_clear()
        r = runner.invoke(app, ["serve", "--demo", "--port", str(free_port())])
        assert r.exit_code == 2, (value, r.output)
        [line] = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert f"{name}=" in line and "expected" in line, (value, line)
        assert "Traceback" not in r.output


def test_nan_never_passes_a_float_range():
    # Click's own range check lets NaN through (every comparison with it is false); Typer's does not.
    assert not (math.nan < 1)
    r = runner.invoke(app, ["serve", "--demo", "--ready-timeout", "nan"])
    assert r.exit_code == 2
