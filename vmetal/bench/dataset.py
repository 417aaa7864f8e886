"""Benchmark prompt files, checked line by line before any request is sent.

Two formats, told apart by each record's keys:

- vLLM's "custom" JSONL, one object a line: `{"prompt": "...", "output_tokens": 128}` (`output_tokens`
  optional);
- ShareGPT: `{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}`, one
  object a line (`.jsonl`) or a JSON list of them (`.json`, the ShareGPT download as it is).

vLLM reads these itself (`CustomDataset`, `ShareGPTDataset`), but a bad line there surfaces as a pandas or
KeyError traceback with no line number. Here every record is checked first and the first bad one is
reported as `FILE, line N: what is wrong`; the good records are then written to a temporary file in the
layout vLLM's class expects, so sampling, chat templates and output lengths stay vLLM's.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmetal.errors import USAGE, VmetalError

CUSTOM = "custom"      # vLLM's --dataset-name for prompt/output_tokens JSONL
SHAREGPT = "sharegpt"  # vLLM's --dataset-name for ShareGPT JSON

FORMAT_HINT = ('each line must be a JSON object with "prompt" (and optionally "output_tokens"), or a '
               'ShareGPT record with "conversations" (a list of at least two {"from", "value"} turns)')


@dataclass
class Dataset:
    """A checked prompt file: vLLM's dataset name, the file vLLM reads, how many records it holds."""

    source: Path
    name: str
    path: Path
    records: int
    all_have_output_tokens: bool = False


def _bad(where: str, what: str) -> VmetalError:
    return VmetalError(f"malformed dataset `{where}`: {what}", hint=FORMAT_HINT, exit_code=USAGE)


def _kind(record: Any, where: str) -> str:
    """CUSTOM or SHAREGPT for a valid record; raise naming `where` (file and line) otherwise."""
    if not isinstance(record, dict):
        raise _bad(where, f"expected a JSON object, found {type(record).__name__}")
    if "prompt" in record:
        if not isinstance(record["prompt"], str) or not record["prompt"]:
            raise _bad(where, '"prompt" must be a non-empty string')
        if "output_tokens" in record:
            n = record["output_tokens"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise _bad(where, f'"output_tokens" must be a positive integer, not {json.dumps(n)}')
        return CUSTOM
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or len(turns) < 2:
            raise _bad(where, '"conversations" must be a list of at least two turns')
        for i, turn in enumerate(turns[:2]):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise _bad(where, f'turn {i + 1} of "conversations" needs a string "value"')
        return SHAREGPT
    keys = ", ".join(f'"{k}"' for k in list(record)[:5]) or "no keys"
    raise _bad(where, f'a record needs "prompt" or "conversations" (it has {keys})')


def _read_jsonl(path: Path, text: str) -> tuple[list[Any], list[str]]:
    records, wheres = [], []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}, line {number}"
        try:
            records.append(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise _bad(where, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        wheres.append(where)
    return records, wheres


def _read_json(path: Path, text: str) -> tuple[list[Any], list[str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _bad(f"{path}, line {exc.lineno}", f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise _bad(str(path), f"expected a JSON list of records, found {type(data).__name__}")
    # One JSON document: a record's position in the list says where to look.
    return data, [f"{path}, record {i}" for i in range(1, len(data) + 1)]


def load(path: str | Path, work_dir: str | Path | None = None) -> Dataset:
    """Check `path` and write what vLLM will read; `VmetalError` (exit 2) naming the first bad line."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise VmetalError(f"dataset `{path}` does not exist" if not source.exists()
                          else f"dataset `{path}` is not a file", exit_code=USAGE)
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise VmetalError(f"cannot read dataset `{path}`: {exc}", exit_code=USAGE) from None
    # A .json file (or anything starting with `[`) is one document; everything else is JSON Lines.
    whole = source.suffix.lower() == ".json" or text.lstrip().startswith("[")
    records, wheres = _read_json(source, text) if whole else _read_jsonl(source, text)
    if not records:
        raise _bad(str(source), "no records (the file is empty)")
    first = _kind(records[0], wheres[0])
    for record, where in zip(records[1:], wheres[1:]):
        kind = _kind(record, where)
        if kind != first:
            raise _bad(where, f"a {kind} record in a file of {first} records; use one format per file")
    out_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="vmetal-bench-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if first == CUSTOM:
        # vLLM's CustomDataset wants `.jsonl` and only these two columns.
        out = out_dir / "dataset.jsonl"
        keep = [{k: r[k] for k in ("prompt", "output_tokens") if k in r} for r in records]
        out.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        return Dataset(source, CUSTOM, out, len(records),
                       all_have_output_tokens=all("output_tokens" in r for r in records))
    out = out_dir / "dataset.json"
    out.write_text(json.dumps([{"conversations": r["conversations"]} for r in records]), encoding="utf-8")
    return Dataset(source, SHAREGPT, out, len(records))
