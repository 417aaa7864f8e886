"""Which KV path can hold a model's state, decided from what mlx-lm's own model class makes for the checkpoint,
not from the architecture's name.

A model is served on a KV path when mlx-lm has a module for its `model_type` (mlx-lm's own resolution,
remappings included) and every cache that module's `Model.make_cache()` builds for this config (mlx-lm's
default, a `KVCache` per layer, where there is none) is a type the path holds. The cache types are the
model's state: a Gemma 3 makes sliding-window `RotatingKVCache`s for five layers in six, a Qwen3-Next
recurrent `ArraysCache`s, a Qwen3-MoE plain `KVCache`s, whatever the name of its class. Two more facts of the
state decide between the paths for full-attention models: whether the paged pools can hold its K/V and reach its
attention (`paged_obstacle`: attention computed in the model's own code), and whether mlx-lm can decode it in a
left-padded batch, which the MLX-managed path does (`batch_obstacle`: Gemma 2 with grouped-query attention).

How this is found without loading weights: the model class is instantiated from the checkpoint's own config at
full size (MLX builds its random initial weights lazily, so nothing is computed or allocated), mlx-lm's
`make_prompt_cache` is called on it, and the two obstacles are read off forwards that MLX only builds, never
evaluates (shapes are known when the graph is built). The CLI does it in a short child process (`main`, about
0.1 s): importing the `mlx_lm` package runs its `__init__`, which imports transformers (about 5 s), so the child
imports only `mlx_lm.models` (under a bare package entry, see `probe`), and the CLI's process never imports
mlx. The engine, which imports mlx-lm anyway, asks the same question in-process before it reads a weight
(`model_state_here`), so a refusal reads the same wherever it happens.

Stdlib only at module level: the CLI imports this module for its pre-flight.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmetal.preflight.checkpoint import UnsupportedModelError

# The cache types each KV path holds, by mlx-lm class name (exact classes: a subclass may store its state
# differently). The MLX-managed path merges rows with mlx-lm's BatchKVCache and rolls back by `trim`; the
# paged path writes K/V into vLLM's full-attention blocks; the PyTorch baseline batches HF full attention.
# A layer with several caches (mlx-lm's CacheList) is held where each of its members is (`holds`).
SUPPORTED: dict[str, frozenset[str]] = {
    "mlx": frozenset({"KVCache", "RotatingKVCache", "ArraysCache"}),
    "paged": frozenset({"KVCache", "RotatingKVCache"}),
    "torch": frozenset({"KVCache"}),
}
# A draft model's caches that its drafter can roll back (a sliding window's kept whole: draft_model.draft_cache).
DRAFT_CACHES = frozenset({"KVCache", "RotatingKVCache"})
# How to get onto a path from `vmetal serve`, for the refusal's advice.
PATH_HOWTO = {"mlx": "use the MLX-managed path (leave out --paged)", "paged": "use --paged",
              "torch": "use VLLM_METAL_USE_MLX=0"}
# What a layer keeping this cache type is, in the user's words.
KINDS: dict[str, str] = {
    "KVCache": "full-attention layers",
    "RotatingKVCache": "sliding-window attention layers",
    "ArraysCache": "recurrent (SSM / linear-attention) layers of a hybrid model",
    "MambaCache": "recurrent (SSM) layers",
    "ChunkedKVCache": "chunked-attention layers",
    "CacheList": "layers with several caches each",
    "QuantizedKVCache": "quantized KV layers",
}

PROBE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ModelState:
    """What mlx-lm makes for a checkpoint: its module and one cache description per layer."""

    family: str  # e.g. "gemma3_text (Gemma3ForCausalLM)"
    module: str  # the mlx-lm module, e.g. "gemma3_text"
    caches: tuple[str, ...]  # per layer: "KVCache", "RotatingKVCache", "CacheList(KVCache, ArraysCache)", …
    # Why the paged path's block pools cannot hold its full-attention layers' K/V (`paged_obstacle`), or None.
    paged: str | None = None
    # Why the MLX-managed path's decode batch cannot hold several requests of it (`batch_obstacle`), or None.
    batch: str | None = None
    # Per layer, the most tokens its cache holds: None for all of them (full attention), a sliding window's
    # size, 0 for a recurrent state that holds none (its size is fixed). Empty: not known. (`fit` sizes KV by it.)
    held: tuple[int | None, ...] = ()


def family_of(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    named = ", ".join(archs) if isinstance(archs, list) else str(archs)
    model_type = config.get("model_type") or "unknown model_type"
    return f"{model_type} ({named})" if named else str(model_type)


# ------------------------------------------------------------------------------------ mlx-lm's module


def _mlx_lm_dir() -> Path | None:
    """Where mlx-lm is installed, found without importing it (its `__init__` imports transformers)."""
    try:
        spec = importlib.util.find_spec("mlx_lm")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=1)
def _remappings() -> tuple[dict[str, str], dict[tuple[str, str], str]]:
    """mlx-lm's `MODEL_REMAPPING` and `MODEL_ARCHITECTURE_REMAPPING`, read from its `utils.py` as literals:
    the same tables its loader uses, without importing it."""
    root = _mlx_lm_dir()
    found: dict[str, Any] = {"MODEL_REMAPPING": {}, "MODEL_ARCHITECTURE_REMAPPING": {}}
    if root is None or not (root / "utils.py").is_file():
        return found["MODEL_REMAPPING"], found["MODEL_ARCHITECTURE_REMAPPING"]
    tree = ast.parse((root / "utils.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in found:
                found[name] = ast.literal_eval(node.value)
    return found["MODEL_REMAPPING"], found["MODEL_ARCHITECTURE_REMAPPING"]


def mlx_module(config: dict[str, Any], where: str = "config.json") -> str:
    """The mlx-lm module that implements `config` (as mlx-lm's `_get_classes` picks it), or
    UnsupportedModelError when mlx-lm has none."""
    model_type = config.get("model_type")
    if not model_type:
        raise UnsupportedModelError(f"{where} has no `model_type`, so mlx-lm cannot tell which model it is")
    remap, arch_remap = _remappings()
    archs = config.get("architectures") or ()
    if isinstance(archs, str):
        archs = (archs,)
    name = next((arch_remap[(model_type, a)] for a in archs if (model_type, a) in arch_remap),
                remap.get(model_type, model_type))
    root = _mlx_lm_dir()
    if root is None:
        raise UnsupportedModelError("mlx-lm is not installed in this Python, so no model can be checked or "
                                    "served; run `vmetal install`")
    if not (root / "models" / f"{name}.py").is_file():
        raise UnsupportedModelError(f"{family_of(config)} (from {where}): mlx-lm has no model for model_type "
                                    f"`{model_type}`, and vmetal computes every model through mlx-lm")
    return name


# ------------------------------------------------------------------------------------ the caches


def tokens_held(cache: Any) -> int | None:
    """The most tokens one layer's cache keeps: None (all) for a KVCache and anything not known to keep fewer; a
    CacheList as much as the member that keeps most."""
    name = type(cache).__name__
    if name == "CacheList":
        held = [tokens_held(c) for c in cache.caches]
        return None if None in held else max(held)
    if name == "RotatingKVCache":
        return int(cache.max_size)
    if name == "ArraysCache":
        return 0
    return None


def describe_cache(cache: Any) -> str:
    """One layer's cache as its mlx-lm class name; a CacheList with its members'."""
    name = type(cache).__name__
    if name == "CacheList":
        return f"CacheList({', '.join(describe_cache(c) for c in cache.caches)})"
    return name


def probe(module: str, config: dict[str, Any]) -> tuple[list[str], str | None, str | None, list[int | None]]:
    """mlx-lm's caches for `config`, one description per layer, its `paged_obstacle`, its `batch_obstacle` and
    the tokens each layer's cache holds (`tokens_held`), from its model class built lazily (no weights).

    In the child (and any process that has not imported mlx-lm yet) `mlx_lm` is entered in sys.modules as a
    bare package over its folder, so `mlx_lm.models.<module>` imports without the package's `__init__`
    (transformers); a process that has imported mlx-lm (the engine) uses it as it is."""
    import types

    root = _mlx_lm_dir()
    if "mlx_lm" not in sys.modules and root is not None:
        package = types.ModuleType("mlx_lm")
        package.__path__ = [str(root)]
        sys.modules["mlx_lm"] = package
    import importlib

    arch = importlib.import_module(f"mlx_lm.models.{module}")
    from mlx_lm.models.cache import make_prompt_cache

    model = arch.Model(arch.ModelArgs.from_dict(config))
    made = make_prompt_cache(model)
    caches = [describe_cache(c) for c in made]
    # Probed only where the path holds every cache type (the others are refused by their types already).
    return (caches, paged_obstacle(model) if all(holds("paged", c) for c in caches) else None,
            batch_obstacle(model) if all(holds("mlx", c) for c in caches) else None, [tokens_held(c) for c in made])


def batch_obstacle(model: Any) -> str | None:
    """Why mlx-lm's model cannot decode requests of different lengths in one batch, or None when it can.

    The MLX-managed path merges each request's caches into mlx-lm's left-padded batch caches (each cache type's
    own `merge`: BatchKVCache, BatchRotatingKVCache), whose mask and per-row offsets a model's attention must
    broadcast (Gemma 2's grouped-query attention does not: mlx-lm's
    own batch_generate fails on it too). Three prompts of different lengths are prefilled and one batched
    decode step is built, never evaluated: a shape error shows when the graph is built, so a full-size model
    computes and allocates nothing. Three rows, not two: a batch as large as a dimension of the model's own
    (Gemma 2's 2-row batch against its 2 KV heads) can broadcast where any other size fails."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    lengths = (4, 3, 2)
    rows = []
    try:
        for length in lengths:
            cache = make_prompt_cache(model)
            model(mx.zeros((1, length), dtype=mx.int32), cache=cache)
            rows.append(cache)
        batch = [type(layer[0]).merge(list(layer)) for layer in zip(*rows)]
        shape = model(mx.zeros((len(lengths), 1), dtype=mx.int32), cache=batch).shape
    except Exception as exc:  # whatever the family's code raises on a batched cache: the reason, as one line
        first = str(exc).splitlines()[0] if str(exc) else ""
        return (f"mlx-lm's model cannot decode requests of different lengths in one batch "
                f"({type(exc).__name__}: {first})")
    if tuple(shape[:2]) != (len(lengths), 1):
        return f"mlx-lm's model decodes {len(lengths)} requests in one batch into logits of shape {tuple(shape)}"
    return None


def attention_modules(model: Any) -> list[str]:
    """The modules whose `scaled_dot_product_attention` the model's attention calls: those of its own class and
    of every submodule's class that define one (SmolLM3 runs Llama's attention class, from `llama`). The paged
    path's hook (`install_attention_hook`) replaces it in each."""
    names = {type(model).__module__} | {type(m).__module__ for m in model.modules()}
    return sorted(n for n in names if hasattr(sys.modules.get(n), "scaled_dot_product_attention"))


# Attention classes that compute their scores in their own code (not through `scaled_dot_product_attention`)
# and that the paged path attends for all the same (`vmetal.engine.runner.kv.own_attention`): Gemma 2's softcap.
PAGED_OWN_ATTENTION = frozenset({"mlx_lm.models.gemma2.Attention"})


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def paged_obstacle(model: Any) -> str | None:
    """Why the paged path's pools cannot hold `model`'s full-attention K/V, or None when they can.

    The hook routes the attention only where the model calls mlx-lm's `scaled_dot_product_attention`
    (`attention_modules`); K and V may differ in width (MLA: pools of their own widths). Where it is called is
    read off a one-token forward that MLX only builds, never evaluates (a model instantiated at full size
    computes and allocates nothing): each layer's cache records whether the attention after its update came
    through the hook. It stops at the third layer: two show the pattern, and a stop before any MLP of later
    layers keeps the build short.
    """
    import importlib

    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    if any(qualified_name(type(m)) in PAGED_OWN_ATTENTION for m in model.modules()):
        return None
    seen: list[dict[str, Any]] = []

    class _Stop(Exception):
        pass

    class _Recording:
        def __init__(self, real: Any, index: int):
            self._real, self._index = real, index

        def __getattr__(self, name: str) -> Any:
            return getattr(self._real, name)

        def update_and_fetch(self, keys: Any, values: Any) -> Any:
            if self._index >= 2:
                raise _Stop
            seen.append({"routed": False})
            return self._real.update_and_fetch(keys, values)

    patched = {}
    for name in attention_modules(model):
        module = importlib.import_module(name)
        original = module.scaled_dot_product_attention

        def routed(queries, keys, values, cache, *args, _original=original, **kwargs):
            if isinstance(cache, _Recording):
                seen[cache._index]["routed"] = True
            return _original(queries, keys, values, cache, *args, **kwargs)

        patched[module] = original
        module.scaled_dot_product_attention = routed
    try:
        caches = [_Recording(c, i) for i, c in enumerate(make_prompt_cache(model))]
        model(mx.array([[0]], dtype=mx.int32), cache=caches)
    except _Stop:
        pass
    finally:
        for module, original in patched.items():
            module.scaled_dot_product_attention = original
    for layer in seen:
        if not layer["routed"]:
            return ("its attention is computed in the model's own code, not through mlx-lm's "
                    "scaled_dot_product_attention, which is where the paged path routes attention to its blocks")
    return None


@functools.lru_cache(maxsize=16)
def _probe_in_child(module: str, config_json: str) -> tuple[tuple[str, ...], str | None, str | None,
                                                             tuple[int | None, ...]]:
    # `-P` and an explicit path: this vmetal, never a folder of the same name in the current directory.
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r}); "
            f"from vmetal.preflight.cache_types import main; sys.exit(main([{module!r}]))")
    try:
        proc = subprocess.run([sys.executable, "-P", "-c", code], input=config_json, capture_output=True,
                              text=True, timeout=PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise UnsupportedModelError(f"mlx-lm's `{module}` model took over {PROBE_TIMEOUT_S:.0f} s to build from "
                                    "this config.json, so vmetal cannot tell whether it serves it") from None
    try:
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        answer = {"error": (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]}
    if "error" in answer:
        raise UnsupportedModelError(f"mlx-lm's `{module}` model cannot be built from this config.json: "
                                    f"{answer['error']}")
    return tuple(answer["caches"]), answer.get("paged"), answer.get("batch"), tuple(answer.get("held") or ())


def model_state(config: dict[str, Any], where: str = "config.json") -> ModelState:
    """The caches mlx-lm makes for `config`, found in a child process (see the module docstring)."""
    module = mlx_module(config, where)
    caches, paged, batch, held = _probe_in_child(module, json.dumps(config, sort_keys=True))
    return ModelState(family_of(config), module, caches, paged, batch, held)


def model_state_here(config: dict[str, Any], where: str = "config.json") -> ModelState:
    """`model_state` in this process, for one that imports mlx-lm anyway (the engine)."""
    module = mlx_module(config, where)
    caches, paged, batch, held = probe(module, config)
    return ModelState(family_of(config), module, tuple(caches), paged, batch, tuple(held))


# ------------------------------------------------------------------------------------ the decision


def members(cache: str) -> list[str]:
    """The cache types a layer's description names: its own, or a CacheList's members (`describe_cache`)."""
    if cache.startswith("CacheList(") and cache.endswith(")"):
        return [m.strip() for m in cache[len("CacheList("):-1].split(",")]
    return [cache]


def holds(kv_path: str, cache: str) -> bool:
    """Whether `kv_path` holds a layer's cache: a type it holds, or (on the MLX-managed path, which batches a
    CacheList by mlx-lm's own `merge`, member by member) a CacheList of such types."""
    if cache in SUPPORTED[kv_path]:
        return True
    return kv_path == "mlx" and cache.startswith("CacheList(") and all(m in SUPPORTED[kv_path] for m in members(cache))


def obstacle(state: ModelState, kv_path: str) -> str | None:
    """What keeps `kv_path` from holding `state`, in words, or None when nothing does."""
    missing = Counter(c for c in state.caches if not holds(kv_path, c))
    if missing:
        cache, count = missing.most_common(1)[0]
        kind = KINDS.get(cache.split("(")[0], "layers with a cache of their own kind")
        layers = f"{count} of {len(state.caches)} layers are" if count < len(state.caches) else "its layers are"
        return f"{layers} {kind} (mlx-lm's {cache})"
    return {"paged": state.paged, "mlx": state.batch}.get(kv_path)


def refusal(state: ModelState, kv_path: str) -> str | None:
    """None when `kv_path` holds `state`; else the one line naming the family, what it keeps that the path does
    not hold, and the path that would serve it."""
    why = obstacle(state, kv_path)
    if why is None:
        return None
    others = [p for p in ("mlx", "paged") if p != kv_path and obstacle(state, p) is None]
    where = PATH_HOWTO[others[0]] if others else "no vmetal KV path serves it yet"
    return f"{state.family}: {why}: {where}"


def check_caches(state: ModelState, kv_path: str) -> None:
    """Raise UnsupportedModelError unless `kv_path` holds every cache of `state`."""
    line = refusal(state, kv_path)
    if line is not None:
        raise UnsupportedModelError(line)


def check_model(config: dict[str, Any], where: str = "config.json", kv_path: str | None = None) -> ModelState:
    """The pre-flight decision for a checkpoint's config: its state, or UnsupportedModelError naming the family,
    the cache type and the path that would serve it. `kv_path` None: served on some KV path (what `pull` and
    `convert` need, before the path is chosen)."""
    state = model_state(config, where)
    if kv_path is not None:
        check_caches(state, kv_path)
    elif not servable_paths(state):
        check_caches(state, "mlx")
    return state


def check_prefix_cache(state: ModelState) -> None:
    """`VLLM_METAL_PREFIX_CACHE=1` (the MLX-managed path's own prefix cache) stores full-attention K/V per
    prompt prefix; a model with any other cache type is refused with it, naming the family."""
    others = _beyond_full_attention(state)
    if others:
        raise UnsupportedModelError(
            f"{state.family}: VLLM_METAL_PREFIX_CACHE=1 (--prefix-cache) keeps full-attention K/V only, and this "
            f"model also keeps {', '.join(others)} state; serve it without the prefix cache")


def check_speculation(state: ModelState, kv_path: str = "mlx") -> None:
    """Speculation (`--speculative-config`) on `kv_path`, or UnsupportedModelError naming the family.

    On the MLX-managed path rejected drafts are rolled back by trimming the target's caches, so a layer whose cache
    cannot trim at every length (a sliding window that wraps, a recurrent state) is refused. The paged path rolls
    nothing back: a rejected draft's position counts as not computed and its slot is written again when it is, so
    every layer it keeps in vLLM's blocks, sliding windows included, can speculate. `kv_path` "draft": a draft
    model's own caches, which its drafter keeps whole for sliding-window layers too (`draft_model.draft_cache`), so
    attention of either kind drafts and only a recurrent state is refused."""
    if kv_path == "draft":
        others = sorted({c for c in state.caches if c not in DRAFT_CACHES})
        if others:
            raise UnsupportedModelError(
                f"{state.family}: a draft model rolls its rejected drafts back out of its own cache, and this model "
                f"also keeps {', '.join(others)} state, which cannot give them back; pick a draft whose layers are "
                f"all attention (full or sliding-window)")
        return
    if kv_path == "paged":
        others = sorted({c for c in state.caches if not holds("paged", c)})
    else:
        others = _beyond_full_attention(state)
    if others:
        paged = kv_path != "paged" and obstacle(state, "paged") is None
        raise UnsupportedModelError(
            f"{state.family}: speculative decoding (`--speculative-config`) rolls rejected tokens back out of the "
            f"KV cache, and this model also keeps {', '.join(others)} state, which cannot give them back; serve "
            f"it without speculation{', or ' + PATH_HOWTO['paged'] + ' (which rolls nothing back)' if paged else ''}")


def _beyond_full_attention(state: ModelState) -> list[str]:
    """The cache types of `state` other than mlx-lm's full-attention `KVCache`, sorted."""
    return sorted({c for c in state.caches if c != "KVCache"})


def servable_paths(state: ModelState) -> list[str]:
    """The vmetal KV paths (of the MLX compute backend) that hold every cache of `state`."""
    return [p for p in ("mlx", "paged") if refusal(state, p) is None]


def main(argv: Sequence[str] | None = None) -> int:
    """The child: given MODULE and config.json on stdin, prints {"caches": [...], "paged": …, "batch": …} (or
    {"error": "..."})."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        caches, paged, batch, held = probe(args[0], json.loads(sys.stdin.read()))
    except Exception as exc:  # whatever mlx-lm raises on a config it cannot build, reported as one line
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 0
    print(json.dumps({"caches": caches, "paged": paged, "batch": batch, "held": held}))
    return 0
