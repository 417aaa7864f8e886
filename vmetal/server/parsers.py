"""vLLM's tool-call and reasoning parsers: their names, and which tool-call parser fits a model folder.

`vmetal serve` checks a parser name before anything starts and picks the tool-call parser for the model
family. Both must stay cheap: importing `vllm.tool_parsers` imports vLLM itself (~10 s on a busy machine,
before the server would import it again). vLLM registers every built-in parser in one literal table per
kind (`_TOOL_PARSERS_TO_REGISTER` in vllm/tool_parsers/__init__.py, `_REASONING_PARSERS_TO_REGISTER` in
vllm/reasoning/__init__.py), so the names are read from vLLM's own source rather than copied here; the
slow import is the fallback should a release stop spelling the table as a literal.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

# (vLLM package, its registry table, the manager class whose `list_registered()` is the slow truth)
_REGISTRIES = {
    "tool": ("tool_parsers", "_TOOL_PARSERS_TO_REGISTER", "vllm.tool_parsers", "ToolParserManager"),
    "reasoning": ("reasoning", "_REASONING_PARSERS_TO_REGISTER", "vllm.reasoning", "ReasoningParserManager"),
}


@functools.cache
def registered(kind: str) -> tuple[str, ...]:
    """The parser names vLLM accepts for `kind` ("tool" or "reasoning"), sorted."""
    package, table, module, manager = _REGISTRIES[kind]
    names = _table_keys(package, table)
    if names is None:
        cls = getattr(importlib.import_module(module), manager)
        names = cls.list_registered()
    return tuple(sorted(names))


def _table_keys(package: str, table: str) -> list[str] | None:
    # find_spec("vllm") locates the package without running vllm/__init__.py.
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / package / "__init__.py"
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id == table for t in node.targets)):
            keys = [k.value for k in node.value.keys if isinstance(k, ast.Constant)]
            if keys and all(isinstance(k, str) for k in keys) and len(keys) == len(node.value.keys):
                return keys
    return None


class UnknownParserError(ValueError):
    pass


def check_name(kind: str, name: str, flag: str) -> None:
    """Raise `UnknownParserError` (one line, the valid names in it) unless vLLM registers `name`."""
    valid = registered(kind)
    if name not in valid:
        raise UnknownParserError(f"`{flag} {name}` is not a {kind} parser vLLM knows; valid: {', '.join(valid)}")


@dataclass(frozen=True)
class ToolParserChoice:
    name: str | None  # None: no parser fits, so vLLM runs without auto tool choice
    reason: str


# Markers of a chat template's tool-call format, most specific first: the template is what the model
# was trained to emit, so it decides over the architecture (a Llama fine-tune in Hermes format is hermes).
_TEMPLATE_MARKERS = (
    ("<function=", "qwen3_coder", "Qwen3-Coder XML tool calls"),
    ("<tool_call>", "hermes", "<tool_call> JSON tool calls"),
    ("[TOOL_CALLS]", "mistral", "[TOOL_CALLS] tool calls"),
    ("<|python_tag|>", "llama3_json", "Llama 3 JSON tool calls"),
)
# Model types vLLM serves in OpenAI's Harmony format, and the one tool parser it accepts for them.
_HARMONY = {"gpt_oss": "openai"}
# A template that renders tools but shows none of the markers: the family's usual format.
_FAMILY_PARSERS = {
    "qwen2": "hermes", "qwen2_moe": "hermes", "qwen3": "hermes", "qwen3_moe": "hermes",
    "llama": "llama3_json", "mistral": "mistral",
}


def chat_template(folder: Path) -> str | None:
    """The model's default chat template text, where transformers would find it."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8", errors="replace")
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # named templates: transformers uses "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _model_type(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def pick_tool_parser(folder: str | Path | None) -> ToolParserChoice:
    """The tool-call parser for the model in `folder`, judged by its chat template and `model_type`."""
    if folder is None or not Path(folder).is_dir():
        return ToolParserChoice(None, "the model is not on disk yet to tell its family")
    folder = Path(folder)
    model_type = _model_type(folder) or "unknown"
    if model_type in _HARMONY:
        # vLLM renders and parses gpt-oss in OpenAI's Harmony format by its model type, whatever the template,
        # and refuses to start with any other tool parser beside it.
        return ToolParserChoice(_HARMONY[model_type], f"{model_type} model, which vLLM serves in OpenAI's Harmony "
                                                      "format")
    template = chat_template(folder)
    if template is None:
        return ToolParserChoice(None, f"the {model_type} model has no chat template")
    for marker, name, what in _TEMPLATE_MARKERS:
        if marker in template:
            return ToolParserChoice(name, f"{model_type} model, its chat template uses {what}")
    if "tools" not in template:
        return ToolParserChoice(None, f"the {model_type} model's chat template does not render tools")
    if model_type in _FAMILY_PARSERS:
        return ToolParserChoice(_FAMILY_PARSERS[model_type], f"{model_type} model family")
    return ToolParserChoice(None, f"no known tool-call format for a {model_type} model")
