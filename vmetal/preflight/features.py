"""vLLM features vmetal's engine does not implement: refused before anything starts, never accepted and then
fatal (speculative decoding was: the server started, then the EngineCore died on the first request and every
request got HTTP 500).

One table, read twice: `vmetal serve`'s pre-flight looks for the flags among the arguments for vLLM (exit 2
within a second, nothing started), and the platform (`MetalPlatform.check_and_update_config`) looks at vLLM's
resolved config, which also covers `vllm serve` and `LLM(...)` used directly.

Stdlib only: the CLI imports this module for its pre-flight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vmetal.preflight.fit import vllm_arg, vllm_switch


@dataclass(frozen=True)
class Unsupported:
    flag: str  # vLLM's command-line flag
    feature: str
    # Whether vLLM's arguments ask for it (given them all).
    asked: Callable[[Sequence[str]], bool]
    # Whether vLLM's resolved config asks for it.
    configured: Callable[[Any], bool]

    def message(self) -> str:
        return f"`{self.flag}`: {self.feature} is not implemented by vmetal's engine; start without it"


def _given(flag: str) -> Callable[[Sequence[str]], bool]:
    return lambda args: vllm_arg(list(args), flag) is not None


def _not_auto(value: Any) -> bool:
    return value is not None and str(value).strip().lower() not in ("", "auto")


UNSUPPORTED: tuple[Unsupported, ...] = (
    Unsupported("--speculative-config", "speculative decoding (draft models, n-gram lookup, MTP)",
                _given("--speculative-config"), lambda c: c.speculative_config is not None),
    Unsupported("--enable-lora", "serving LoRA adapters", lambda args: vllm_switch(list(args), "--enable-lora"),
                lambda c: c.lora_config is not None),
    Unsupported("--kv-transfer-config", "transferring KV cache between engines", _given("--kv-transfer-config"),
                lambda c: c.kv_transfer_config is not None),
    # The KV cache is kept in the model's dtype; vLLM would size its blocks for another one.
    Unsupported("--kv-cache-dtype", "a KV cache dtype other than the model's",
                lambda args: _not_auto(vllm_arg(list(args), "--kv-cache-dtype")),
                lambda c: _not_auto(c.cache_config.cache_dtype)),
    Unsupported("--runner pooling", "a pooling (embedding, scoring) model runner",
                lambda args: (vllm_arg(list(args), "--runner") or "").strip().lower() == "pooling",
                lambda c: getattr(c.model_config, "runner_type", "generate") == "pooling"),
)


def refused_args(args: Sequence[str]) -> str | None:
    """The refusal for the first unsupported feature vLLM's arguments ask for, or None."""
    return next((item.message() for item in UNSUPPORTED if item.asked(args)), None)


def refused_config(vllm_config: Any) -> str | None:
    """The refusal for the first unsupported feature vLLM's resolved config asks for, or None."""
    return next((item.message() for item in UNSUPPORTED if item.configured(vllm_config)), None)
