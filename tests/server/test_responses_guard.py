"""vmetal's request check (vmetal/server/request_guard.py), without a server: `/v1/responses`, and
`structured_outputs` on `/v1/chat/completions` and `/v1/completions`.

- Each input it refuses still breaks vLLM 0.32 itself, at the place its docstring names (called in-process here):
  when a vLLM upgrade fixes one, its test here fails, and the check for it can go.
- What it refuses gets a 400 naming the field; the request shapes the OpenAI SDK and agents send pass untouched.
- As ASGI middleware it answers only a `POST` with a JSON body to those three paths, hands vLLM the body exactly as it
  came (then the client's own messages, for disconnects mid-stream), and passes every other request through
  without reading it.
- Every server `ServerProcess` starts gets it as the first `--middleware` of `vllm serve`; a `vllm serve` run by
  hand does not.

Over HTTP, through `vmetal serve` and the `openai` client: tests/server/test_api_compat.py; under fuzzing:
tests/server/test_fuzz_api.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from vmetal.server import vllm_cli
from vmetal.server.process import API_AUTH_MIDDLEWARE, ServerProcess
from vmetal.server.request_guard import CHECKS, RequestGuard, check_responses_request, check_sampling_request

HI = {"role": "user", "content": "hi"}
EMPTY_ASSISTANT = {"type": "message", "role": "assistant", "content": [], "status": "completed", "id": "msg_1"}
REFUSAL_FIRST = {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                 "content": [{"type": "refusal", "refusal": "I cannot."}]}
# A part off the input schema (`ttl` may be "30m" or "12h", not null) in an item that carries `id` and `status`.
OFF_SCHEMA_TOOL_OUTPUT = {"type": "function_call_output", "call_id": "call_1", "id": "fco_1", "status": "completed",
                          "output": [{"type": "input_text", "text": "sunny",
                                      "prompt_cache_breakpoint": {"mode": "explicit", "ttl": None}}]}
CALL = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"}

REFUSED = [
    pytest.param({"input": "hi", "background": None}, "background", id="null-background"),
    pytest.param({"input": "hi", "background": None, "stream": True}, "background", id="null-background-streamed"),
    pytest.param({"input": "hi", "truncation": None, "stream": True}, "truncation", id="null-truncation"),
    pytest.param({"input": [HI, EMPTY_ASSISTANT]}, "input[1].content", id="empty-assistant-content"),
    pytest.param({"input": [{"type": "message", "role": "assistant", "content": []}]}, "input[0].content",
                 id="empty-assistant-content-no-id"),
    pytest.param({"input": [HI, REFUSAL_FIRST]}, "input[1].content[0]", id="refusal-first"),
    pytest.param({"input": [HI, CALL, OFF_SCHEMA_TOOL_OUTPUT]}, "input[2].output[0]", id="off-schema-tool-output"),
]

ACCEPTED = [
    pytest.param({"input": "hi"}, id="text"),
    pytest.param({"input": "hi", "background": False, "truncation": "auto", "stream": True}, id="explicit-defaults"),
    pytest.param({"input": "hi", "stream": None, "store": None, "parallel_tool_calls": None}, id="nulls-vllm-takes"),
    pytest.param({"input": [HI, {"role": "assistant", "content": "hello"}, HI]}, id="easy-messages"),
    pytest.param({"input": [HI, {"role": "assistant", "content": []}]}, id="untyped-assistant-empty-list"),
    pytest.param({"input": [HI, {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                                 "content": [{"type": "output_text", "text": "hello", "annotations": []},
                                             {"type": "refusal", "refusal": "but not that"}]}]},
                 id="assistant-output-message"),
    pytest.param({"input": [HI, CALL, {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]},
                 id="tool-round-trip"),
    pytest.param({"input": [HI, CALL, {**OFF_SCHEMA_TOOL_OUTPUT, "output": "sunny"}]}, id="tool-output-text-with-id"),
    pytest.param({"input": [HI, CALL, {**OFF_SCHEMA_TOOL_OUTPUT, "output": [{"type": "input_text", "text": "sunny"}]}]},
                 id="tool-output-parts-with-id"),
    pytest.param({"input": [HI, CALL, {k: v for k, v in OFF_SCHEMA_TOOL_OUTPUT.items() if k not in ("id", "status")}]},
                 id="off-schema-tool-output-without-id-vllm-refuses"),
    pytest.param([HI], id="not-an-object"),
    pytest.param({"input": 42, "background": "yes"}, id="vllm-refuses-it-itself"),
]


@pytest.mark.parametrize("body, param", REFUSED)
def test_what_vllm_fails_on_is_refused_naming_the_field(body, param):
    rejection = check_responses_request({"model": "tiny", **body})
    assert rejection is not None and rejection.param == param
    assert f"`{param}`" in rejection.message


def test_an_off_schema_tool_output_part_is_named_with_the_reason():
    rejection = check_responses_request({"input": [OFF_SCHEMA_TOOL_OUTPUT]})
    assert rejection.message.endswith("prompt_cache_breakpoint.ttl: Input should be '30m' or '12h'"), rejection


@pytest.mark.parametrize("body", ACCEPTED)
def test_what_vllm_handles_is_left_to_it(body):
    assert check_responses_request(body) is None


NOT_AN_OBJECT = [True, False, 0, 7, 1.5, "", "json", [], [{"choice": ["a"]}]]


@pytest.mark.parametrize("value", NOT_AN_OBJECT, ids=repr)
def test_structured_outputs_that_is_not_an_object_is_refused_naming_it(value):
    for body in ({"prompt": "hi"}, {"messages": [HI]}):
        rejection = check_sampling_request({"model": "tiny", **body, "structured_outputs": value})
        assert rejection is not None and rejection.param == "structured_outputs"
        assert rejection.message.startswith("`structured_outputs` must be an object")


@pytest.mark.parametrize("body", [
    {"prompt": "hi"}, {"prompt": "hi", "structured_outputs": None},
    {"prompt": "hi", "structured_outputs": {"choice": ["yes", "no"]}},
    {"messages": [HI], "structured_outputs": {}}, {"messages": [HI], "structured_outputs": {"regex": 7}},
    [HI], "hi",
], ids=["absent", "null", "choice", "empty-object", "bad-inside-vllm-refuses", "list", "string"])
def test_structured_outputs_vllm_can_read_is_left_to_it(body):
    assert check_sampling_request(body) is None


# ---------------------------------------------------------------------------------------------------------
# The upstream failures, still there in the installed vLLM


def _chat_messages(items):
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.openai.responses.utils import construct_chat_messages_with_tool_call

    return construct_chat_messages_with_tool_call(ResponsesRequest(input=items).input)


def test_vllm_still_indexes_an_empty_assistant_content():
    with pytest.raises(IndexError, match="list index out of range"):
        _chat_messages([HI, EMPTY_ASSISTANT])


def test_vllm_still_reads_text_from_a_refusal():
    with pytest.raises(AttributeError, match="'ResponseOutputRefusal' object has no attribute 'text'"):
        _chat_messages([HI, REFUSAL_FIRST])


def test_vllm_still_renders_an_off_schema_tool_output_as_models():
    from vllm.renderers.chat_utils import _parse_chat_message_content_mm_part

    (tool_message,) = _chat_messages([OFF_SCHEMA_TOOL_OUTPUT])
    (part,) = tool_message["content"]
    assert not isinstance(part, dict)
    with pytest.raises(AssertionError):
        _parse_chat_message_content_mm_part(part)


@pytest.mark.parametrize("kind", ["chat_completion", "completion"])
@pytest.mark.parametrize("value", NOT_AN_OBJECT, ids=repr)
def test_vllm_still_calls_get_on_structured_outputs(kind, value):
    """Not a ValidationError (which vLLM answers with a 400) but an AttributeError: the 500 the fuzz met."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    request, body = ((ChatCompletionRequest, {"messages": [HI]}) if kind == "chat_completion"
                     else (CompletionRequest, {"prompt": "hi"}))
    with pytest.raises(AttributeError, match="object has no attribute 'get'"):
        request.model_validate({"model": "tiny", **body, "structured_outputs": value})


@pytest.mark.parametrize("field", ["background", "truncation"])
def test_vllm_still_accepts_a_null_it_cannot_answer(field):
    from pydantic import ValidationError
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest, ResponsesResponse
    from vllm.sampling_params import SamplingParams

    request = ResponsesRequest(input="hi", **{field: None})
    with pytest.raises(ValidationError, match=field):
        ResponsesResponse.from_request(request, SamplingParams(max_tokens=4), model_name="tiny", created_time=0,
                                       output=[], status="completed")


# ---------------------------------------------------------------------------------------------------------
# The middleware


class App:
    """The inner ASGI app: records what it was given, answers 200."""

    def __init__(self):
        self.calls = []

    async def __call__(self, scope, receive, send):
        self.calls.append((scope, receive))
        self.messages = [await receive()]
        if scope["path"] in CHECKS:
            self.messages.append(await receive())  # what vLLM's disconnect watch would see next
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _serve(body: bytes, *, path="/v1/responses", method="POST", content_type=b"application/json", chunk=None,
           root_path=""):
    app, sent = App(), []
    pieces = [body[i:i + chunk] for i in range(0, len(body), chunk)] if chunk else [body]
    incoming = [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)]
    incoming.append({"type": "http.disconnect"})

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": root_path + path, "root_path": root_path,
             "headers": [(b"content-type", content_type)] if content_type else []}
    asyncio.run(RequestGuard(app)(scope, receive, send))
    return app, sent, receive


def test_a_refused_request_gets_vllms_error_shape_and_never_reaches_vllm():
    app, sent, _ = _serve(json.dumps({"model": "tiny", "input": [HI, EMPTY_ASSISTANT]}).encode())
    assert app.calls == []
    start, body = sent
    assert start["status"] == 400 and (b"content-type", b"application/json") in start["headers"]
    error = json.loads(body["body"])["error"]
    assert error["param"] == "input[1].content" and error["code"] == 400 and error["type"] == "BadRequestError"
    assert error["message"].startswith("`input[1].content` is empty")


def test_a_request_vllm_handles_reaches_it_byte_for_byte_then_the_clients_own_messages():
    body = json.dumps({"model": "tiny", "input": [HI] * 50, "stream": True}).encode()
    app, sent, _ = _serve(body, chunk=97)
    assert len(app.calls) == 1 and [m["status"] for m in sent if "status" in m] == [200]
    first, then = app.messages
    assert first == {"type": "http.request", "body": body, "more_body": False}
    assert then == {"type": "http.disconnect"}


@pytest.mark.parametrize("where", [
    {"path": "/v1/embeddings"}, {"method": "GET"}, {"content_type": b"text/plain"}, {"content_type": None},
    {"path": "/v1/responses/resp_1"},
], ids=["other-path", "get", "not-json", "no-content-type", "retrieve"])
def test_other_requests_pass_through_unread(where):
    body = json.dumps({"model": "tiny", "input": [HI, EMPTY_ASSISTANT]}).encode()
    app, sent, receive = _serve(body, **where)
    ((_, given_receive),) = app.calls
    assert given_receive is receive  # vLLM reads the client's own stream: the guard never touched it
    assert sent[0]["status"] == 200


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "tiny", "messages": [HI], "structured_outputs": True}),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "structured_outputs": "json"}),
], ids=["chat", "completions"])
def test_structured_outputs_not_an_object_gets_a_400_on_both_sampling_paths(path, body):
    app, sent, _ = _serve(json.dumps(body).encode(), path=path)
    assert app.calls == [] and sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["error"]["param"] == "structured_outputs"
    app, sent, _ = _serve(json.dumps({**body, "structured_outputs": {"choice": ["a"]}}).encode(), path=path)
    assert len(app.calls) == 1 and sent[0]["status"] == 200


def test_the_path_is_matched_under_a_root_path():
    _, sent, _ = _serve(json.dumps({"input": "hi", "background": None}).encode(), root_path="/proxy")
    assert sent[0]["status"] == 400


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b"[" * 100_000], ids=["syntax", "bytes", "deep"])
def test_what_is_not_json_is_left_to_vllm(body):
    app, sent, _ = _serve(body)
    assert app.messages[0]["body"] == body and sent[0]["status"] == 200


def test_a_fault_in_the_check_leaves_the_request_to_vllm(monkeypatch):
    from vmetal.server import request_guard

    def broken(body):
        raise TypeError("a bug in the check")

    monkeypatch.setitem(request_guard.CHECKS, "/v1/responses", broken)
    body = json.dumps({"model": "tiny", "input": "hi"}).encode()
    app, sent, _ = _serve(body)
    assert app.messages[0]["body"] == body and sent[0]["status"] == 200


def test_a_client_gone_before_its_body_gets_nothing():
    app, sent = App(), []
    incoming = [{"type": "http.request", "body": b'{"inp', "more_body": True}, {"type": "http.disconnect"}]

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/responses",
             "headers": [(b"content-type", b"application/json")]}
    asyncio.run(RequestGuard(app)(scope, receive, send))
    assert app.calls == [] and sent == []


# ---------------------------------------------------------------------------------------------------------
# Which servers get it


def _child_args(server: ServerProcess) -> list[str]:
    """What the server child hands `vllm`: its own arguments, with what vllm_cli adds in that environment."""
    own = server.argv[server.argv.index("vmetal.server.vllm_cli") + 1:]
    return vllm_cli.with_request_guard(own, server.environ)


@pytest.mark.parametrize("key", [None, "vmk-3f9c2e7a51d04b86"], ids=["open", "with-key"])
def test_every_server_vmetal_starts_runs_the_guard_inside_its_other_middleware(key, monkeypatch):
    from fastapi import FastAPI
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.entrypoints.serve.middleware.register import init_entrypoints_middleware
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vmetal.server.api_auth import ApiKeyEverywhere
    from vmetal.server.request_guard import RequestGuard

    for var in ("VLLM_API_KEY", "VMETAL_API_KEYS"):
        monkeypatch.delenv(var, raising=False)
    server = ServerProcess("/m", environ={}, api_key=key, vllm_args=["--max-num-seqs", "2"])
    # vLLM's own parser and middleware set-up, as the child's API server runs them.
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(_child_args(server)[1:])
    assert args.model_tag == "/m" and args.max_num_seqs == 2
    assert args.middleware == [vllm_cli.REQUEST_GUARD_MIDDLEWARE, *([API_AUTH_MIDDLEWARE] if key else [])]
    if key:
        monkeypatch.setenv("VLLM_API_KEY", key)
    app = FastAPI()
    init_entrypoints_middleware(args, app, ())
    layers, layer = [], app.build_middleware_stack()
    while layer is not None:
        layers.append(type(layer))
        layer = getattr(layer, "app", None)
    assert RequestGuard in layers
    if key:  # a client without the key is refused before its body is read
        assert layers.index(ApiKeyEverywhere) < layers.index(RequestGuard)


def test_the_guard_goes_first_among_the_middleware_and_never_before_the_model():
    env = {vllm_cli.REQUEST_GUARD_ENV: "1"}
    guard = ["--middleware", vllm_cli.REQUEST_GUARD_MIDDLEWARE]
    assert vllm_cli.with_request_guard(["serve", "/m", "--port", "1"], env) == ["serve", "/m", "--port", "1", *guard]
    assert (vllm_cli.with_request_guard(["serve", "/m", "--middleware=a.B", "--middleware", "c.D"], env)
            == ["serve", "/m", *guard, "--middleware=a.B", "--middleware", "c.D"])


@pytest.mark.parametrize("args, env", [
    (["serve", "/m"], {}),  # `vllm serve` run by hand stays vLLM's own
    (["serve", "/m"], {vllm_cli.REQUEST_GUARD_ENV: "0"}),
    (["chat", "--url", "http://x"], {vllm_cli.REQUEST_GUARD_ENV: "1"}),
], ids=["by-hand", "off", "not-serve"])
def test_no_guard_where_vmetal_did_not_start_the_server(args, env):
    assert vllm_cli.with_request_guard(args, env) == args


def test_the_repeated_middleware_flag_raises_no_warning_but_other_repeats_still_do():
    import logging

    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    vllm_cli._quiet_repeated_middleware()
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("vllm.utils.argparse_utils")
    logger.addHandler(handler)
    try:
        parser = make_arg_parser(FlexibleArgumentParser())
        parser.parse_args(["/m", "--middleware", "a.B", "--middleware", "c.D"])
        parser.parse_args(["/m", "--port", "1", "--port", "2"])
    finally:
        logger.removeHandler(handler)
    assert seen == ["Found duplicate keys --port"]
