"""The environment variable contract of vmetal (see ENV.md), parsed and validated in one place.

The engine, `vmetal serve` and `vmetal doctor` all go through `load_config`, so a value that one of them
accepts is accepted by all of them, and every rejection reads the same. This module is imported by the
platform plugin in every vLLM process, so it imports nothing heavy: mlx is only imported lazily when the
MLX device has to be probed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

MEMORY_FRACTION = "VLLM_METAL_MEMORY_FRACTION"
USE_MLX = "VLLM_METAL_USE_MLX"
MLX_DEVICE = "VLLM_MLX_DEVICE"
BLOCK_SIZE = "VLLM_METAL_BLOCK_SIZE"
USE_PAGED_ATTENTION = "VLLM_METAL_USE_PAGED_ATTENTION"
DEBUG = "VLLM_METAL_DEBUG"
USE_MODELSCOPE = "VLLM_USE_MODELSCOPE"
MODELSCOPE_CACHE = "VLLM_METAL_MODELSCOPE_CACHE"
PREFIX_CACHE = "VLLM_METAL_PREFIX_CACHE"
PREFIX_CACHE_FRACTION = "VLLM_METAL_PREFIX_CACHE_FRACTION"
KERNELS = "VLLM_METAL_KERNELS"
RING_PORT = "VLLM_METAL_RING_PORT"
COMPILE = "VLLM_METAL_COMPILE"
PACKED_PROJECTIONS = "VLLM_METAL_PACKED_PROJECTIONS"
LAUNCH_THREAD = "VLLM_METAL_LAUNCH_THREAD"
# Not part of the engine's contract (the engine never reads it), but read here so there is one reader.
HOME = "VMETAL_HOME"

# What `auto` means once the paged KV cache has to be given an explicit budget.
AUTO_KV_FRACTION = 0.9
# The block sizes the paged attention kernels are compiled for.
SUPPORTED_BLOCK_SIZES = (8, 16, 32)

Source = Literal["default", "environment", "flag"]


class Variable(NamedTuple):
    name: str
    default: str | None  # None: unset by default
    meaning: str


VARIABLES: tuple[Variable, ...] = (
    Variable(MEMORY_FRACTION, "auto",
             "`auto` sizes memory to fit plus a minimal KV cache; `0.x` is the device-memory fraction "
             "for the paged KV cache"),
    Variable(USE_MLX, "1", "compute with MLX (`1`) or with PyTorch on the torch device (`0`, the baseline)"),
    Variable(MLX_DEVICE, "gpu", "MLX device, `gpu` (Metal or CUDA) or `cpu`; unset falls back to `cpu` "
             "when MLX has no GPU"),
    Variable(BLOCK_SIZE, "16", "KV cache block size in tokens: 8, 16 or 32"),
    Variable(USE_PAGED_ATTENTION, "0", "enable the paged KV cache managed by vLLM's KV cache manager"),
    Variable(DEBUG, "0", "debug logging"),
    Variable(USE_MODELSCOPE, "False", "download models from ModelScope instead of Hugging Face, with no "
             "fallback"),
    Variable(MODELSCOPE_CACHE, None, "absolute path of a local ModelScope model or cache to load from"),
    Variable(PREFIX_CACHE, None, "set to enable prefix caching for shared prompt reuse"),
    Variable(PREFIX_CACHE_FRACTION, "0.05", "fraction of the MLX working set for the prefix cache, in (0, 1]"),
    Variable(KERNELS, "auto", "paged attention through the Metal kernels: `auto` where MLX computes on Metal, "
             "`1` always (an error elsewhere), `0` never (the pure-MLX reference); `0` also keeps each "
             "attention layer's query/key norms and RoPE as mlx-lm's ops instead of one kernel (Metal's or "
             "CUDA's)"),
    Variable(RING_PORT, None, "first TCP port of MLX's ring under tensor parallel: the ranks on a machine "
             "listen on it and the ports after it (unset: a free port each, picked at start)"),
    Variable(COMPILE, "1", "the paged path's all-decode steps as compiled MLX functions, one per batch and "
             "context size bucket (`1`), or built op by op every step (`0`)"),
    Variable(PACKED_PROJECTIONS, "1", "each layer's query/key/value and gate/up projections packed into one "
             "matmul each at load (`1`), or kept as mlx-lm builds them (`0`)"),
    Variable(LAUNCH_THREAD, "auto", "the decode-ahead's MLX launches on a thread of their own, overlapping the "
             "engine's host work: `auto` on the MLX-managed path where MLX computes on a GPU, `1` always, `0` "
             "never"),
)

_NAMES = tuple(v.name for v in VARIABLES)

_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no")
_BOOL_ALLOWED = "one of 1/0, true/false, yes/no (any case)"
_FRACTION_ALLOWED = "a number in (0, 1]"
_AUTO_BOOL_ALLOWED = "`auto` or one of 1/0, true/false, yes/no (any case)"


class EnvError(ValueError):
    """A user-facing configuration error, one line, naming the variable, the value seen and what is allowed."""

    def __init__(self, message: str, *, variable: str, value: str | None = None,
                 allowed: str | None = None) -> None:
        super().__init__(message)
        self.variable = variable
        self.value = value
        self.allowed = allowed


def _show(value: str) -> str:
    # Quote only values that would otherwise be ambiguous or break the one-line message.
    if value == "" or any(c.isspace() or not c.isprintable() for c in value):
        return repr(value)
    return value


def _invalid(name: str, value: str, allowed: str) -> EnvError:
    return EnvError(f"{name}={_show(value)} is invalid: expected {allowed}",
                    variable=name, value=value, allowed=allowed)


@dataclass(frozen=True)
class MetalConfig:
    memory_fraction: Literal["auto"] | float = "auto"
    use_mlx: bool = True
    mlx_device: Literal["gpu", "cpu"] | None = None  # None: unset, resolved by `resolve_mlx_device`
    block_size: int = 16
    use_paged_attention: bool = False
    debug: bool = False
    use_modelscope: bool = False
    modelscope_cache: str | None = None
    prefix_cache: bool = False
    prefix_cache_fraction: float = 0.05
    kernels: bool | None = None  # None: `auto`
    ring_port: int | None = None  # None: each rank picks a free port
    compile: bool = True
    packed_projections: bool = True
    launch_thread: bool | None = None  # None: `auto`
    # Provenance is about how a config was reached, not what it is: two configs that behave the same
    # compare equal whatever their sources, which is what lets a child process be checked against its parent.
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    raw: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def kv_path(self) -> Literal["mlx", "paged", "torch"]:
        """Which KV path (and so which model runner) the engine uses, decided here once: the PyTorch
        baseline keeps the MLX-managed layout; with MLX, the paged pools when asked for, else MLX-managed."""
        if not self.use_mlx:
            return "torch"
        return "paged" if self.use_paged_attention else "mlx"

    @property
    def kv_fraction(self) -> float:
        """Device-memory fraction for the paged KV cache; only the paged path uses it."""
        return AUTO_KV_FRACTION if self.memory_fraction == "auto" else float(self.memory_fraction)


def _parse_bool(name: str, value: str) -> bool:
    low = value.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise _invalid(name, value, _BOOL_ALLOWED)


def _parse_auto_bool(name: str, value: str) -> bool | None:
    if value.lower() == "auto":
        return None
    try:
        return _parse_bool(name, value)
    except EnvError:
        raise _invalid(name, value, _AUTO_BOOL_ALLOWED) from None


def _parse_fraction(name: str, value: str, allowed: str = _FRACTION_ALLOWED) -> float:
    try:
        number = float(value)
    except ValueError:
        raise _invalid(name, value, allowed) from None
    # Written so that NaN fails too.
    if not 0.0 < number <= 1.0:
        raise _invalid(name, value, allowed)
    return number


def _parse_memory_fraction(name: str, value: str) -> Literal["auto"] | float:
    if value.lower() == "auto":
        return "auto"
    return _parse_fraction(name, value, f"`auto` or {_FRACTION_ALLOWED}")


def _parse_device(name: str, value: str) -> Literal["gpu", "cpu"]:
    low = value.lower()
    if low not in ("gpu", "cpu"):
        raise _invalid(name, value, "`gpu` or `cpu`")
    return low  # type: ignore[return-value]


def _parse_block_size(name: str, value: str) -> int:
    allowed = f"one of {', '.join(map(str, SUPPORTED_BLOCK_SIZES))} (the paged kernels' block sizes)"
    try:
        size = int(value)
    except ValueError:
        raise _invalid(name, value, allowed) from None
    if size not in SUPPORTED_BLOCK_SIZES:
        raise _invalid(name, value, allowed)
    return size


# The ring's ranks on one machine take this port and the ones after it: leave room for eight.
RING_PORT_RANGE = (1024, 65535 - 8)


def _parse_port(name: str, value: str) -> int:
    low, high = RING_PORT_RANGE
    allowed = f"a port number from {low} to {high}"
    try:
        port = int(value)
    except ValueError:
        raise _invalid(name, value, allowed) from None
    if not low <= port <= high:
        raise _invalid(name, value, allowed)
    return port


def _parse_abspath(name: str, value: str) -> str:
    if not os.path.isabs(value):
        raise _invalid(name, value, "an absolute path")
    return value


# (field, parser) per variable, in table order, which is also the order errors are reported in.
_PARSERS: dict[str, tuple[str, Callable[[str, str], object]]] = {
    MEMORY_FRACTION: ("memory_fraction", _parse_memory_fraction),
    USE_MLX: ("use_mlx", _parse_bool),
    MLX_DEVICE: ("mlx_device", _parse_device),
    BLOCK_SIZE: ("block_size", _parse_block_size),
    USE_PAGED_ATTENTION: ("use_paged_attention", _parse_bool),
    DEBUG: ("debug", _parse_bool),
    USE_MODELSCOPE: ("use_modelscope", _parse_bool),
    MODELSCOPE_CACHE: ("modelscope_cache", _parse_abspath),
    PREFIX_CACHE: ("prefix_cache", _parse_bool),
    PREFIX_CACHE_FRACTION: ("prefix_cache_fraction", lambda n, v: _parse_fraction(n, v)),
    KERNELS: ("kernels", _parse_auto_bool),
    RING_PORT: ("ring_port", _parse_port),
    COMPILE: ("compile", _parse_bool),
    PACKED_PROJECTIONS: ("packed_projections", _parse_bool),
    LAUNCH_THREAD: ("launch_thread", _parse_auto_bool),
}
assert tuple(_PARSERS) == _NAMES


def _seen(mapping: Mapping[str, object] | None, name: str) -> str | None:
    if mapping is None or name not in mapping or mapping[name] is None:
        return None
    # Flags may arrive already typed (a Typer bool or float); their str() parses the same way.
    value = str(mapping[name]).strip()
    return value or None  # empty counts as unset, as `VAR= cmd` is how shells unset for one command


def load_config(environ: Mapping[str, str] | None = None,
                overrides: Mapping[str, str] | None = None) -> MetalConfig:
    """Parse and validate the contract; `overrides` are flag values keyed by variable name and win.

    Raises `EnvError` on the first invalid variable in table order, then on an invalid combination.
    """
    env = os.environ if environ is None else environ
    unknown = sorted(set(overrides or ()) - set(_NAMES))
    if unknown:
        # A caller bug, not a user error: a flag mapped onto a name that is not in the contract.
        raise ValueError(f"unknown vmetal variable(s) in overrides: {', '.join(unknown)}")

    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    raw: dict[str, str] = {}
    for name, (attr, parse) in _PARSERS.items():
        value, source = _seen(overrides, name), "flag"
        if value is None:
            value, source = _seen(env, name), "environment"
        if value is None:
            sources[name] = "default"
            continue
        values[attr] = parse(name, value)
        sources[name] = source
        raw[name] = value

    cfg = MetalConfig(**values, sources=sources, raw=raw)  # type: ignore[arg-type]
    if cfg.memory_fraction != "auto" and not cfg.use_paged_attention:
        shown = _show(raw[MEMORY_FRACTION])
        raise EnvError(
            f"{MEMORY_FRACTION}={shown} requires {USE_PAGED_ATTENTION}=1 (the MLX-managed path sizes its own "
            f"cache); set {MEMORY_FRACTION}=auto",
            variable=MEMORY_FRACTION, value=raw[MEMORY_FRACTION],
            allowed=f"`auto` unless {USE_PAGED_ATTENTION}=1")
    return cfg


def _bool(value: bool) -> str:
    return "1" if value else "0"


def to_environ(cfg: MetalConfig) -> dict[str, str]:
    """Every variable of the contract as a string, so a child process loads an equal config.

    Unset values are exported as "" (which reads as unset) so a stale value inherited by the child
    cannot shadow them.
    """
    return {
        MEMORY_FRACTION: "auto" if cfg.memory_fraction == "auto" else repr(float(cfg.memory_fraction)),
        USE_MLX: _bool(cfg.use_mlx),
        MLX_DEVICE: cfg.mlx_device or "",
        BLOCK_SIZE: str(cfg.block_size),
        USE_PAGED_ATTENTION: _bool(cfg.use_paged_attention),
        DEBUG: _bool(cfg.debug),
        # vLLM reads this one itself and only understands true/1, so `yes` must not reach it as is.
        USE_MODELSCOPE: "True" if cfg.use_modelscope else "False",
        MODELSCOPE_CACHE: cfg.modelscope_cache or "",
        PREFIX_CACHE: _bool(cfg.prefix_cache),
        PREFIX_CACHE_FRACTION: repr(float(cfg.prefix_cache_fraction)),
        KERNELS: "auto" if cfg.kernels is None else _bool(cfg.kernels),
        RING_PORT: "" if cfg.ring_port is None else str(cfg.ring_port),
        COMPILE: _bool(cfg.compile),
        PACKED_PROJECTIONS: _bool(cfg.packed_projections),
        LAUNCH_THREAD: "auto" if cfg.launch_thread is None else _bool(cfg.launch_thread),
    }


def describe(cfg: MetalConfig) -> list[tuple[str, str, str]]:
    """(name, effective value, source) per variable in table order, for `vmetal doctor`."""
    env = to_environ(cfg)
    return [(name, env[name] or "unset", cfg.sources.get(name, "default")) for name in _NAMES]


def _default_gpu_available() -> bool:
    try:
        import mlx.core as mx
    except Exception:  # noqa: BLE001 - an mlx that cannot even import has no GPU for us
        return False
    probes = [getattr(getattr(mx, "metal", None), "is_available", None),
              getattr(getattr(mx, "cuda", None), "is_available", None)]
    if hasattr(mx, "is_available") and hasattr(mx, "gpu"):
        probes.append(lambda: mx.is_available(mx.gpu))
    for probe in probes:
        try:
            if probe is not None and probe():
                return True
        except Exception:  # noqa: BLE001 - a probe that fails means that backend is missing
            continue
    return False


def resolve_mlx_device(cfg: MetalConfig,
                       gpu_available: Callable[[], bool] | None = None) -> tuple[str, str | None]:
    """The MLX device to use, plus an info line when it differs from what an unset variable would suggest.

    An explicit `cpu` never probes, so it works even where importing mlx is slow or broken.
    """
    if cfg.mlx_device == "cpu":
        return "cpu", None
    probe = _default_gpu_available if gpu_available is None else gpu_available
    if probe():
        return "gpu", None
    if cfg.mlx_device == "gpu":
        raise EnvError(
            f"{MLX_DEVICE}=gpu is invalid on this host: MLX has no GPU here (neither Metal nor CUDA); "
            f"set {MLX_DEVICE}=cpu, or install mlx with Metal (Apple Silicon) or `mlx[cuda]`",
            variable=MLX_DEVICE, value="gpu", allowed="`cpu` on a host without an MLX GPU")
    return "cpu", (f"{MLX_DEVICE} is unset and MLX has no GPU on this host; using `cpu` "
                   f"(set {MLX_DEVICE}=cpu to silence this)")


def vmetal_home(environ: Mapping[str, str] | None = None) -> Path:
    """Where vmetal keeps its own files (demo model, registry of pulled models, logs, chat history):
    `$VMETAL_HOME`, else `$XDG_CACHE_HOME/vmetal`, else `~/.cache/vmetal`."""
    env = os.environ if environ is None else environ
    if env.get(HOME):
        return Path(env[HOME]).expanduser()
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "vmetal"


def _metal_available() -> bool:
    try:
        import mlx.core as mx

        return bool(mx.metal.is_available())
    except Exception:  # noqa: BLE001 - no mlx, or an mlx without the metal module: no Metal
        return False


def check_kernels(cfg: MetalConfig, metal_available: Callable[[], bool] | None = None) -> None:
    """`VLLM_METAL_KERNELS=1` where the kernels cannot run is an error (probed only then)."""
    if cfg.kernels is not True:
        return
    on_metal = cfg.mlx_device != "cpu" and (metal_available or _metal_available)()
    if not on_metal:
        where = f"{MLX_DEVICE}=cpu" if cfg.mlx_device == "cpu" else "MLX has no Metal device on this host"
        raise EnvError(f"{KERNELS}={_show(cfg.raw.get(KERNELS, '1'))} asks for the Metal kernels, but {where}; "
                       f"set {KERNELS}=auto (the kernels where they can run) or 0",
                       variable=KERNELS, value=cfg.raw.get(KERNELS, "1"), allowed="`auto` or `0` without Metal")


@functools.lru_cache(maxsize=1)
def get_config() -> MetalConfig:
    """The process-wide config from `os.environ`, loaded once; `get_config.cache_clear()` reloads it."""
    return load_config()


def check_available(cfg: MetalConfig) -> None:
    """Valid settings whose code path this release does not have stop the engine.

    Running the default path instead would look like success while ignoring
    what the user asked for.
    """
    if cfg.use_mlx:
        return
    # The PyTorch compute path (USE_MLX=0) keeps its KV the MLX-managed way, per request then one
    # batched decode cache: neither the paged pools nor the MLX prefix cache exist there.
    unbuilt = [
        (cfg.use_paged_attention, USE_PAGED_ATTENTION, "the PyTorch path runs with the MLX-managed KV layout only"),
        (cfg.prefix_cache, PREFIX_CACHE, "the prefix cache holds MLX KV, which the PyTorch path does not use"),
    ]
    for asked, name, why in unbuilt:
        if asked:
            value = cfg.raw.get(name, "1")
            raise EnvError(
                f"{name}={_show(value)} with {USE_MLX}={_show(cfg.raw.get(USE_MLX, '0'))}: {why}; unset {name}",
                variable=name, value=value, allowed=f"unset when {USE_MLX}=0",
            )
