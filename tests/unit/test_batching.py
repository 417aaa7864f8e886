"""The device rule for vLLM's batch defaults (`vmetal.preflight.batching`): the chips Mac users have, the
CUDA cards the benchmarks borrow, and the CPU, where vLLM's own defaults stand."""

from __future__ import annotations

import pytest

from vmetal.preflight import batching
from vmetal.preflight.batching import BatchDefaults, Device

GiB = 1024**3


@pytest.mark.parametrize(("device", "expected"), [
    # 8-core M1, 8 GB (5.3 GiB working set): the memory cap keeps LLM(...) at the smallest step too.
    (Device("metal", int(5.33 * GiB), 8), BatchDefaults(2048, 2048, 256)),
    # 10-core M4, 16 GB: 2,560 tokens by its cores, LLM(...) twice that, rounded down.
    (Device("metal", int(10.67 * GiB), 10), BatchDefaults(2048, 4096, 256)),
    # 18-core M3 Pro, 18 GB.
    (Device("metal", 12 * GiB, 18), BatchDefaults(4096, 4096, 256)),
    # 40-core M3 Max, 64 GB: by its cores; LLM(...) at the ceiling.
    (Device("metal", 48 * GiB, 40), BatchDefaults(8192, 16384, 256)),
    # 40 cores but a 12 GiB working set: memory decides.
    (Device("metal", 12 * GiB, 40), BatchDefaults(4096, 4096, 256)),
    # 76-core M2 Ultra, 192 GB: the ceiling.
    (Device("metal", 144 * GiB, 76), BatchDefaults(16384, 16384, 256)),
    # ioreg gave no core count: the smallest chip's share.
    (Device("metal", 48 * GiB, None), BatchDefaults(2048, 4096, 256)),
    # A GitHub macOS runner's paravirtual GPU (4.7 GiB working set).
    (Device("metal", int(4.7 * GiB), 8), BatchDefaults(2048, 2048, 256)),
    # CUDA: vLLM's own table for the card.
    (Device("cuda", 79 * GiB), BatchDefaults(8192, 16384, 256)),
    (Device("cuda", 23 * GiB), BatchDefaults(2048, 8192, 256)),
])
def test_rule(device, expected):
    assert batching.batch_defaults(device) == expected


def test_cpu_keeps_vllms_defaults():
    assert batching.batch_defaults(Device("cpu", 24 * GiB)) is None
    facts = batching.device_facts("cpu")  # this host, for real
    assert facts.kind == "cpu" and facts.memory > GiB and batching.batch_defaults(facts) is None


def test_gpu_cores_from_ioreg():
    sample = ('+-o AGXAcceleratorG15X  <class AGXAcceleratorG15X, id 0x1000003a1, registered, matched, active>\n'
              '    {\n      "IOClass" = "AGXAcceleratorG15X"\n      "gpu-core-count" = 40\n'
              '      "model" = "Apple M3 Max"\n    }\n')
    assert batching.gpu_cores(lambda: sample) == 40
    for nothing in (None, "", '"gpu-core-count" = 0', "no such class"):
        assert batching.gpu_cores(lambda text=nothing: text) is None
    assert batching.gpu_cores() is None  # not a Mac: no ioreg is run


def test_gpu_device_from_mlx_device_info():
    # What mx.device_info() says on Metal: the recommended working set is what MLX may use.
    metal = batching.gpu_device({"device_name": "Apple M3 Max", "memory_size": 64 * GiB,
                                 "max_recommended_working_set_size": 48 * GiB}, metal=True, cores=40)
    assert metal == Device("metal", 48 * GiB, 40, "Apple M3 Max")
    assert metal.describe() == "Apple M3 Max, 40 cores, 48.0 GiB"
    cuda = batching.gpu_device({"device_name": "NVIDIA H100 80GB HBM3", "total_memory": 79 * GiB},
                               metal=False, cores=None)
    assert cuda == Device("cuda", 79 * GiB, None, "NVIDIA H100 80GB HBM3")


def test_what_doctor_says():
    assert batching.describe(BatchDefaults(8192, 16384, 256)) == (
        "8,192 tokens (16,384 for LLM(...)) and 256 requests a step by default")
    assert batching.describe(None) == "vLLM's CPU defaults a step (2,048 tokens, 128 requests)"
