"""`vmetal chat` in a real pseudo-terminal and in scripts, against one real server of the tiny model.

The module's server is `ServerProcess` on the tiny random qwen3 model, served as `vmetal-demo` (the name
`vmetal serve --demo` uses). Its replies are random text that never ends by itself, so every reply runs to
max_tokens: long replies (to watch them stream and to interrupt them) and short ones are a setting away.
The interactive tests drive the `vmetal chat` console script through pexpect, as a user at a terminal
would; the script tests run it with pipes and check stdout, stderr and the exit code. A few tests of the
session logic (no server, no terminal) come first.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import psutil
import pytest

from vmetal.chat.client import ChatClient, Delta
from vmetal.chat.session import ChatError, Conversation, parse_command, parse_setting
from vmetal.cli.chat import repl as chat_repl
from vmetal.cli.chat import view as chat_view
from vmetal.server.process import ServerProcess, free_port

pytestmark = pytest.mark.slow

SERVED = "vmetal-demo"
MAX_MODEL_LEN = 512
# The prompt as readline draws it: after a newline, possibly behind terminal control sequences.
PROMPT = r"\n(?:\x1b\[[0-9;?]*[A-Za-z])*>>> "
STATS = r"\d+ tokens? · TTFT \d+\.\d\d s"
VMETAL = Path(sys.executable).with_name("vmetal")
COMMAND = [str(VMETAL)] if VMETAL.exists() else [sys.executable, "-m", "vmetal.cli.app"]


# ---------------------------------------------------------------------------------------------------
# The session logic on its own

def test_commands_and_settings_parse():
    assert parse_command("/set top_p 0.9") == parse_command("/SET  top_p 0.9 ")
    assert parse_command("/quit").name == "exit" and parse_command("/system  be brief ").arg == "be brief"
    for bad in ("/nope", "/", "/save", "/reset now"):
        with pytest.raises(ChatError):
            parse_command(bad)
    assert parse_setting("top-p", "0.5") == 0.5 and parse_setting("max_tokens", "default") is None
    for name, value in (("temperature", "-1"), ("top_p", "0"), ("top_p", "1.5"), ("max_tokens", "2.5"),
                        ("max_tokens", "0"), ("temperature", "nan"), ("seed", "1")):
        with pytest.raises(ChatError):
            parse_setting(name, value)


def test_conversation_json_round_trip_and_refusals(tmp_path):
    conv = Conversation(system="Be brief.")
    conv.add_exchange("Hi", "Hello!")
    conv.set("temperature", "0.2")
    path = conv.save(tmp_path / "c.json", model="m")
    data = json.loads(path.read_text())
    assert data["model"] == "m" and data["settings"] == {"temperature": 0.2, "top_p": None, "max_tokens": None}
    assert data["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello!"}]
    assert Conversation.load(path) == conv
    # A bare OpenAI messages list loads too, and keeps the settings it does not name.
    loaded = Conversation.from_json(data["messages"], settings={"max_tokens": 5})
    assert loaded.messages() == conv.messages() and loaded.request_fields() == {"max_tokens": 5}
    for bad in ({"messages": [{"role": "tool", "content": "x"}]}, {"messages": "x"}, [{"role": "user"}],
                [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
                {"messages": [], "settings": {"top_p": 3}}):
        with pytest.raises(ChatError):
            Conversation.from_json(bad)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ChatError, match="not JSON"):
        Conversation.load(tmp_path / "bad.json")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_finished_reply_is_redrawn_as_markdown(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("LINES", "24")
    out = FakeTerminal()
    view = chat_view.ReplyView(out, markdown=True)
    for piece in ("# Title\n\nSome **bold", "** text\x1b[2J and `code`"):
        view.write(Delta(piece))
    streamed = out.getvalue()
    assert streamed == "# Title\n\nSome **bold** text[2J and `code`"  # control characters dropped
    view.finish("# Title\n\nSome **bold** text and `code`")
    redraw = out.getvalue()[len(streamed):]
    # Back to the first row of the reply (3 rows: 2 up), clear, then the rendered Markdown.
    assert redraw.startswith("\r\x1b[2A\x1b[J")
    plain = re.sub(r"\x1b\[[0-9;]*m", "", redraw)
    assert "Title" in plain and "Some bold text and code" in plain and "**" not in plain

    # A reply taller than the screen cannot be erased: it stays as streamed.
    out = FakeTerminal()
    view = chat_view.ReplyView(out, markdown=True)
    view.write(Delta("line\n" * 30 + "end"))
    view.finish("line\n" * 30 + "end")
    assert out.getvalue() == "line\n" * 30 + "end\n"

    # Not a terminal: the text as it came, and a final newline.
    out = io.StringIO()
    view = chat_view.ReplyView(out, markdown=True)
    view.write(Delta("**raw**", ))
    view.write(Delta("thinking", reasoning=True))
    view.finish("**raw**")
    assert out.getvalue() == "**raw**\n"


class ScriptedEditor:
    def __init__(self, lines):
        self.lines = list(lines)
        self.prompts = []

    def read(self, prompt):
        self.prompts.append(prompt)
        if not self.lines:
            raise EOFError
        return self.lines.pop(0)


@pytest.mark.parametrize("lines, message", [
    (["one line"], "one line"),
    (["first \\", "second"], "first \nsecond"),
    (['"""', "a", "", "b", '"""'], "a\n\nb"),
    (['"""a', 'b"""'], "a\nb"),
    (['"""quoted"""'], '"""quoted"""'),
])
def test_multi_line_input(lines, message):
    editor = ScriptedEditor(lines)
    repl = chat_repl.Repl(None, Conversation(), editor, stats=False, markdown=False)
    assert repl.read_message() == message and editor.lines == []
    assert editor.prompts[1:] == [chat_repl.CONTINUATION] * (len(lines) - 1)


# ---------------------------------------------------------------------------------------------------
# Against a real server

@pytest.fixture(scope="module")
def server(qwen3_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("chat-server") / "server.log"
    proc = ServerProcess(str(qwen3_model), port=free_port(), served_model_name=SERVED,
                         vllm_args=["--max-model-len", str(MAX_MODEL_LEN)], echo=False, log_path=log)
    with proc:
        # The first streamed reply pays one-time costs in the server and comes in a few large bursts;
        # the tests watch later ones.
        with ChatClient(proc.url).stream(SERVED, [{"role": "user", "content": "Hi"}], {"max_tokens": 64}) as r:
            assert "".join(delta.text for delta in r) and r.stats.tokens == 64
        yield proc


def environ(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_API_KEY", "NO_COLOR") and not k.startswith(("VLLM_METAL_", "VLLM_MLX_"))}
    env.update(VMETAL_HOME=str(home), TERM="xterm-256color", **extra)
    return env


class TimedLog:
    """pexpect's `logfile_read`: every chunk read from the terminal, with the time it arrived."""

    def __init__(self) -> None:
        self.chunks: list[tuple[float, str]] = []

    def write(self, data: str) -> None:
        self.chunks.append((time.monotonic(), data))

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        return "".join(data for _, data in self.chunks)


def spawn_chat(server, home: Path, *args: str) -> tuple[pexpect.spawn, TimedLog]:
    child = pexpect.spawn(COMMAND[0], [*COMMAND[1:], "chat", "--url", server.url, *args], env=environ(home),
                          encoding="utf-8", dimensions=(50, 120), timeout=60)
    child.logfile_read = log = TimedLog()
    child.expect(PROMPT)
    return child, log


def command(child: pexpect.spawn, line: str, expect: str | None = None) -> str:
    """Send a line, wait for the next prompt; what was shown between them (without the echo, as plain
    text), which must match `expect` if given."""
    child.sendline(line)
    child.expect_exact(line)  # the terminal's echo
    child.expect(PROMPT)
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", child.before)  # colours and cursor moves
    if expect is not None:
        assert re.search(expect, shown), shown
    return shown


def run_chat(server_url: str, home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*COMMAND, "chat", "--url", server_url, *args], input=stdin, capture_output=True,
                          text=True, timeout=240, env=environ(home),
                          stdin=None if stdin is not None else subprocess.DEVNULL)


def test_reply_streams_as_it_is_generated(server, tmp_path):
    child, log = spawn_chat(server, tmp_path, "--no-markdown", "--stats")
    command(child, "/set max_tokens 400", "max_tokens = 400")
    message = "Tell me a long story."
    start = len(log.chunks)
    child.sendline(message)
    child.expect(STATS)
    child.expect(PROMPT)

    # Where the reply lies in what the terminal received (after the echo, before the stats line) ...
    chunks = log.chunks[start:]
    text = "".join(data for _, data in chunks)
    begin = text.index(message + "\r\n") + len(message) + 2
    end = begin + re.search(r"\r\n(\x1b\[[0-9;]*m)*" + STATS, text[begin:]).start()
    assert end - begin > 400, text[begin:end]
    # ... and which reads carried it, when, and how much of it each.
    carried, offset = [], 0
    for when, data in chunks:
        part = max(0, min(end, offset + len(data)) - max(begin, offset))
        if part:
            carried.append((when, part))
        offset += len(data)
    # The reply arrived over many reads spread in time, the first with only a small part of it.
    assert len(carried) >= 5, carried
    assert carried[0][1] < (end - begin) / 2, carried
    assert carried[-1][0] - carried[0][0] > 0.05, carried
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_a_reply_and_the_session_goes_on(server, tmp_path):
    child, log = spawn_chat(server, tmp_path, "--stats")
    command(child, f"/set max_tokens {MAX_MODEL_LEN - 40}")
    child.sendline("Go on and on.")
    child.expect_exact("Go on and on.\r\n")
    child.expect(r"\S{3}")  # the reply has started
    started = time.monotonic()
    child.sendintr()
    child.expect(r"\[interrupted\]")
    child.expect(PROMPT)
    assert not re.search(STATS, child.before)  # it did not run to its end
    assert time.monotonic() - started < 10

    # Ctrl-C at the prompt drops the line being typed and stays too. Like a user, it waits to see the
    # text before pressing Ctrl-C: a Ctrl-C that lands while readline is still taking in typed-ahead
    # keys flushes them from the terminal, and readline (its signal handling left to Python) then waits
    # in its own read for a key that never comes (GNU readline 8.2 and Python 3.11; 1 run in 20 here).
    child.send("half a line")
    child.expect_exact("half a line")
    child.sendintr()
    child.expect(PROMPT)

    # The partial reply stays in the conversation; the next message gets a full reply.
    saved = tmp_path / "after-interrupt.json"
    command(child, f"/save {saved}")
    (user, partial) = json.loads(saved.read_text())["messages"]
    assert user == {"role": "user", "content": "Go on and on."}
    assert partial["role"] == "assistant" and partial["content"]
    command(child, "/set max_tokens 8")
    child.sendline("And now?")
    child.expect_exact("And now?\r\n")
    child.expect(r"(?<!\d)8 tokens · TTFT")
    child.expect(PROMPT)
    child.sendeof()  # Ctrl-D leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_slash_commands(server, tmp_path):
    child, log = spawn_chat(server, tmp_path)
    shown = command(child, "/help")
    for name in ("/help", "/reset", "/system", "/set", "/save", "/load", "/model", "/exit"):
        assert name in shown
    command(child, "/model", rf"model: {SERVED}\r\nserver: {re.escape(server.url)} \(running\)")
    command(child, "/set temperature 0", r"temperature = 0\.0")
    command(child, "/set top_p 2", r"error: top_p must be a number in \(0, 1\]")
    command(child, "/set max_tokens 6", "max_tokens = 6")
    command(child, "/set", r"temperature = 0\.0\r\ntop_p = default\r\nmax_tokens = 6")
    command(child, "/system You answer in six tokens.", "system prompt set")
    command(child, "/frobnicate", r"error: unknown command `/frobnicate`")

    # A multi-line message, sent as one.
    child.sendline('"""')
    child.sendline("line one")
    child.sendline('line two"""')
    child.expect(PROMPT)

    first = tmp_path / "first.json"
    command(child, f"/save {first}", "saved 2 messages")
    data = json.loads(first.read_text())
    assert data["model"] == SERVED and data["settings"] == {"temperature": 0.0, "top_p": None, "max_tokens": 6}
    system, user, assistant = data["messages"]
    assert system == {"role": "system", "content": "You answer in six tokens."}
    assert user == {"role": "user", "content": "line one\nline two"}
    assert assistant["role"] == "assistant" and assistant["content"].strip()

    command(child, "/reset", "conversation cleared")
    empty = tmp_path / "empty.json"
    command(child, f"/save {empty}")
    assert json.loads(empty.read_text())["messages"] == [system]

    command(child, f"/load {first}", "loaded 2 messages")
    again = tmp_path / "again.json"
    command(child, f"/save {again}")
    assert json.loads(again.read_text()) == data
    command(child, f"/load {tmp_path / 'missing.json'}", "error: cannot read")

    # A request the server refuses is an error line; the session goes on.
    command(child, "/set max_tokens 5000")
    command(child, "Too long a reply, please.", r"error: .*max_tokens=5000.*\r\n(.*\r\n)*.*hint: .*/reset")
    command(child, "/set max_tokens 3")
    command(child, "/system")
    command(child, "//slash as text")
    last = tmp_path / "last.json"
    command(child, f"/save {last}")
    data = json.loads(last.read_text())
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"] * 2  # the refused one is not kept
    assert data["messages"][2]["content"] == "/slash as text"

    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    # Lines typed are kept for the next session's line editing.
    history = (tmp_path / "chat_history").read_text()
    assert "/set max_tokens 6" in history and "//slash as text" in history


def test_prompt_flag_and_piped_stdin_print_only_the_reply(server, tmp_path):
    from openai import OpenAI

    with OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60) as client:
        expected = client.chat.completions.create(
            model=SERVED, messages=[{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Say hi"}],
            temperature=0, max_tokens=16).choices[0].message.content
    flags = ["--system", "Be brief.", "--temperature", "0", "--max-tokens", "16"]

    result = run_chat(server.url, tmp_path, "-p", "Say hi", *flags)
    assert (result.returncode, result.stdout, result.stderr) == (0, expected + "\n", "")

    result = run_chat(server.url, tmp_path, *flags, stdin="Say hi\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, expected + "\n", "")

    # --stats goes to stderr; stdout stays the reply. `--demo` finds the demo model this server serves.
    result = run_chat(server.url, tmp_path, "--demo", "-p", "Say hi", "--stats", *flags)
    assert result.returncode == 0 and result.stdout == expected + "\n"
    assert re.fullmatch(STATS + r" · [\d.]+ tokens/s\n", result.stderr)
    assert "\x1b" not in result.stdout + result.stderr

    # A reader that goes away early (`| head`) ends the reply quietly.
    proc = subprocess.Popen([*COMMAND, "chat", "--url", server.url, "-p", "Say hi", "--max-tokens", "400"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=environ(tmp_path))
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""


def test_script_errors_exit_1_on_stderr(server, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    result = run_chat(dead, tmp_path, "-p", "hello")
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == f"error: no server answers at {dead}"
    assert lines[-1].startswith("hint: start one with `vmetal serve`") and "MODEL" in lines[-1]

    result = run_chat(server.url, tmp_path, "-p", "hello", "--model-name", "nope")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: the server at {server.url} does not serve `nope`")

    result = run_chat(server.url, tmp_path, "-p", "hello", "--max-tokens", "5000")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: max_tokens=5000 cannot be greater than max_model_len={MAX_MODEL_LEN}")

    result = run_chat(server.url, tmp_path, stdin="   \n")
    assert result.returncode == 2 and result.stderr.startswith("error: nothing to send")


def servers_of(model) -> set[tuple[int, str]]:
    """The vLLM servers of `model` running now: (pid, command line)."""
    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if "vmetal.server.vllm_cli" in cmdline and str(model) in cmdline:
            found.add((proc.pid, cmdline))
    return found


def test_model_without_a_server_starts_one_for_the_session(server, qwen3_model, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    before = servers_of(qwen3_model)  # this module's server, and others the session shares
    result = run_chat(dead, tmp_path, str(qwen3_model), "-p", "hello", "--max-tokens", "5",
                      "--", "--max-model-len", str(MAX_MODEL_LEN))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and result.stdout.endswith("\n")
    assert f"no server answers at {dead}; starting {qwen3_model}" in result.stderr
    # Stopped on exit: no process of it is left (its command line names the model folder).
    assert servers_of(qwen3_model) - before == set()
