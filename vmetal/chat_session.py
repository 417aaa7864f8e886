"""What a `vmetal chat` session knows, apart from the terminal: the conversation and the server protocol.

- `Conversation`: the system prompt, the turns so far and the sampling settings; saved and loaded as JSON
  whose `messages` list is exactly what the OpenAI chat API takes.
- `parse_command` / `COMMANDS`: the slash commands, their arguments and their help lines.
- `ChatClient`: an OpenAI-compatible server (`GET /models`, streamed `POST /chat/completions`), with the
  standard library only: the `openai` package is a test dependency of vmetal, not a runtime one, and
  server-sent events over urllib are a few lines. `Reply` times the stream for `--stats`.

Nothing here writes to the terminal; `vmetal.cli.chat` does. urllib is imported where it is used, because
the CLI imports this module for every `vmetal --help`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# The mid-stream wait for the next token can be long (a large prompt's prefill on a busy server), and
# Ctrl-C ends it at any time; this only keeps a script from hanging forever on a stuck server.
READ_TIMEOUT_S = 600.0
PROBE_TIMEOUT_S = 5.0
FILE_FORMAT = "vmetal-chat/1"
ROLES = ("system", "user", "assistant")


class ChatError(Exception):
    """Something the user asked for in the session cannot be done (a bad value, an unreadable file)."""


class ServerUnreachable(ChatError):
    """No HTTP answer from the server at all (refused, timed out, connection dropped)."""


class APIError(ChatError):
    """The server answered with an error; `status` is the HTTP status (0 for an error inside a stream)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


# Sampling settings: name -> (parse, valid?, what a valid value is). None means "the server's default".
def _float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(text)
    return value


SETTINGS: dict[str, tuple[Callable[[str], float | int], Callable[[Any], bool], str]] = {
    "temperature": (_float, lambda v: v >= 0, "a number >= 0"),
    "top_p": (_float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "max_tokens": (int, lambda v: v >= 1, "a whole number >= 1"),
}


def setting_name(name: str) -> str:
    """`top-p`, `TOP_P` and `top_p` all name `top_p`; anything else is a `ChatError`."""
    key = name.strip().lower().replace("-", "_")
    if key not in SETTINGS:
        raise ChatError(f"unknown setting `{name}`; settings are {', '.join(SETTINGS)}")
    return key


def parse_setting(name: str, text: str) -> float | int | None:
    """The value of setting `name` written as `text`; `default` (or `none`) means the server's default."""
    key = setting_name(name)
    if text.strip().lower() in ("default", "none"):
        return None
    parse, valid, expected = SETTINGS[key]
    try:
        value = parse(text.strip())
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise ChatError(f"{key} must be {expected} (or `default`), not `{text.strip()}`")
    return value


def check_setting(name: str, value: float | int | None) -> float | int | None:
    key = setting_name(name)
    if value is not None and not SETTINGS[key][1](value):
        raise ChatError(f"{key} must be {SETTINGS[key][2]}, not `{value}`")
    return value


@dataclass
class Conversation:
    """The turns so far (user and assistant messages), the system prompt, and the sampling settings."""

    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)
    settings: dict[str, float | int | None] = field(default_factory=lambda: dict.fromkeys(SETTINGS))

    def messages(self, user_text: str | None = None) -> list[dict[str, str]]:
        """The OpenAI `messages` for the next request (with `user_text` as the new turn, if given)."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        out += [dict(turn) for turn in self.turns]
        if user_text is not None:
            out.append({"role": "user", "content": user_text})
        return out

    def add_exchange(self, user_text: str, reply: str) -> None:
        self.turns += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]

    def reset(self) -> None:
        """Forget the turns; the system prompt and the settings stay."""
        self.turns.clear()

    def set(self, name: str, text: str) -> tuple[str, float | int | None]:
        key = setting_name(name)
        self.settings[key] = parse_setting(key, text)
        return key, self.settings[key]

    def request_fields(self) -> dict[str, float | int]:
        """The sampling fields to send; unset ones are left out, so the server's defaults apply."""
        return {k: v for k, v in self.settings.items() if v is not None}

    def to_json(self, model: str | None = None) -> dict[str, Any]:
        return {"format": FILE_FORMAT, "model": model, "settings": dict(self.settings),
                "messages": self.messages()}

    def save(self, path: str | Path, model: str | None = None) -> Path:
        path = Path(path).expanduser()
        try:
            path.write_text(json.dumps(self.to_json(model), indent=2, ensure_ascii=False) + "\n",
                            encoding="utf-8")
        except OSError as exc:
            raise ChatError(f"cannot write `{path}`: {exc.strerror or exc}") from None
        return path

    @classmethod
    def from_json(cls, data: Any, settings: Mapping[str, float | int | None] | None = None) -> Conversation:
        """A conversation from `to_json`'s output, or from a bare OpenAI `messages` list.

        `settings` are the ones to keep where `data` does not name a setting.
        """
        if isinstance(data, list):
            data = {"messages": data}
        if not isinstance(data, Mapping) or not isinstance(data.get("messages"), list):
            raise ChatError("expected a JSON object with a `messages` list (as `/save` writes), "
                            "or a list of messages")
        conv = cls()
        conv.settings.update(settings or {})
        for i, message in enumerate(data["messages"]):
            if (not isinstance(message, Mapping) or message.get("role") not in ROLES
                    or not isinstance(message.get("content"), str)):
                raise ChatError(f"message {i} is not {{\"role\": system|user|assistant, \"content\": TEXT}}")
            if message["role"] == "system":
                if i != 0:
                    raise ChatError(f"message {i} is a system message; only the first message may be one")
                conv.system = message["content"]
            else:
                conv.turns.append({"role": message["role"], "content": message["content"]})
        settings = data.get("settings") or {}
        if not isinstance(settings, Mapping):
            raise ChatError("`settings` must be an object")
        for name, value in settings.items():
            if isinstance(value, bool) or not (value is None or isinstance(value, (int, float))):
                raise ChatError(f"setting `{name}` must be a number or null")
            conv.settings[setting_name(name)] = check_setting(name, value)
        return conv

    @classmethod
    def load(cls, path: str | Path, settings: Mapping[str, float | int | None] | None = None) -> Conversation:
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ChatError(f"cannot read `{path}`: {exc.strerror or exc}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ChatError(f"`{path}` is not JSON: {exc}") from None
        try:
            return cls.from_json(data, settings)
        except ChatError as exc:
            raise ChatError(f"`{path}`: {exc}") from None


# Slash commands: name -> (argument synopsis, help line). `/quit` is an alias of `/exit`.
COMMANDS: dict[str, tuple[str, str]] = {
    "help": ("", "show this help"),
    "reset": ("", "forget the conversation (the system prompt and settings stay)"),
    "system": ("[TEXT]", "set the system prompt; without TEXT, remove it"),
    "set": ("[NAME VALUE]", "set temperature, top_p or max_tokens (`default` to unset); alone: show them"),
    "save": ("FILE", "write the conversation to FILE as JSON"),
    "load": ("FILE", "replace the conversation with one from FILE"),
    "model": ("[NAME]", "show the model and server; with NAME, switch to another model the server has"),
    "exit": ("", "leave (Ctrl-D does too)"),
}
ALIASES = {"quit": "exit", "q": "exit", "?": "help"}


@dataclass(frozen=True)
class Command:
    name: str
    arg: str  # the rest of the line, stripped; "" when there is none


def is_command(line: str) -> bool:
    """Whether `line` is a slash command; `//text` sends `/text` as a message."""
    return line.startswith("/") and not line.startswith("//")


def parse_command(line: str) -> Command:
    """`/set top_p 0.9` -> Command("set", "top_p 0.9"); an unknown command is a `ChatError`."""
    word, _, arg = line[1:].strip().partition(" ")
    name = ALIASES.get(word.lower(), word.lower())
    if name not in COMMANDS:
        raise ChatError(f"unknown command `/{word}`; `/help` lists them" if word
                        else "`/` alone is not a command; `/help` lists them")
    arg = arg.strip()
    if name in ("save", "load") and not arg:
        raise ChatError(f"`/{name}` needs a FILE")
    if name in ("help", "reset", "exit") and arg:
        raise ChatError(f"`/{name}` takes no argument")
    return Command(name, arg)


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

        from vmetal.server import is_loopback

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
