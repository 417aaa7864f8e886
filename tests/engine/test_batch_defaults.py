"""What vLLM runs with when `--max-num-batched-tokens` / `--max-num-seqs` are not given: the config vLLM's own
`EngineArgs.create_engine_config` builds on vmetal's platform, for the server and for `LLM(...)`.

On this host MLX computes on the CPU, where vLLM's CPU defaults stand; the Metal and CUDA rows put a device in
place of the one `vmetal.preflight.batching.device_facts` reads (the rule itself: tests/unit/test_batching.py).
"""

from __future__ import annotations

import pytest

from vmetal.engine import batch_defaults
from vmetal.preflight import batching

GiB = 1024**3
M3_MAX = batching.Device("metal", 48 * GiB, 40, "Apple M3 Max")


def scheduler(model, context: str, **args):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    config = EngineArgs(model=str(model), max_model_len=512, **args).create_engine_config(UsageContext[context])
    return config.scheduler_config.max_num_batched_tokens, config.scheduler_config.max_num_seqs


@pytest.fixture
def on(monkeypatch):
    def put(device: batching.Device) -> None:
        monkeypatch.setattr(batching, "device_facts", lambda name: device)
    return put


def test_cpu_keeps_vllms_cpu_defaults(qwen3_model):
    assert scheduler(qwen3_model, "OPENAI_API_SERVER") == (2048, 128)
    assert scheduler(qwen3_model, "LLM_CLASS") == (4096, 256)


def test_metal_defaults_and_what_vllm_derives_from_them(qwen3_model, on):
    on(M3_MAX)
    assert scheduler(qwen3_model, "OPENAI_API_SERVER") == (8192, 256)
    assert scheduler(qwen3_model, "LLM_CLASS") == (16384, 256)
    # A value the user gives wins, each on its own.
    assert scheduler(qwen3_model, "OPENAI_API_SERVER", max_num_batched_tokens=1000) == (1000, 256)
    assert scheduler(qwen3_model, "OPENAI_API_SERVER", max_num_seqs=20) == (8192, 20)
    # vLLM's own derivations still apply to the device's numbers: doubled for throughput...
    assert scheduler(qwen3_model, "OPENAI_API_SERVER", performance_mode="throughput") == (16384, 512)
    # ...and never more tokens than max_num_seqs full-length sequences.
    assert scheduler(qwen3_model, "OPENAI_API_SERVER", max_num_seqs=4) == (4 * 512, 4)


def test_cuda_defaults(qwen3_model, on):
    on(batching.Device("cuda", 79 * GiB, None, "NVIDIA H100 80GB HBM3"))
    assert scheduler(qwen3_model, "OPENAI_API_SERVER") == (8192, 256)
    on(batching.Device("cuda", 23 * GiB, None, "NVIDIA L4"))
    assert scheduler(qwen3_model, "LLM_CLASS") == (8192, 256)


def test_installed_once(qwen3_model, on):
    from vllm.engine.arg_utils import EngineArgs

    scheduler(qwen3_model, "LLM_CLASS")  # the platform has installed the rule
    installed = EngineArgs.__dict__["get_batch_defaults"]
    batch_defaults.install()
    assert EngineArgs.__dict__["get_batch_defaults"] is installed
    on(M3_MAX)
    assert scheduler(qwen3_model, "OPENAI_API_SERVER") == (8192, 256)
