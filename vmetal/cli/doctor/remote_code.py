"""Does `--model` ship Python code, and would it run? `trust_remote_code` is off unless asked for.

vLLM runs a model's own code (`auto_map` in config.json or tokenizer_config.json, naming `*.py` files of
the checkpoint) only with `--trust-remote-code`, and mlx-lm runs config.json's `model_file` only with
`trust_remote_code=True`, which vmetal never passes. So the check is ok unless `vmetal serve` is to be given
`--trust-remote-code` (passed to doctor after `--`, as to serve): then it warns, naming the files that
would run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FLAG = "--trust-remote-code"


def code_files(folder: Path) -> list[str]:
    """The Python files a checkpoint asks to be run: `auto_map` targets, `model_file`, and any `*.py`."""
    named: set[str] = set()
    for name in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        auto_map = data.get("auto_map")
        targets = auto_map.values() if isinstance(auto_map, dict) else []
        for target in targets:
            for ref in target if isinstance(target, list) else [target]:
                if isinstance(ref, str) and "." in ref:
                    named.add(ref.split("--")[-1].rsplit(".", 1)[0] + ".py")
        if isinstance(data.get("model_file"), str):
            named.add(data["model_file"])
    named.update(p.name for p in folder.glob("*.py"))
    return sorted(named)


def check_remote_code(model_path: Path | None, vllm_args: list[str], make: Any) -> Any:
    """A doctor `Check` (built with doctor's `make(status, summary, fix, **details)`)."""
    on = FLAG in vllm_args
    files = code_files(model_path) if model_path is not None and model_path.is_dir() else []
    details = {"trust_remote_code": on, "code_files": files}
    if on and files:
        return make("warn", f"on: {', '.join(files)} of the model would run inside the server",
                    f"drop `{FLAG}` unless you trust this model's authors", **details)
    if on:
        return make("warn", "on: Python code shipped with a model may run inside the server",
                    f"drop `{FLAG}` unless the model needs it and you trust it", **details)
    if files:
        return make("ok", f"off: the model ships {', '.join(files)}, which will not run", None, **details)
    return make("ok", "off (the default): no code from a model's files runs", None, **details)
