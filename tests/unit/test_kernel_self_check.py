"""The Metal kernel's self-check at engine start (issue 18): the paged-attention kernel has never run on real
Apple hardware, so where it would serve, the paged runner first compares it with the pure-MLX reference on a
step shaped like the model's attention, and under `VLLM_METAL_KERNELS=auto` serves through the reference
when they disagree (one warning), under `=1` keeps the kernel (one warning).

Off a Mac the kernel cannot run: a test double stands in for it (the reference itself, or the reference off
by 10 %, or 1 % in float32), and `use_kernels` is made to say the kernels are on. What is checked is the decision and what the
runner then serves, which runs here for real: its logits equal mlx-lm's.
"""

from __future__ import annotations

import dataclasses
import logging

import mlx.core as mx
import numpy as np
import pytest

from tests.support.runner_stubs import paged_metal_config, stub_vllm_config
from vmetal.engine.runner.attention import metal, reference
from vmetal.engine.runner.kv.paged_cache import StepLayout, install_attention_hook
from vmetal.engine.runner.paged_runner import PagedModelRunner

BLOCK = 8


def right(*args, use_kernel):
    assert use_kernel
    return reference.paged_attention(*args)


def off_by(factor: float):
    def kernel(*args, use_kernel):
        assert use_kernel
        return reference.paged_attention(*args) * factor

    return kernel


wrong = off_by(1.1)  # a kernel 10 % off: wrong in every dtype, bfloat16's rounding included


@pytest.fixture(scope="module")
def loaded(qwen3_model):
    from vmetal.engine.models import load

    return load(str(qwen3_model))


def runner_with(loaded, kernels: str) -> PagedModelRunner:
    cfg = dataclasses.replace(paged_metal_config("gpu"), kernels={"auto": None, "1": True}[kernels])
    runner = PagedModelRunner(stub_vllm_config(block_size=BLOCK, max_model_len=64), "cpu", cfg)
    runner.loaded, runner.model = loaded, loaded.model
    install_attention_hook(runner.model)
    return runner


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_self_check_passes_a_kernel_equal_to_the_reference_and_fails_a_wrong_one(monkeypatch, dtype):
    monkeypatch.setattr(metal, "paged_attention", right)
    check = metal.self_check(8, 2, 64, 16, dtype)
    assert check.ok and check.error == 0.0
    assert "8 query / 2 KV heads x 64, block size 16" in check.describe()
    monkeypatch.setattr(metal, "paged_attention", wrong)
    check = metal.self_check(8, 2, 64, 16, dtype)
    assert not check.ok and check.error > check.tolerance
    assert "DISAGREES" in check.describe()


def test_in_float32_one_percent_off_is_caught(monkeypatch):
    monkeypatch.setattr(metal, "paged_attention", off_by(1.01))
    assert not metal.self_check(8, 2, 64, 16, mx.float32).ok


def test_self_check_fails_a_kernel_that_returns_nan(monkeypatch):
    monkeypatch.setattr(metal, "paged_attention", lambda *a, use_kernel: reference.paged_attention(*a) * np.nan)
    assert not metal.self_check(4, 4, 32, 8, mx.float32).ok


def test_a_disagreeing_kernel_falls_back_to_the_reference_with_one_warning(monkeypatch, loaded, caplog):
    monkeypatch.setattr(metal, "use_kernels", lambda setting: True)  # "on Metal"
    monkeypatch.setattr(metal, "paged_attention", wrong)
    runner = runner_with(loaded, "auto")
    with caplog.at_level(logging.INFO, logger="vllm.vmetal"):
        on = runner._kernels_on()
    assert on is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "DISAGREES" in warnings[0] and "reference instead" in warnings[0]
    assert metal.kernel_choice(on) == {"paged_attention": False, "reshape_and_cache": False, "copy_blocks": False}
    # The check ran on the model's own attention shape.
    assert f"x {loaded.head_dim}, block size {BLOCK}" in runner.kernel_check.shape


def test_an_agreeing_kernel_serves_and_a_forced_one_is_kept_with_a_warning(monkeypatch, loaded, caplog):
    monkeypatch.setattr(metal, "use_kernels", lambda setting: True)
    monkeypatch.setattr(metal, "paged_attention", right)
    assert runner_with(loaded, "auto")._kernels_on() is True
    monkeypatch.setattr(metal, "paged_attention", wrong)
    with caplog.at_level(logging.WARNING, logger="vllm.vmetal"):
        assert runner_with(loaded, "1")._kernels_on() is True
    assert any("serving with the kernel anyway" in r.getMessage() for r in caplog.records)


def test_after_the_fallback_the_runner_serves_mlx_lm_s_logits(monkeypatch, loaded):
    """Serving through the reference, at parity: a prompt through the paged runner's forward, with the wrong
    kernel still standing by, gives mlx-lm's own logits."""
    from mlx_lm.models.cache import make_prompt_cache

    monkeypatch.setattr(metal, "use_kernels", lambda setting: True)
    monkeypatch.setattr(metal, "paged_attention", wrong)
    runner = runner_with(loaded, "auto")
    runner.kernels = metal.kernel_choice(runner._kernels_on())
    layers = runner._new_layers(4)
    tokens = [5, 17, 3, 40, 9, 12, 7, 21, 30, 2]  # past one block
    n, table = len(tokens), [2, 0]
    slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)]
    layout = StepLayout.plan(list(range(n)), slots, np.array([table], dtype=np.int32), [n], [n], BLOCK)
    got = runner._forward(layers, tokens, layout, [n - 1])
    want = loaded.model(mx.array([tokens]), cache=make_prompt_cache(loaded.model))[0, -1]
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family,want", [
    # gpt-oss: its sliding (8) and full layers, both with sinks; Gemma 2: its softcap of 50; DeepSeek-V2: values
    # 16 wide beside keys 24 wide.
    ("gpt_oss", [(None, True, None, 16), (8, True, None, 16)]),
    ("gemma2_gqa", [(None, False, 50.0, 16)]),
    ("deepseek_v2", [(None, False, None, 16)]),
])
def test_the_check_runs_each_kernel_variant_the_model_attends_with(monkeypatch, tmp_path, family, want):
    """The kernel has a variant per window, sinks, softcap and value width; the runner checks the ones this
    model's layers use, each with the model's own values, so a variant that is wrong on a Mac is caught at
    start and not served."""
    from tests.support.families import build_family
    from tests.support.runner_stubs import loaded_paged_runner

    seen = []

    def recording(queries, k_pool, v_pool, tables, ctx, qlens, scale, window, sinks, softcap, *, use_kernel):
        seen.append((window, sinks is not None, softcap, v_pool.shape[-1]))
        return reference.paged_attention(queries, k_pool, v_pool, tables, ctx, qlens, scale, window, sinks,
                                         softcap)

    monkeypatch.setattr(metal, "paged_attention", recording)
    runner = loaded_paged_runner(build_family(tmp_path / family, family), BLOCK)
    runner.layer_windows = runner.loaded.kv_held() or (None,) * runner.loaded.num_layers  # as load_model sets
    check = runner._self_check()
    assert check.ok and seen == want
    if family == "gpt_oss":  # only the sliding layers' kernel wrong: the check names that variant
        def wrong_when_windowed(*args, use_kernel):
            return recording(*args, use_kernel=use_kernel) * (1.1 if args[7] is not None else 1.0)

        monkeypatch.setattr(metal, "paged_attention", wrong_when_windowed)
        check = runner._self_check()
        assert not check.ok and "window 8, sinks" in check.describe()
