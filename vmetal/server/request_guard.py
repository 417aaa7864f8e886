"""A 400 for the requests that vLLM 0.32 accepts and then fails on with a 5xx or a cut stream.

vLLM's Responses API (what Codex CLI and the OpenAI Agents SDK speak) validates a request with pydantic, then builds
the prompt and, at the end, the answer. Some inputs pass that validation and break vLLM's own code afterwards (the
files are under vllm/entrypoints/openai/responses/ unless named):

- an assistant `message` item whose `content` is an empty list: `ResponsesRequest.input_item_parsing` (protocol.py)
  turns it into a `ResponseOutputMessage` and `_construct_message_from_response_item` (utils.py) reads
  `item.content[0].text`: 500 "list index out of range";
- the same item with a `refusal` as its first content part: that part has no `.text`: 500
  "'ResponseOutputRefusal' object has no attribute 'text'";
- a `function_call_output` item with `id` and `status` whose `output` list breaks the input part schema somewhere
  (a `prompt_cache_breakpoint` with `"ttl": null` is enough): pydantic then reads the item as the output-side
  `ResponseFunctionToolCallOutputItem`, its parts become models instead of dicts, utils.py passes them on as a tool
  message's content, and `_parse_chat_message_content_mm_part` (vllm/renderers/chat_utils.py) asserts each part is a
  dict: 500 with an empty message;
- `"background": null` or `"truncation": null`: `ResponsesRequest` allows null, `ResponsesResponse` does not, and
  `ResponsesResponse.from_request` (protocol.py) raises once there is an answer to build: a 400 after the whole
  generation ran, and with `stream: true` the stream is cut after its HTTP 200 (serving.py,
  `responses_stream_generator`, builds the first event that way).

`POST /v1/chat/completions` and `POST /v1/completions` with a `structured_outputs` that is not an object (`true`,
a number, a string, a list): the request models' `check_structured_outputs_count` (vllm/entrypoints/openai/
chat_completion/protocol.py and completion/protocol.py) is a pydantic "before" validator that calls
`structured_outputs.get(...)` on the raw value; an AttributeError is not a validation error, so the answer is a
500 "'bool' object has no attribute 'get'". The schema fuzz (tests/server/test_fuzz_api.py) met it with `true`; a
sweep of every field of every POST operation with a value of each JSON type found no other 5xx.

This ASGI middleware reads the body of a `POST` to one of those paths sent as JSON, answers those inputs with a
400 in vLLM's own error shape (`{"error": {"message", "type", "param", "code"}}`) naming the field, and hands every
other request to vLLM as it came: the body replayed unchanged, the response (streamed or not) never touched. Other
paths pass straight through. vmetal's server child puts it first among vLLM's `--middleware` (vllm_cli.py), so it runs
inside the API-key check. Stdlib only at module level: the `function_call_output` check, the only one that needs
vLLM's own parsing, imports it on the first such item, in a process that has loaded it already.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, NamedTuple

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# The part types a function_call_output's `output` list may hold, and the TypedDict of each in `openai`.
TOOL_OUTPUT_PARTS = {"input_text": "response_input_text_content_param.ResponseInputTextContentParam",
                     "input_image": "response_input_image_content_param.ResponseInputImageContentParam",
                     "input_file": "response_input_file_content_param.ResponseInputFileContentParam"}

logger = logging.getLogger(__name__)


class Rejection(NamedTuple):
    param: str
    message: str


def check_responses_request(body: object) -> Rejection | None:
    """Why vLLM 0.32 would fail on this `/v1/responses` body after accepting it, or None to let vLLM answer."""
    if not isinstance(body, dict):
        return None
    for field, allowed in (("background", "true or false"), ("truncation", '"auto" or "disabled"')):
        if field in body and body[field] is None:
            return Rejection(field, f"`{field}` must be {allowed}; vLLM 0.32 fails on an explicit null "
                                    "(leave the field out for its default)")
    items = body.get("input")
    if isinstance(items, list):
        for i, item in enumerate(items):
            rejection = _check_item(item, f"input[{i}]") if isinstance(item, dict) else None
            if rejection is not None:
                return rejection
    return None


def check_sampling_request(body: object) -> Rejection | None:
    """Why vLLM 0.32 would fail on this `/v1/chat/completions` or `/v1/completions` body, or None."""
    if isinstance(body, dict) and body.get("structured_outputs") is not None \
            and not isinstance(body["structured_outputs"], dict):
        return Rejection("structured_outputs", "`structured_outputs` must be an object such as "
                                               '{"choice": ["yes", "no"]}, {"regex": "..."} or {"json": {...}}, '
                                               "or null; vLLM 0.32 fails on any other value")
    return None


def _check_item(item: dict, where: str) -> Rejection | None:
    kind, content, output = item.get("type"), item.get("content"), item.get("output")
    # The items vLLM turns into a ResponseOutputMessage: a typed assistant message with a list of parts.
    if kind == "message" and item.get("role") == "assistant" and isinstance(content, list):
        if not content:
            return Rejection(f"{where}.content", f"`{where}.content` is empty; vLLM 0.32 takes an assistant "
                                                 "message's text from its first content part (send the text as an "
                                                 "`output_text` part, or leave the message out)")
        if isinstance(content[0], dict) and content[0].get("type") == "refusal":
            return Rejection(f"{where}.content[0]", f"`{where}.content[0]` is a `refusal` part; vLLM 0.32 takes "
                                                    "an assistant message's text from its first content part, "
                                                    "which must be `output_text`")
    if kind == "function_call_output" and isinstance(output, list) and output and _read_as_output_item(item):
        for j, part in enumerate(output):
            problem = _tool_output_part_problem(part)
            if problem:
                return Rejection(f"{where}.output[{j}]", f"`{where}.output[{j}]` {problem}")
        return Rejection(f"{where}.output", f"`{where}` does not match the Responses API's `function_call_output` "
                                            "input item, and vLLM 0.32 then fails on its `output` list (send "
                                            "`output` as a string, or fix the item)")
    return None


def _read_as_output_item(item: dict) -> bool:
    """Whether vLLM's own request model reads this item as an output item (whose list parts it cannot render)."""
    from pydantic import ValidationError
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.exceptions import VLLMError

    try:
        parsed = ResponsesRequest.model_validate({"input": [item]}).input[0]
    except (ValidationError, ValueError, VLLMError):
        return False  # vLLM answers this one with its own 400
    return not isinstance(parsed, dict)


def _tool_output_part_problem(part: object) -> str | None:
    from pydantic import ValidationError

    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in TOOL_OUTPUT_PARTS:
        return f"must be an object whose `type` is one of {', '.join(TOOL_OUTPUT_PARTS)}"
    try:
        _part_adapter(kind).validate_python(part)
    except ValidationError as exc:
        error = exc.errors()[0]
        return f"does not match the `{kind}` part: {'.'.join(map(str, error['loc'])) or kind}: {error['msg']}"
    return None


@functools.cache
def _part_adapter(kind: str):  # -> a pydantic TypeAdapter
    import importlib

    from pydantic import TypeAdapter

    module, name = TOOL_OUTPUT_PARTS[kind].split(".")
    return TypeAdapter(getattr(importlib.import_module(f"openai.types.responses.{module}"), name))


def _is_json(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False


# The path of each request this guard reads, and its check.
CHECKS = {"/v1/responses": check_responses_request,
          "/v1/chat/completions": check_sampling_request,
          "/v1/completions": check_sampling_request}


class RequestGuard:
    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        check = CHECKS.get(path)
        if scope["type"] != "http" or scope.get("method") != "POST" or check is None or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before its body arrived: nobody to answer
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):  # not JSON (or nested too deep to parse): vLLM answers it
            parsed = None
        try:
            rejection = check(parsed)
        except Exception:  # a fault here must not cost a request that vLLM would serve
            logger.exception("vmetal's %s check failed; the request goes to vLLM unchecked", path)
            rejection = None
        if rejection is not None:
            await _answer_400(send, rejection)
            return
        replayed = False

        async def replay() -> Message:
            # The body once, then the client's own messages: vLLM watches them for a disconnect mid-stream.
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _answer_400(send: Send, rejection: Rejection) -> None:
    payload = json.dumps({"error": {"message": rejection.message, "type": "BadRequestError",
                                    "param": rejection.param, "code": 400}}, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
