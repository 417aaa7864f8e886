"""`vmetal serve`'s tool-call parser choice, `--reasoning-parser` and `--no-thinking`: what reaches vLLM's
command line and what the user reads, without starting a server (the real server is tests/server/test_api_compat.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.support import fakes
from vmetal import demo, envs
from vmetal.cli import options
from vmetal.cli.app import app
from vmetal.server import parsers
from vmetal.server.process import free_port

runner = CliRunner()

NO_THINKING = ["--default-chat-template-kwargs", '{"enable_thinking": false}']


@pytest.fixture(autouse=True)
def fake_server(monkeypatch):
    for var in envs.VARIABLES:
        monkeypatch.delenv(var.name, raising=False)
    return fakes.install(monkeypatch)


def model_folder(path: Path, model_type: str, template: str | None, *, jinja: bool = False) -> Path:
    """A folder with only what the parser choice reads: config.json and the chat template."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    if template is not None and jinja:
        (path / "chat_template.jinja").write_text(template)
    elif template is not None:
        (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return path


@pytest.fixture
def served(qwen3_model, tmp_path):
    """A real tiny model folder (serve checks its files) whose family and chat template a test sets."""
    import shutil

    def make(model_type: str, template: str) -> Path:
        folder = tmp_path / model_type
        shutil.copytree(qwen3_model, folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
        tok = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**tok, "chat_template": template}))
        return folder

    return make


def invoke(*args: str):
    return runner.invoke(app, ["serve", "--port", str(free_port()), *args])


def tools_line(stderr: str) -> str:
    (line,) = [line for line in stderr.splitlines() if line.startswith("vmetal: tool calls: ")]
    return line


# Templates as the families ship them, reduced to the part the choice reads.
QWEN3 = "{% if tools %}<tools>{{ tools }}</tools> ... <tool_call>\n{\"name\": ...}\n</tool_call>{% endif %}"
QWEN3_CODER = "{% if tools %}<tool_call>\n<function={{ name }}>\n<parameter=x>{% endif %}"
LLAMA31 = "{% if tools %}{{ tools }}{% endif %}{{ '<|python_tag|>' }}<|eot_id|>"
LLAMA32 = "{%- if tools is not none %}Given the following functions ... ipython{% endif %}<|eot_id|>"
MISTRAL = "{% if tools %}[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]"
PLAIN = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.mark.parametrize("model_type, template, jinja, parser", [
    ("qwen3", QWEN3, False, "hermes"),
    ("qwen2", QWEN3, True, "hermes"),  # chat_template.jinja beside the tokenizer, as newer checkpoints ship it
    ("qwen3_moe", QWEN3_CODER, False, "qwen3_coder"),
    ("llama", LLAMA31, False, "llama3_json"),
    ("llama", LLAMA32, False, "llama3_json"),  # renders tools, no marker: the family's format
    ("mistral", MISTRAL, False, "mistral"),
    ("llama", QWEN3, False, "hermes"),  # a Llama fine-tuned on Hermes tool calls: its template decides
    ("qwen3", demo.CHAT_TEMPLATE, False, "hermes"),  # the demo model
    # vLLM serves gpt-oss in Harmony whatever its template says, and starts with no other tool parser beside it.
    ("gpt_oss", QWEN3, False, "openai"),
    ("gpt_oss", None, False, "openai"),
])
def test_parser_follows_the_chat_template_and_family(tmp_path, model_type, template, jinja, parser):
    folder = model_folder(tmp_path / "m", model_type, template, jinja=jinja)
    assert parsers.pick_tool_parser(folder).name == parser


@pytest.mark.parametrize("model_type, template, reason", [
    ("llama", PLAIN, "chat template does not render tools"),
    ("qwen3", None, "has no chat template"),
    ("gemma", "{% if tools %}{{ tools }}{% endif %}", "no known tool-call format for a gemma model"),
])
def test_no_parser_when_the_model_cannot_tell(tmp_path, model_type, template, reason):
    choice = parsers.pick_tool_parser(model_folder(tmp_path / "m", model_type, template))
    assert choice.name is None and reason in choice.reason


def test_chosen_parser_reaches_vllm_and_is_said_in_one_line(fake_server, served):
    folder = served("qwen3", QWEN3)
    result = invoke(str(folder))
    assert result.exit_code == 0, result.output
    assert fake_server[0].vllm_args == ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    assert tools_line(result.stderr) == (
        "vmetal: tool calls: `hermes` parser (qwen3 model, its chat template uses <tool_call> JSON tool "
        "calls); change with --tool-call-parser NAME, switch off with --no-tool-parser")


def test_no_parser_is_said_and_nothing_is_passed(fake_server, served):
    folder = served("llama", PLAIN)
    result = invoke(str(folder))
    assert result.exit_code == 0, result.output
    assert fake_server[0].vllm_args == []
    line = tools_line(result.stderr)
    assert "no parser (the llama model's chat template does not render tools)" in line
    assert "--tool-call-parser NAME" in line


def test_user_choice_wins_and_after_double_dash_wins_over_it(fake_server, served):
    folder = served("qwen3", QWEN3)
    result = invoke(str(folder), "--tool-call-parser", "llama3_json")
    assert result.exit_code == 0, result.output
    assert fake_server[0].vllm_args == ["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"]
    assert "`llama3_json` parser (`--tool-call-parser`)" in tools_line(result.stderr)

    result = invoke(str(folder), "--tool-call-parser", "llama3_json", "--", "--tool-call-parser", "mistral")
    assert result.exit_code == 0, result.output
    # vLLM's argparse keeps the last occurrence: the one after `--`.
    assert fake_server[1].vllm_args[-2:] == ["--tool-call-parser", "mistral"]
    assert "`mistral` parser (given after `--`)" in tools_line(result.stderr)


def test_no_tool_parser_switches_auto_tool_choice_off(fake_server, served):
    folder = served("qwen3", QWEN3)
    result = invoke(str(folder), "--no-tool-parser")
    assert result.exit_code == 0, result.output
    assert fake_server[0].vllm_args == []
    assert "no parser (`--no-tool-parser`)" in tools_line(result.stderr)


def test_reasoning_parser_and_no_thinking_reach_vllm(fake_server, served):
    folder = served("qwen3", QWEN3)
    result = invoke(str(folder), "--reasoning-parser", "qwen3", "--no-thinking", "--max-model-len", "256")
    assert result.exit_code == 0, result.output
    assert fake_server[0].vllm_args == ["--max-model-len", "256", "--enable-auto-tool-choice",
                                        "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3",
                                        *NO_THINKING]
    # After `--`, the user's own defaults come last and win.
    mine = '{"enable_thinking": true, "x": 1}'
    result = invoke(str(folder), "--no-thinking", "--", "--default-chat-template-kwargs", mine)
    assert result.exit_code == 0, result.output
    assert fake_server[1].vllm_args[-4:] == [*NO_THINKING, "--default-chat-template-kwargs", mine]


@pytest.mark.parametrize("args, kind, known", [
    (["--tool-call-parser", "hermess"], "tool", "hermes"),
    (["--reasoning-parser", "qwen4"], "reasoning", "qwen3"),
])
def test_unknown_parser_exits_2_listing_the_valid_ones(fake_server, monkeypatch, args, kind, known):
    built = []
    monkeypatch.setattr(options, "demo_model", lambda: built.append(1) or "/demo")
    result = invoke("--demo", *args)
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: `{args[0]} {args[1]}` is not a {kind} parser vLLM knows; valid: ")
    assert f" {known}," in line and ", ".join(parsers.registered(kind)) in line
    assert fake_server == [] and built == []  # nothing started, not even the demo model built


def test_both_parser_and_no_parser_exit_2(fake_server):
    result = invoke("--demo", "--tool-call-parser", "hermes", "--no-tool-parser")
    assert result.exit_code == 2 and "`--tool-call-parser` or `--no-tool-parser`, not both" in result.stderr
    assert fake_server == []


def test_parser_plugin_after_double_dash_leaves_the_name_to_vllm(fake_server, monkeypatch):
    monkeypatch.setattr(options, "demo_model", lambda: "/demo")
    result = invoke("--demo", "--tool-call-parser", "my_parser", "--", "--tool-parser-plugin", "/p.py")
    assert result.exit_code == 0, result.output
    assert fake_server[0].vllm_args == ["--enable-auto-tool-choice", "--tool-call-parser", "my_parser",
                                        "--tool-parser-plugin", "/p.py"]


def test_unknown_parser_is_refused_without_importing_vllm():
    # The console-script path in a fresh interpreter: the names come from vLLM's source, not its import
    # (which takes ~10 s).
    proc = fakes.run_main_fresh(["serve", "--demo", "--tool-call-parser", "nope"])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: `--tool-call-parser nope` is not a tool parser vLLM knows; valid: ")
