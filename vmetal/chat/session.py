"""What a `vmetal chat` session knows, apart from the terminal and the server: the conversation and the
slash commands.

- `Conversation`: the system prompt, the turns so far and the sampling settings; saved and loaded as JSON
  whose `messages` list is exactly what the OpenAI chat API takes.
- `parse_command` / `COMMANDS`: the slash commands, their arguments and their help lines.

The server protocol is `vmetal.chat.client`; nothing here or there writes to the terminal, `vmetal.cli.chat`
does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

FILE_FORMAT = "vmetal-chat/1"
ROLES = ("system", "user", "assistant")


class ChatError(Exception):
    """Something the user asked for in the session cannot be done (a bad value, an unreadable file)."""


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
