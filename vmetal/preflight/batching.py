"""How many tokens and requests one engine step takes by default, chosen for the device MLX computes on.

vLLM picks `--max-num-batched-tokens` and `--max-num-seqs` from its platform when they are not given.
vmetal's platform is a CPU one to torch (vLLM's own tensors live there), so vLLM would apply its CPU rule —
2,048 tokens and 128 requests a step for the server, 4,096 and 256 for `LLM(...)` — to a GPU's compute.
`vmetal.engine.batch_defaults` puts this module's rule in its place. A flag the user gives still wins, and
what vLLM derives from the defaults still follows (doubled under `--performance-mode throughput`, at least
max-model-len with chunked prefill off).

The rule (`batch_defaults`):
- MLX on the CPU: vLLM's CPU defaults stand.
- Metal: 256 tokens a step per GPU core for the server, twice that for `LLM(...)`, each capped at 512 tokens
  per GiB of MLX's working set, rounded down to a power of two and kept within 2,048-16,384; 256 requests.
  Prefill on an Apple GPU is compute-bound from a few hundred tokens a step, so a larger step buys little
  throughput and makes the streams decoding beside it wait longer for their next token. Tokens per core keep
  a full prefill step about as long on every chip: an 8-core M1 gets 2,048 (what vLLM gives a CPU server), a
  40-core M3 Max 8,192. The memory cap is there because a step's activations grow with its tokens (the
  worker's profile run measures that peak and takes it from the KV budget): an 8 GiB Mac stays at 2,048.
- CUDA (the GPUs the benchmarks borrow): what vLLM picks for that card — 8,192 / 16,384 tokens with 70 GiB or
  more (8,192 served 1,461 tok/s against 1,089 at 2,048 on the MLX-managed path at 32 streams on an H100,
  benchmarks/RESULTS.md), else 2,048 / 8,192; 256 requests.
- 256 requests: a decode step's cost hardly grows with its rows (it is bound by per-step host work and
  weight reads), and the KV budget already keeps the scheduler from admitting more than memory holds.

Everything here is stdlib; mlx is imported inside `device_facts` only.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

GiB = 1024**3

TOKENS_PER_CORE = 256
TOKENS_PER_GIB = 512
MIN_TOKENS, MAX_TOKENS = 2048, 16384
REQUESTS = 256
# vLLM's own line between its two GPU tables (vllm.engine.arg_utils.EngineArgs.get_batch_defaults).
LARGE_CUDA_BYTES = 70 * GiB

_CORES = re.compile(r'"gpu-core-count"\s*=\s*(\d+)')


@dataclass(frozen=True)
class Device:
    """What the rule reads about the device MLX computes on."""

    kind: str  # "metal", "cuda" or "cpu"
    memory: int  # bytes MLX may use there (Metal: its recommended working set)
    cores: int | None = None  # Apple GPU cores, where known
    name: str = ""

    def describe(self) -> str:
        cores = f", {self.cores} cores" if self.cores else ""
        return f"{self.name or self.kind}{cores}, {self.memory / GiB:.1f} GiB"


@dataclass(frozen=True)
class BatchDefaults:
    """Tokens and requests a step, for the OpenAI server and for `LLM(...)`."""

    server_tokens: int
    offline_tokens: int
    requests: int


def _power_of_two_within(tokens: int) -> int:
    tokens = max(MIN_TOKENS, min(MAX_TOKENS, tokens))
    return 1 << (tokens.bit_length() - 1)


def batch_defaults(device: Device) -> BatchDefaults | None:
    """The rule in the module docstring; None where vLLM's own defaults stand (MLX on the CPU)."""
    if device.kind == "cuda":
        large = device.memory >= LARGE_CUDA_BYTES
        return BatchDefaults(8192 if large else 2048, 16384 if large else 8192, REQUESTS)
    if device.kind != "metal":
        return None
    by_memory = TOKENS_PER_GIB * device.memory // GiB
    # Without a core count (ioreg missing or unreadable) the smallest chip's share.
    by_compute = TOKENS_PER_CORE * (device.cores or MIN_TOKENS // TOKENS_PER_CORE)
    return BatchDefaults(_power_of_two_within(min(by_compute, by_memory)),
                         _power_of_two_within(min(2 * by_compute, by_memory)), REQUESTS)


def describe(chosen: BatchDefaults | None) -> str:
    """The defaults a server gets, in the words `vmetal doctor` prints."""
    if chosen is None:
        return "vLLM's CPU defaults a step (2,048 tokens, 128 requests)"
    return (f"{chosen.server_tokens:,} tokens ({chosen.offline_tokens:,} for LLM(...)) and {chosen.requests} "
            "requests a step by default")


def gpu_cores(ioreg: Callable[[], str | None] | None = None) -> int | None:
    """Apple GPU cores, from the IORegistry's AGXAccelerator entry (`"gpu-core-count" = 40`); None elsewhere.

    Metal itself does not report them (`mx.device_info()` has no such key); ioreg answers in ~50 ms and is
    on every Mac.
    """
    text = (ioreg or _ioreg)()
    found = _CORES.search(text or "")
    return int(found.group(1)) if found and int(found.group(1)) > 0 else None


def _ioreg() -> str | None:
    if sys.platform != "darwin":
        return None
    try:
        return subprocess.run(["ioreg", "-r", "-d", "1", "-c", "AGXAccelerator"], capture_output=True,
                              text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def device_facts(device: str) -> Device:
    """The device MLX computes on when vmetal's engine uses `device` ("gpu" or "cpu")."""
    if device != "gpu":
        import psutil

        return Device("cpu", int(psutil.virtual_memory().total))
    import mlx.core as mx

    metal = bool(mx.metal.is_available())
    return gpu_device(mx.device_info(mx.gpu), metal=metal, cores=gpu_cores() if metal else None)


def gpu_device(info: Mapping[str, Any], *, metal: bool, cores: int | None) -> Device:
    """`Device` from `mx.device_info()` of a Metal or CUDA GPU (Metal: the recommended working set first)."""
    memory = next((int(info[key]) for key in ("max_recommended_working_set_size", "memory_size", "total_memory")
                   if info.get(key)), 0)
    return Device("metal" if metal else "cuda", memory, cores, str(info.get("device_name") or ""))
