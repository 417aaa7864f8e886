"""What agents and Claude-style clients use, through `vmetal serve` with the tiny random qwen3 model: tool calls
(OpenAI, forced and auto), reasoning (`--reasoning-parser`, `enable_thinking`, `--no-thinking`), vLLM's
Anthropic Messages API (`/v1/messages`) with the `anthropic` client, and the OpenAI Responses API
(`/v1/responses`, what Codex CLI and the OpenAI Agents SDK speak) with the `openai` client: whole, streamed, a
function tool's call and its result, and the 400 that vmetal's request guard gives the inputs vLLM 0.32 fails on.

One real `vmetal serve` process serves every test of this module, started the way a user starts it, so the
tool-call parser it picks for the model and `--no-thinking` are what the tests see. Greedy text is checked
against mlx-lm's own generation; forced tool calls are checked against their schema.

Forced tool calls with a tool-call parser: vLLM 0.32 constrains them with the parser's structural tag, which
pins the arguments to the schema only for `strict: true` tools (as OpenAI does), and allows any whitespace
inside the JSON (vmetal's `disable_any_whitespace` does not reach structural tags). A trained model writes
compact JSON; this random one, left alone, can pick blanks until max_tokens. So the tools are strict, every
value is bounded (enums, booleans, integers with min/max, strings with maxLength), and the OpenAI requests
bias whitespace-only tokens away (`logit_bias`, applied under the grammar's mask, never against it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import jsonschema
import pytest

from tests.support.engine import mlx_greedy
from vmetal.server.process import free_port

pytestmark = pytest.mark.slow

MODEL = "tiny"
HELLO = [{"role": "user", "content": "Hello world"}]
EMPTY_THINK = "<think>\n\n</think>\n\n"

WEATHER = {
    "type": "object",
    "properties": {
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "hourly": {"type": "boolean"},
        "city": {"type": "string", "maxLength": 8},
    },
    "required": ["unit", "days", "hourly", "city"],
    "additionalProperties": False,
}
ALARM = {
    "type": "object",
    "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                   "loud": {"type": "boolean"}},
    "required": ["hour", "loud"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "set_alarm": ALARM}
OPENAI_TOOLS = [{"type": "function", "function": {"name": name, "description": f"{name} tool",
                                                  "parameters": schema, "strict": True}}
                for name, schema in SCHEMAS.items()]
ANTHROPIC_TOOLS = [{"name": name, "description": f"{name} tool", "input_schema": schema, "strict": True}
                   for name, schema in SCHEMAS.items()]


@pytest.fixture(scope="module")
def server(qwen3_model, tmp_path_factory):
    """`vmetal serve MODEL --reasoning-parser qwen3 --no-thinking`: (base URL, vmetal's own stderr lines)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_METAL_", "VLLM_MLX_"))}
    vmetal = Path(sys.executable).with_name("vmetal")
    cmd = [str(vmetal)] if vmetal.exists() else [sys.executable, "-m", "vmetal.cli.app"]
    proc = subprocess.Popen([*cmd, "serve", str(qwen3_model), "--port", str(port), "--served-model-name", MODEL,
                             "--max-model-len", "2048", "--reasoning-parser", "qwen3", "--no-thinking"],
                            env=env, cwd=tmp_path_factory.mktemp("serve"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def read(stream):
        for line in stream:
            lines.append(line.rstrip("\n"))
            if line.startswith("vmetal: serving"):
                ready.set()
        ready.set()  # the server exited: stop waiting

    readers = [threading.Thread(target=read, args=(s,), daemon=True) for s in (proc.stdout, proc.stderr)]
    for reader in readers:
        reader.start()
    try:
        assert ready.wait(300) and proc.poll() is None, "\n".join(lines[-30:])
        yield f"http://127.0.0.1:{port}", lines
    finally:
        proc.send_signal(signal.SIGTERM)  # `vmetal serve` stops vLLM and every process it started
        try:
            assert proc.wait(timeout=60) == 0, "\n".join(lines[-30:])
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def base_url(server):
    return server[0]


@pytest.fixture(scope="module")
def openai_client(base_url):
    from openai import OpenAI

    with OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def anthropic_client(base_url):
    import anthropic

    with anthropic.Anthropic(base_url=base_url, api_key="unused", max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(qwen3_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen3_model))


@pytest.fixture(scope="module")
def no_blanks(tokenizer) -> dict[str, int]:
    """logit_bias that keeps whitespace-only tokens out of a random model's JSON."""
    blanks = [i for i in range(len(tokenizer)) if tokenizer.decode([i]) and not tokenizer.decode([i]).strip()]
    assert blanks
    return {str(i): -100 for i in blanks}


def prompt_of(http, messages, **kwargs) -> tuple[list[int], str]:
    """The prompt the server builds for a chat request: its token ids and its text."""
    r = http.post("/tokenize", json={"model": MODEL, "messages": messages, **kwargs})
    assert r.status_code == 200, r.text
    ids = r.json()["tokens"]
    r = http.post("/detokenize", json={"model": MODEL, "tokens": ids})
    assert r.status_code == 200, r.text
    return ids, r.json()["prompt"]


def greedy_text(qwen3_model, tokenizer, prompt_ids, n) -> str:
    return tokenizer.decode(mlx_greedy(qwen3_model, prompt_ids, n))


# ---------------------------------------------------------------------------------------------------------
# vmetal serve's choices


def test_serve_says_which_tool_parser_it_chose(server):
    tool_lines = [line for line in server[1] if line.startswith("vmetal: tool calls:")]
    assert tool_lines == ["vmetal: tool calls: `hermes` parser (qwen3 model, its chat template uses "
                          "<tool_call> JSON tool calls); change with --tool-call-parser NAME, switch off "
                          "with --no-tool-parser"]


def test_parser_names_are_vllms_own_registries():
    # vmetal reads the names from vLLM's source to stay instant; they must be what vLLM registers.
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    from vmetal.server import parsers

    assert parsers.registered("tool") == tuple(ToolParserManager.list_registered())
    assert parsers.registered("reasoning") == tuple(ReasoningParserManager.list_registered())


# ---------------------------------------------------------------------------------------------------------
# Reasoning: --no-thinking is the server's default, a request's enable_thinking wins


def test_no_thinking_default_and_request_override_shape_the_prompt(http):
    _, default = prompt_of(http, HELLO)
    _, thinking = prompt_of(http, HELLO, chat_template_kwargs={"enable_thinking": True})
    plain = "<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"
    assert default == plain + EMPTY_THINK
    assert thinking == plain


def test_reasoning_parser_splits_thinking_from_the_answer(openai_client, http, qwen3_model, tokenizer):
    # Thinking off (the server default): the reply is the answer, token for token mlx-lm's greedy one.
    ids, _ = prompt_of(http, HELLO)
    res = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    message = res.choices[0].message
    assert message.content == greedy_text(qwen3_model, tokenizer, ids, 8)
    assert message.model_extra.get("reasoning") is None
    assert res.usage.prompt_tokens == len(ids)

    # Thinking on: the model never closes </think> within 8 tokens, so all of it is reasoning.
    ids, _ = prompt_of(http, HELLO, chat_template_kwargs={"enable_thinking": True})
    res = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0,
                                                extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    message = res.choices[0].message
    assert message.content is None
    assert message.model_extra["reasoning"] == greedy_text(qwen3_model, tokenizer, ids, 8)


# ---------------------------------------------------------------------------------------------------------
# Anthropic Messages API


def test_anthropic_message(anthropic_client, openai_client, http, qwen3_model, tokenizer):
    ids, _ = prompt_of(http, HELLO)
    # The anthropic client has no temperature parameter; vLLM's /v1/messages takes it in the body.
    msg = anthropic_client.messages.create(model=MODEL, max_tokens=12, messages=HELLO,
                                           extra_body={"temperature": 0})
    assert msg.role == "assistant" and msg.model == MODEL and msg.stop_reason == "max_tokens"
    assert [block.type for block in msg.content] == ["text"]
    assert msg.content[0].text == greedy_text(qwen3_model, tokenizer, ids, 12)
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (len(ids), 12)
    # The same conversation through the OpenAI API gives the same greedy answer.
    res = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    assert res.choices[0].message.content == msg.content[0].text


def test_anthropic_streamed_message_equals_the_message(anthropic_client):
    kwargs = dict(model=MODEL, max_tokens=16, system="Be brief.", extra_body={"temperature": 0},
                  messages=[{"role": "user", "content": "What is the capital of France?"}])
    whole = anthropic_client.messages.create(**kwargs)
    with anthropic_client.messages.stream(**kwargs) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    deltas = [e for e in events if e == "content_block_delta"]
    assert events[0] == "message_start" and events[-1] == "message_stop" and len(deltas) > 1
    assert "".join(block.text for block in final.content) == whole.content[0].text
    assert final.stop_reason == whole.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 16


def test_anthropic_thinking_block_when_a_request_enables_thinking(anthropic_client):
    msg = anthropic_client.messages.create(model=MODEL, max_tokens=8, messages=HELLO, extra_body={
        "temperature": 0, "chat_template_kwargs": {"enable_thinking": True}})
    assert [block.type for block in msg.content] == ["thinking"] and msg.content[0].thinking


def test_anthropic_tool_use_round_trip(anthropic_client, http):
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    msg = anthropic_client.messages.create(model=MODEL, max_tokens=512, messages=question,
                                           tools=ANTHROPIC_TOOLS,
                                           tool_choice={"type": "tool", "name": "get_weather"},
                                           extra_body={"temperature": 0})
    uses = [block for block in msg.content if block.type == "tool_use"]
    assert len(uses) == 1 and msg.stop_reason == "tool_use", msg
    use = uses[0]
    assert use.name == "get_weather" and use.id
    jsonschema.validate(use.input, WEATHER)

    # The tool's result goes back; with tool_choice left to the model (auto, through the hermes parser that
    # `vmetal serve` chose) this random model answers in text.
    result = "Sunny, 21 degrees."
    conversation = [*question, {"role": "assistant", "content": msg.content},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                  "content": result}]}]
    reply = anthropic_client.messages.create(model=MODEL, max_tokens=12, messages=conversation,
                                             tools=ANTHROPIC_TOOLS, extra_body={"temperature": 0})
    assert [block.type for block in reply.content] == ["text"] and reply.content[0].text
    assert reply.stop_reason == "max_tokens"
    # The model saw its own call and the result, in its chat template's format.
    _, prompt = prompt_of(http, [*question,
                                 {"role": "assistant", "content": None, "tool_calls": [
                                     {"id": use.id, "type": "function", "function": {
                                         "name": "get_weather", "arguments": json.dumps(use.input)}}]},
                                 {"role": "tool", "tool_call_id": use.id, "content": result}],
                          tools=[t for t in OPENAI_TOOLS])
    assert f"<tool_response>\n{result}\n</tool_response>" in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": ' in prompt
    count = anthropic_client.messages.count_tokens(model=MODEL, messages=conversation, tools=ANTHROPIC_TOOLS)
    assert reply.usage.input_tokens == count.input_tokens > msg.usage.input_tokens


# ---------------------------------------------------------------------------------------------------------
# OpenAI tool calls


def _streamed_tool_calls(stream) -> tuple[list[dict], str | None]:
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            if delta.function and delta.function.name:
                call["name"] += delta.function.name
            if delta.function and delta.function.arguments:
                call["arguments"] += delta.function.arguments
    return [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("tool_choice, finish", [
    ({"type": "function", "function": {"name": "set_alarm"}}, "stop"),
    ("required", "tool_calls"),
], ids=["named", "required"])
def test_openai_forced_tool_call(openai_client, no_blanks, tool_choice, finish, stream):
    kwargs = dict(model=MODEL, max_tokens=512, temperature=0, tools=OPENAI_TOOLS, tool_choice=tool_choice,
                  parallel_tool_calls=False, logit_bias=no_blanks,
                  messages=[{"role": "user", "content": "Wake me at seven."}])
    if stream:
        calls, finish_reason = _streamed_tool_calls(openai_client.chat.completions.create(stream=True, **kwargs))
    else:
        res = openai_client.chat.completions.create(**kwargs)
        finish_reason = res.choices[0].finish_reason
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                 for c in res.choices[0].message.tool_calls or []]
    assert finish_reason == finish
    assert len(calls) == 1, calls
    (call,) = calls
    assert call["id"]
    if isinstance(tool_choice, dict):
        assert call["name"] == "set_alarm"
    jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_openai_forced_tool_call_streamed_equals_whole(openai_client, no_blanks):
    kwargs = dict(model=MODEL, max_tokens=512, temperature=0, tools=OPENAI_TOOLS, logit_bias=no_blanks,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}},
                  messages=[{"role": "user", "content": "Weather in Oslo for three days?"}])
    whole = openai_client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0].function
    (call,), _ = _streamed_tool_calls(openai_client.chat.completions.create(stream=True, **kwargs))
    assert (call["name"], json.loads(call["arguments"])) == (whole.name, json.loads(whole.arguments))


def test_openai_auto_tool_choice_answers_in_text(openai_client):
    # Without `--enable-auto-tool-choice` (which vmetal serve passed with the parser) this is a 400.
    res = openai_client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, tools=OPENAI_TOOLS,
                                                tool_choice="auto", messages=HELLO)
    message = res.choices[0].message
    assert message.content and not message.tool_calls and res.choices[0].finish_reason == "length"


# ---------------------------------------------------------------------------------------------------------
# OpenAI Responses API (what Codex CLI and the OpenAI Agents SDK speak)


def test_responses_answer_what_chat_answers(openai_client):
    res = openai_client.responses.create(model=MODEL, input="Hello world", max_output_tokens=8, temperature=0)
    assert res.model == MODEL and res.status == "incomplete" and res.incomplete_details.reason == "max_output_tokens"
    (message,) = res.output
    assert message.type == "message" and message.role == "assistant"
    assert [part.type for part in message.content] == ["output_text"] and res.output_text
    assert res.usage.output_tokens == 8
    # The same prompt and greedy decoding as the chat API.
    chat = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    assert res.output_text == chat.choices[0].message.content
    assert res.usage.input_tokens == chat.usage.prompt_tokens


def test_responses_streamed_events_end_in_completed(openai_client):
    kwargs = dict(model=MODEL, input="Hello world", max_output_tokens=8, temperature=0)
    whole = openai_client.responses.create(**kwargs)
    events = list(openai_client.responses.create(stream=True, **kwargs))
    types = [event.type for event in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed", types
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    final = events[-1].response
    assert deltas and "".join(deltas) == final.output_text == whole.output_text
    assert final.status == "incomplete" and [item.type for item in final.output] == ["message"]


def test_responses_reasoning_item_when_a_request_enables_thinking(openai_client):
    res = openai_client.responses.create(model=MODEL, input="Hello world", max_output_tokens=8, temperature=0,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    (item,) = res.output
    assert item.type == "reasoning" and [part.type for part in item.content] == ["reasoning_text"]
    assert item.content[0].text


RESPONSES_TOOLS = [{"type": "function", "name": name, "description": f"{name} tool", "parameters": schema,
                    "strict": True} for name, schema in SCHEMAS.items()]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_responses_function_tool_call_and_its_result(openai_client, no_blanks, stream):
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    kwargs = dict(model=MODEL, input=question, max_output_tokens=512, temperature=0, tools=RESPONSES_TOOLS,
                  tool_choice={"type": "function", "name": "get_weather"}, extra_body={"logit_bias": no_blanks})
    if stream:
        with openai_client.responses.stream(**kwargs) as events:
            types = [event.type for event in events]
            res = events.get_final_response()
        assert "response.function_call_arguments.delta" in types and types[-1] == "response.completed", types
    else:
        res = openai_client.responses.create(**kwargs)
    assert [tool.name for tool in res.tools] == ["get_weather", "set_alarm"] and res.tools[0].strict
    (call,) = res.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id, res.output
    jsonschema.validate(json.loads(call.arguments), WEATHER)

    # An agent's next turn: the call and its result go back as input items, the tools stay on offer (auto
    # choice, through the hermes parser `vmetal serve` chose); this random model answers in text.
    follow_up = [*question, call.model_dump(exclude_none=True),
                 {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 degrees."}]
    reply = openai_client.responses.create(model=MODEL, input=follow_up, max_output_tokens=8, temperature=0,
                                           tools=RESPONSES_TOOLS)
    assert [item.type for item in reply.output] == ["message"] and reply.output_text
    assert reply.usage.input_tokens > res.usage.input_tokens


# The inputs vLLM 0.32 accepts and then fails on (500, or a stream cut after its 200): vmetal's request guard
# answers them 400 naming the field. tests/server/test_responses_guard.py holds the in-process proof that each
# still breaks vLLM itself.
REFUSED_RESPONSES = [
    pytest.param({"input": "Hello", "background": None, "stream": True}, "background", id="null-background-streamed"),
    pytest.param({"input": "Hello", "truncation": None, "stream": True}, "truncation", id="null-truncation-streamed"),
    pytest.param({"input": "Hello", "background": None}, "background", id="null-background"),
    pytest.param({"input": [*HELLO, {"type": "message", "role": "assistant", "content": [], "id": "msg_1",
                                     "status": "completed"}]}, "input[1].content", id="empty-assistant-content"),
    pytest.param({"input": [*HELLO, {"type": "message", "role": "assistant", "content": [
        {"type": "refusal", "refusal": "No."}]}]}, "input[1].content[0]", id="refusal-first"),
    pytest.param({"input": [*HELLO, {"type": "function_call_output", "call_id": "c1", "id": "fco_1",
                                     "status": "completed", "output": [{"type": "input_text", "text": "Sunny",
                                                                        "prompt_cache_breakpoint": {
                                                                            "mode": "explicit", "ttl": None}}]}]},
                 "input[1].output[0]", id="off-schema-tool-output"),
]


@pytest.mark.parametrize("body, field", REFUSED_RESPONSES)
def test_responses_inputs_vllm_fails_on_get_a_400_naming_the_field(openai_client, body, field):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.responses.create(model=MODEL, max_output_tokens=4, **body)
    error = caught.value
    assert error.status_code == 400 and error.param == field and f"`{field}`" in error.message
    res = openai_client.responses.create(model=MODEL, input="Hello", max_output_tokens=4)
    assert res.status == "incomplete" and res.output_text
