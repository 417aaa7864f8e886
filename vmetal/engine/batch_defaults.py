"""vLLM's batch defaults (`--max-num-batched-tokens`, `--max-num-seqs`) chosen for MLX's device.

vLLM has no hook through which a platform supplies these: `EngineArgs.get_batch_defaults` reads the
platform's memory and name, then replaces everything with its CPU table when `is_cpu()` is true, which
vmetal's platform must say for vLLM's own tensors. So `install` wraps that one classmethod: vLLM's table
first, then, where `vmetal.preflight.batching` has a rule for the device, its numbers for the server and
`LLM(...)` contexts. It runs from `MetalPlatform.pre_register_and_update`, which vLLM calls before it
resolves any engine argument, so only engines on vmetal's platform see it; a value the user gives never
reaches this function (vLLM asks for defaults only for what is unset).
"""

from __future__ import annotations

import logging
from typing import Any

from vmetal import envs
from vmetal.preflight import batching

logger = logging.getLogger("vllm.vmetal")

_MARK = "_vmetal_device_rule"


def device_defaults() -> tuple[batching.Device, batching.BatchDefaults] | None:
    """The device the engine will compute on and the rule's numbers for it; None: vLLM's own stand."""
    try:
        device, _ = envs.resolve_mlx_device(envs.load_config())
    except envs.EnvError:
        return None  # the platform's config check names the bad setting a moment later
    facts = batching.device_facts(device)
    chosen = batching.batch_defaults(facts)
    return (facts, chosen) if chosen is not None else None


def install() -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    vllm_rule = EngineArgs.__dict__["get_batch_defaults"].__func__
    if getattr(vllm_rule, _MARK, False):
        return

    def get_batch_defaults(cls: Any, world_size: int) -> tuple[dict, dict]:
        tokens, requests = vllm_rule(cls, world_size)
        found = device_defaults()
        if found is None:
            return tokens, requests
        facts, chosen = found
        logger.debug("vmetal: batch defaults for %s: %d tokens a step (server), %d (LLM), %d requests",
                     facts.describe(), chosen.server_tokens, chosen.offline_tokens, chosen.requests)
        tokens = {**tokens, UsageContext.OPENAI_API_SERVER: chosen.server_tokens,
                  UsageContext.LLM_CLASS: chosen.offline_tokens}
        requests = {**requests, UsageContext.OPENAI_API_SERVER: chosen.requests,
                    UsageContext.LLM_CLASS: chosen.requests}
        return tokens, requests

    setattr(get_batch_defaults, _MARK, True)
    EngineArgs.get_batch_defaults = classmethod(get_batch_defaults)
