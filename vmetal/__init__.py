"""vmetal: a vLLM platform plugin whose forward pass runs on MLX.

`register()` is the `vllm.platform_plugins` entry point. vLLM calls it in every
process it starts, so it stays cheap: no mlx, torch or vllm import unless the
platform is actually being activated.
"""

from __future__ import annotations

import os
import platform
import sys

__version__ = "0.1.0"

# `vmetal serve` sets this for the server it starts. On macOS arm64 the plugin is
# on unless it is "0"; elsewhere it is off unless it is "1", so installing vmetal
# never takes over a CUDA or CPU vLLM that the user runs on its own.
ACTIVATE_ENV = "VMETAL_ENABLE"

PLATFORM_QUALNAME = "vmetal.engine.platform.MetalPlatform"


def _is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def _metal_available() -> bool:
    try:
        import mlx.core as mx

        return bool(mx.metal.is_available())
    except Exception:  # noqa: BLE001 - any import/runtime failure means "no Metal"
        return False


def should_activate(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    value = env.get(ACTIVATE_ENV, "").strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    return _is_apple_silicon() and _metal_available()


def register() -> str | None:
    """Entry point for `vllm.platform_plugins`: the platform's qualname or None."""
    if not should_activate():
        return None
    # vLLM forks its engine process unless told otherwise. A fork after MLX has
    # started its thread pool (or Metal on a Mac) deadlocks or crashes the child,
    # and the front-end often has touched MLX already, so always spawn.
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    return PLATFORM_QUALNAME
