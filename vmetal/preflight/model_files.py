"""Is this model folder loadable? Cheap checks of its files before an engine spends seconds finding out.

`vmetal serve` (pre-flight), `vmetal pull` (a local folder; a hub's config.json before any weight) and
`vmetal doctor --model` run `check_folder`. Each problem is one `ModelFileError` line naming the file and
what is wrong with it: an empty folder, a config.json that is not JSON or lacks / has absurd shape fields,
safetensors whose header is damaged or whose data is truncated, weights whose embedding disagrees with
config.json, a tokenizer with more tokens than the model has embeddings. Nothing is loaded: the safetensors
header (a few kB) and the JSON files are read, never the tensors, so a 10 GB model is checked in
milliseconds. Stdlib only.

The format facts come from the safetensors specification: 8 bytes little-endian header length N, N bytes of
JSON `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the data; offsets
are relative to the data's start.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

WEIGHT_GLOB = "model*.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Larger than any released checkpoint by an order of magnitude; beyond them a value is a typo or hostile
# (and would make the KV estimate or the engine allocate absurdly).
LIMITS = {
    "hidden_size": 1 << 17,
    "num_hidden_layers": 1 << 10,
    "num_attention_heads": 1 << 12,
    "num_key_value_heads": 1 << 12,
    "intermediate_size": 1 << 20,
    "vocab_size": 1 << 23,
    "max_position_embeddings": 1 << 24,
    "head_dim": 1 << 12,
}
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
MAX_HEADER = 100 * 1024 * 1024   # the safetensors reference implementation's own limit
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1, "F8_E8M0": 1, "F4": 0.5}


class ModelFileError(ValueError):
    """One file of a model folder that cannot work; `path` is that file."""

    def __init__(self, path: Path, problem: str, hint: str | None = None) -> None:
        super().__init__(f"`{path}` {problem}")
        self.path = path
        self.hint = hint


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ModelFileError(path, "is not UTF-8 text, so not JSON") from None
    except ValueError as exc:
        raise ModelFileError(path, f"is not valid JSON ({exc})") from None
    except OSError as exc:
        raise ModelFileError(path, f"cannot be read ({exc.strerror or exc})") from None


def check_config(config: Any, path: Path) -> dict[str, Any]:
    """config.json's shape fields: present, positive integers, below `LIMITS`, and consistent."""
    if not isinstance(config, dict):
        raise ModelFileError(path, f"holds a JSON {type(config).__name__}, not an object")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise ModelFileError(path, "has no `model_type`: not a transformers model config",
                             hint="a Hugging Face model folder's config.json names its model_type, e.g. `qwen3`")
    inner = config.get("text_config")
    shape = {**config, **inner} if isinstance(inner, dict) and "num_hidden_layers" not in config else config
    for field in REQUIRED:
        if field not in shape:
            raise ModelFileError(path, f"has no `{field}`")
    for field, limit in LIMITS.items():
        value = shape.get(field)
        if value is None and field not in REQUIRED:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelFileError(path, f"has `{field}` = {json.dumps(value)}: expected a positive integer")
        if not 0 < value <= limit:
            raise ModelFileError(path, f"has `{field}` = {value}: expected a positive integer up to {limit}")
    heads, kv = shape["num_attention_heads"], shape.get("num_key_value_heads") or shape["num_attention_heads"]
    if heads % kv:
        raise ModelFileError(path, f"has `num_attention_heads` = {heads}, not a multiple of "
                                   f"`num_key_value_heads` = {kv}")
    if not shape.get("head_dim") and shape["hidden_size"] % heads:
        raise ModelFileError(path, f"has `hidden_size` = {shape['hidden_size']}, not a multiple of "
                                   f"`num_attention_heads` = {heads} (and no `head_dim`)")
    return shape


def safetensors_header(path: Path) -> dict[str, Any]:
    """The header of one safetensors file, every tensor's extent checked against the file's size."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ModelFileError(path, f"is truncated: {size} bytes, shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or n > size - 8:
            raise ModelFileError(path, f"is not a safetensors file or is truncated: its header claims {n} bytes, "
                                       f"the file has {size}")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise ModelFileError(path, "has a damaged safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ModelFileError(path, "has a damaged safetensors header (not a JSON object)")
    data = size - 8 - n
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            width = DTYPE_BYTES[dtype]
            count = math.prod(int(d) for d in shape)
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(path, f"has a damaged safetensors entry for tensor `{name}`") from None
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end) or end - begin != count * width:
            raise ModelFileError(path, f"has a damaged safetensors entry for tensor `{name}` (its offsets do "
                                       "not match its shape)")
        end_max = max(end_max, end)
    if end_max > data:
        raise ModelFileError(path, f"is truncated: its tensors need {end_max} bytes of data, the file has {data}",
                             hint="download it again (`vmetal pull` verifies every file)")
    return header


def _embedding(headers: dict[Path, dict[str, Any]]) -> tuple[Path, str, list[int]] | None:
    for path, header in headers.items():
        for name, info in header.items():
            if name.endswith("embed_tokens.weight") and isinstance(info, dict):
                return path, name, list(info["shape"])
    return None


def tokenizer_max_id(path: Path) -> int | None:
    """The largest token id tokenizer.json can produce (its model's vocab and its added tokens)."""
    data = _load_json(path)
    if not isinstance(data, dict):
        raise ModelFileError(path, "is not a tokenizers JSON object")
    ids: list[int] = []
    vocab = (data.get("model") or {}).get("vocab") if isinstance(data.get("model"), dict) else None
    if isinstance(vocab, dict):
        ids += [v for v in vocab.values() if isinstance(v, int)]
    elif isinstance(vocab, list):
        ids.append(len(vocab) - 1)
    ids += [t["id"] for t in data.get("added_tokens") or [] if isinstance(t, dict) and isinstance(t.get("id"), int)]
    return max(ids) if ids else None


def check_folder(folder: str | Path) -> None:
    """Raise `ModelFileError` for the first file of `folder` that cannot work; return quietly otherwise."""
    folder = Path(folder)
    if not any(folder.iterdir()):
        raise ModelFileError(folder, "is an empty folder: no config.json, tokenizer or weights",
                             hint="pull a model into it (`vmetal pull ORG/NAME`) or pass another folder")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelFileError(cfg_path, "is missing: not a Hugging Face model folder")
    config = _load_json(cfg_path)
    shape = check_config(config, cfg_path)

    weights = sorted(folder.glob(WEIGHT_GLOB))
    if not weights:
        raise ModelFileError(folder, f"has no `{WEIGHT_GLOB}` weights, which is what vmetal loads")
    index = folder / INDEX_FILE
    if index.is_file():
        listed = _load_json(index)
        shards = set((listed.get("weight_map") or {}).values()) if isinstance(listed, dict) else set()
        for shard in sorted(shards):
            if not (folder / str(shard)).is_file():
                raise ModelFileError(folder / str(shard), f"is missing (listed by {INDEX_FILE})")
    headers = {p: safetensors_header(p) for p in weights}

    vocab = shape["vocab_size"]
    embedding = _embedding(headers)
    quantized = "quantization" in config or "quantization_config" in config
    if embedding is not None:
        path, name, dims = embedding
        if len(dims) != 2 or dims[0] != vocab or (not quantized and dims[1] != shape["hidden_size"]):
            raise ModelFileError(path, f"holds `{name}` of shape {dims}, but {cfg_path.name} says vocab_size="
                                       f"{vocab}, hidden_size={shape['hidden_size']}: the weights and config.json "
                                       "are from different models")
    for name in ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            _load_json(folder / name)
    tok = folder / "tokenizer.json"
    if tok.is_file():
        top = tokenizer_max_id(tok)
        if top is not None and top >= vocab:
            raise ModelFileError(tok, f"has token ids up to {top}, but the model has {vocab} embeddings "
                                      f"(vocab_size in {cfg_path.name}): the tokenizer belongs to another model")
