"""The server side of a `vmetal chat` session: an OpenAI-compatible server (`GET /models`, streamed
`POST /chat/completions`), with the standard library only: the `openai` package is a test dependency of vmetal,
not a runtime one, and server-sent events over urllib are a few lines. `Reply` times the stream for `--stats`.

urllib is imported where it is used, because the CLI imports this module for every `vmetal --help`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vmetal.chat.session import ChatError

if TYPE_CHECKING:
    from vmetal.server.process import ServerProcess

# The mid-stream wait for the next token can be long (a large prompt's prefill on a busy server), and
# Ctrl-C ends it at any time; this only keeps a script from hanging forever on a stuck server.
READ_TIMEOUT_S = 600.0
PROBE_TIMEOUT_S = 5.0


class ServerUnreachable(ChatError):
    """No HTTP answer from the server at all (refused, timed out, connection dropped)."""


class APIError(ChatError):
    """The server answered with an error; `status` is the HTTP status (0 for an error inside a stream)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Delta:
    """A piece of a streamed reply: the answer itself, or a reasoning model's thinking."""

    text: str
    reasoning: bool = False


@dataclass
class ReplyStats:
    """Time to the first token, and the decode rate from the first token to the last."""

    tokens: int
    ttft_s: float | None
    decode_s: float

    @property
    def tokens_per_s(self) -> float | None:
        # The first token's time belongs to TTFT (prefill); the rate is over the tokens after it.
        if self.tokens < 2 or self.decode_s <= 0:
            return None
        return (self.tokens - 1) / self.decode_s

    def summary(self) -> str:
        parts = [f"{self.tokens} token{'s' if self.tokens != 1 else ''}"]
        if self.ttft_s is not None:
            parts.append(f"TTFT {self.ttft_s:.2f} s")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:.1f} tokens/s")
        return " · ".join(parts)


class Reply:
    """One streamed chat completion: iterate for `Delta`s; `text`, `finish_reason` and `stats` after.

    `close()` (or leaving the `with` block) drops the connection, which makes vLLM abort the request:
    that is how Ctrl-C stops a reply.
    """

    def __init__(self, response: Any, started: float) -> None:
        self._response = response
        self._started = started
        self._first: float | None = None
        self._last: float | None = None
        self._chunks = 0
        self._usage_tokens: int | None = None
        self.parts: list[str] = []
        self.finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def stats(self) -> ReplyStats:
        # vLLM sends one chunk per token; its usage count (asked for with include_usage) wins if sent.
        tokens = self._usage_tokens if self._usage_tokens is not None else self._chunks
        ttft = None if self._first is None else self._first - self._started
        decode = 0.0 if self._first is None or self._last is None else self._last - self._first
        return ReplyStats(tokens, ttft, decode)

    def __iter__(self) -> Iterator[Delta]:
        for data in self._events():
            if data.strip() == "[DONE]":
                return
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                raise APIError(f"the server sent something that is not JSON: {data[:80]!r}") from None
            if "error" in chunk:
                raise APIError(_error_message(chunk))
            usage = chunk.get("usage")
            if isinstance(usage, Mapping) and isinstance(usage.get("completion_tokens"), int):
                self._usage_tokens = usage["completion_tokens"]
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                if choice.get("finish_reason"):
                    self.finish_reason = choice["finish_reason"]
                # vLLM's reasoning parsers name it `reasoning_content` (older) or `reasoning`.
                thinking = delta.get("reasoning_content") or delta.get("reasoning")
                content = delta.get("content")
                if thinking or content:
                    now = time.monotonic()
                    if self._first is None:
                        self._first = now
                    self._last = now
                    self._chunks += 1
                if thinking:
                    yield Delta(thinking, reasoning=True)
                if content:
                    self.parts.append(content)
                    yield Delta(content)

    def _events(self) -> Iterator[str]:
        """The `data` of each server-sent event, as it arrives."""
        import http.client

        data: list[str] = []
        try:
            for raw in self._response:
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if not line:
                    if data:
                        yield "\n".join(data)
                        data = []
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
        except (http.client.HTTPException, OSError) as exc:
            raise ServerUnreachable(f"the connection to the server broke mid-reply ({_reason(exc)})") from None
        if data:
            yield "\n".join(data)

    def close(self) -> None:
        try:
            self._response.close()
        except Exception:  # noqa: BLE001 - closing a broken connection must not hide why we close it
            pass

    def __enter__(self) -> Reply:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
    return str(reason) or type(exc).__name__


def _error_message(body: Any) -> str:
    # vLLM: {"error": {"message": ...}}; older vLLM and some servers: {"message": ...}; FastAPI: {"detail": ...}
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        for key in ("message", "detail"):
            if body.get(key):
                return str(body[key])
    return str(body)[:200]


class ChatClient:
    """An OpenAI-compatible server at `base_url` (`http://host:port/v1`)."""

    def __init__(self, base_url: str, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key

    def _opener(self) -> Any:
        import urllib.parse
        import urllib.request

        from vmetal.server.process import is_loopback

        host = urllib.parse.urlsplit(self.base_url).hostname or ""
        # A proxy from the environment would answer for (or refuse) a server on this machine.
        handlers = [urllib.request.ProxyHandler({})] if host and is_loopback(host) else []
        return urllib.request.build_opener(*handlers)

    def _request(self, path: str, body: dict[str, Any] | None, timeout: float) -> Any:
        import urllib.error
        import urllib.request

        headers = {"Accept": "text/event-stream" if body and body.get("stream") else "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers)
        try:
            return self._opener().open(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            with exc:
                raw = exc.read()
            try:
                message = _error_message(json.loads(raw))
            except (json.JSONDecodeError, UnicodeDecodeError):
                message = raw.decode("utf-8", errors="replace").strip()[:200] or exc.reason
            raise APIError(f"{message} (HTTP {exc.code})", exc.code) from None
        except ValueError as exc:  # a URL urllib cannot use at all
            raise ServerUnreachable(f"`{self.base_url}` is not an http(s) URL ({exc})") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ServerUnreachable(_reason(exc)) from None

    def models(self) -> list[dict[str, Any]]:
        """The server's `/models` list (each with `id`, and `root` on vLLM)."""
        with self._request("/models", None, PROBE_TIMEOUT_S) as response:
            try:
                body = json.loads(response.read())
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                raise APIError("the answer to GET /models is not JSON; is this an OpenAI-compatible "
                               "server?") from None
        data = body.get("data") if isinstance(body, Mapping) else None
        if not isinstance(data, list):
            raise APIError("the answer to GET /models has no `data` list; is this an OpenAI-compatible "
                           "server?")
        return [m for m in data if isinstance(m, Mapping) and isinstance(m.get("id"), str)]

    def stream(self, model: str, messages: list[dict[str, str]],
               fields: Mapping[str, float | int] | None = None) -> Reply:
        """Start a streamed chat completion; the returned `Reply` yields the reply as it is generated."""
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": True,
                                "stream_options": {"include_usage": True}, **(fields or {})}
        started = time.monotonic()
        return Reply(self._request("/chat/completions", body, READ_TIMEOUT_S), started)


@dataclass
class Link:
    """The server a chat session talks to and the model name it sends."""

    client: ChatClient
    model: str
    url: str
    server: ServerProcess | None = None  # set when this session started the server
