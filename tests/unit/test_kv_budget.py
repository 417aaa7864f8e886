"""KV accounting of the runners without vLLM's engine: how many KV bytes each KV path tells vLLM it may plan
with, and the start-up error when not even one sequence fits.

Runners are built on light stand-ins for vLLM's config objects; `weights_bytes` and the loaded model's
`kv_bytes_per_token` are set by hand, so every expected number below is computed from the documented rule.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from tests.support.runner_stubs import paged_metal_config, stub_vllm_config
from vmetal import envs
from vmetal.engine.device import cache_limit_bytes
from vmetal.engine.runner.base import ModelRunnerBase
from vmetal.engine.runner.launches import Launches
from vmetal.engine.runner.mlx_runner import MlxModelRunner
from vmetal.engine.runner.paged_runner import PagedModelRunner

MiB = 2**20
GiB = 2**30
PER_TOKEN = 1024  # KV bytes per token (all layers, K and V)
BLOCK = 16
MAX_LEN = 1000  # 63 blocks of 16 per full-length sequence
SEQ_BLOCKS = 63
MAX_SEQS = 4


def make_runner(cls, *, weights: int, device: str = "gpu", fraction: str = "auto", max_model_len=MAX_LEN,
                max_num_seqs=MAX_SEQS, gpu_memory_utilization=0.5, state_bytes=0, window_bytes=0,
                max_num_batched_tokens=2048):
    config = stub_vllm_config(max_model_len=max_model_len, max_num_seqs=max_num_seqs, block_size=BLOCK,
                              gpu_memory_utilization=gpu_memory_utilization,
                              max_num_batched_tokens=max_num_batched_tokens)
    runner = cls(config, "cpu", paged_metal_config(device, fraction))
    runner.weights_bytes = weights
    # One per-token figure for both: the windows come in through `window_bytes` alone.
    runner.loaded = SimpleNamespace(kv_bytes_per_token=PER_TOKEN, growing_kv_bytes_per_token=PER_TOKEN,
                                    state_bytes=state_bytes, window_bytes=window_bytes)
    return runner


# ------------------------------------------------------------------ the MLX-managed path (and its torch twin)
MANAGED = [ModelRunnerBase, MlxModelRunner]
MANAGED_CAP = (MAX_SEQS * SEQ_BLOCKS + 1) * BLOCK * PER_TOKEN  # max_num_seqs whole-block sequences + null block


@pytest.mark.parametrize("cls", MANAGED)
def test_managed_budget_is_utilization_of_device_less_weights_and_activations(cls):
    """Below the cap, vLLM may plan with `gpu_memory_utilization` of the device less what the weights and
    the activation peak take."""
    runner = make_runner(cls, weights=1 * MiB, gpu_memory_utilization=0.5)
    assert runner.kv_fraction == 0.5
    budget = runner.kv_budget(10 * MiB, MiB // 2)
    assert budget == 5 * MiB - MiB - MiB // 2
    assert budget < MANAGED_CAP


@pytest.mark.parametrize("cls", MANAGED)
def test_managed_budget_sets_aside_a_hybrids_recurrent_state_for_every_request(cls):
    """A hybrid's recurrent layers keep a fixed-size state per request whatever its length: `max_num_seqs` of
    them come off the budget before K/V is planned."""
    runner = make_runner(cls, weights=1 * MiB, gpu_memory_utilization=0.5, state_bytes=MiB // 4)
    assert runner.kv_budget(10 * MiB, MiB // 2) == 5 * MiB - MiB - MiB // 2 - MAX_SEQS * (MiB // 4)


def test_managed_budget_sets_aside_every_requests_sliding_windows():
    """On the MLX-managed path a sliding-window layer holds at most its window per request: vLLM's blocks count
    only the growing layers, so `max_num_seqs` windows come off the budget beside the recurrent state."""
    runner = make_runner(MlxModelRunner, weights=1 * MiB, gpu_memory_utilization=0.5, state_bytes=MiB // 4,
                         window_bytes=MiB // 8)
    assert runner.kv_budget(10 * MiB, MiB // 2) == 5 * MiB - MiB - MiB // 2 - MAX_SEQS * (MiB // 4 + MiB // 8)


@pytest.mark.parametrize("cls", MANAGED)
def test_managed_budget_ignores_the_paged_memory_fraction(cls):
    """VLLM_METAL_MEMORY_FRACTION sizes the paged pools only; the MLX-managed path follows vLLM's
    `--gpu-memory-utilization`."""
    runner = make_runner(cls, weights=0, fraction="0.9", gpu_memory_utilization=0.25)
    assert runner.kv_fraction == 0.25
    assert runner.kv_budget(8 * MiB, 0) == 2 * MiB


@pytest.mark.parametrize("cls", MANAGED)
def test_managed_budget_is_capped_at_max_num_seqs_full_sequences(cls):
    """On a large device the scheduler is not promised more than `max_num_seqs` full-length sequences (in
    whole blocks) plus the null block: caches grow on demand, so a larger figure would only let vLLM
    over-admit."""
    runner = make_runner(cls, weights=1 * MiB, gpu_memory_utilization=0.9)
    assert runner.kv_budget(64 * GiB, 100 * MiB) == MANAGED_CAP
    # A partial last block counts whole: 1001 tokens need 63 blocks, 1008 too, 1009 one more.
    for max_len, blocks in [(1001, 63), (1008, 63), (1009, 64)]:
        runner = make_runner(cls, weights=0, max_model_len=max_len, gpu_memory_utilization=0.9)
        assert runner.kv_budget(64 * GiB, 0) == (MAX_SEQS * blocks + 1) * BLOCK * PER_TOKEN


@pytest.mark.parametrize("cls", MANAGED)
def test_managed_budget_is_never_negative(cls):
    """Weights larger than the usable device give 0 (vLLM then reports there is no room for KV), never a
    negative byte count."""
    runner = make_runner(cls, weights=8 * MiB, gpu_memory_utilization=0.5)
    assert runner.kv_budget(10 * MiB, MiB) == 0


# ------------------------------------------------------------------------------------------ the paged path
PAGED_CPU_CAP = (2 * MAX_SEQS * SEQ_BLOCKS + 1) * BLOCK * PER_TOKEN


def test_paged_budget_uses_the_memory_fraction_not_gpu_memory_utilization():
    """The paged pools are sized from VLLM_METAL_MEMORY_FRACTION (`0.5` here), less weights and
    activations; vLLM's `gpu_memory_utilization` (0.1 here) plays no part."""
    runner = make_runner(PagedModelRunner, weights=8 * MiB, fraction="0.5", gpu_memory_utilization=0.1)
    assert runner.kv_fraction == 0.5
    assert runner.kv_budget(64 * MiB, 2 * MiB) == 32 * MiB - 10 * MiB


def test_paged_auto_fraction_is_nine_tenths():
    """`auto` means 0.9 of the device."""
    runner = make_runner(PagedModelRunner, weights=8 * MiB, fraction="auto")
    assert runner.kv_fraction == 0.9
    assert runner.kv_budget(64 * MiB, 2 * MiB) == int(64 * MiB * 0.9) - 10 * MiB


def test_paged_budget_on_the_gpu_is_not_capped():
    """On a GPU the pools take the whole fraction, however few sequences are allowed (max_num_seqs=4 needs
    far less): the device's memory is there for this engine, and the surplus serves vLLM's prefix cache."""
    runner = make_runner(PagedModelRunner, weights=8 * MiB, device="gpu", fraction="0.5")
    budget = runner.kv_budget(64 * MiB, 2 * MiB)
    assert budget == 22 * MiB
    assert budget > PAGED_CPU_CAP


def test_paged_budget_on_the_cpu_is_capped_at_twice_the_full_sequences():
    """On the CPU, system RAM is shared with the host: the pools are at most twice what max_num_seqs
    full-length sequences need (plus the null block), even when the fraction allows more."""
    runner = make_runner(PagedModelRunner, weights=8 * MiB, device="cpu", fraction="0.5")
    assert runner.kv_budget(64 * MiB, 2 * MiB) == PAGED_CPU_CAP
    # Below the cap, the budget itself.
    assert runner.kv_budget(20 * MiB, 0) == 2 * MiB < PAGED_CPU_CAP


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_paged_budget_that_fits_exactly_one_sequence_is_accepted(device):
    """A budget of exactly one max-length sequence starts (the check is `>=`)."""
    runner = make_runner(PagedModelRunner, weights=0, device=device, fraction="0.5")
    assert runner.kv_budget(2 * MAX_LEN * PER_TOKEN, 0) == MAX_LEN * PER_TOKEN


def test_a_paged_sliding_layer_needs_its_window_and_one_step_not_the_whole_sequence():
    """vLLM's hybrid KV manager frees a sliding-window layer's blocks past its window, so one sequence of a model
    with one sliding layer (window 8) of two, 32 tokens a step, needs 1000 tokens of one layer and 8 - 1 + 32 of
    the other: a budget of exactly that starts, a byte less does not; with the manager off
    (`--disable-hybrid-kv-cache-manager`) both layers hold all 1000."""
    need = PER_TOKEN // 2 * (MAX_LEN + 8 - 1 + 32)
    runner = make_runner(PagedModelRunner, weights=0, fraction="0.5", max_num_batched_tokens=32)
    runner.layer_windows = (8, None)
    assert runner.kv_budget(2 * need, 0) == need
    with pytest.raises(envs.EnvError, match="1000-token sequence needs") as refused:
        runner.kv_budget(2 * need - 2, 0)
    # The hint counts the window too: 999 tokens of the full layer and 39 of the sliding one fit, 1000 do not.
    assert "--max-model-len to 999 or less" in str(refused.value)
    runner.scheduler_config.disable_hybrid_kv_cache_manager = True
    with pytest.raises(envs.EnvError):
        runner.kv_budget(2 * need, 0)
    assert runner.kv_budget(2 * MAX_LEN * PER_TOKEN, 0) == MAX_LEN * PER_TOKEN


def refusal(device="gpu", fraction="0.5", weights=7 * MiB + MiB // 2, max_model_len=MAX_LEN) -> envs.EnvError:
    runner = make_runner(PagedModelRunner, weights=weights, device=device, fraction=fraction,
                         max_model_len=max_model_len)
    with pytest.raises(envs.EnvError) as info:
        runner.kv_budget(16 * MiB, 0)
    return info.value


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_too_small_a_paged_budget_is_refused_with_the_fixes(device):
    """16 MiB at 0.5 less 7.5 MiB of weights leaves 0.5 MiB; one 1000-token sequence needs 1000 KiB. The
    error names the variable and its value, the sizes, and two fixes: the fraction that fits and the
    longest `--max-model-len` that fits."""
    err = refusal(device)
    message = str(err)
    assert err.variable == envs.MEMORY_FRACTION == "VLLM_METAL_MEMORY_FRACTION"
    assert err.value == "0.5"
    assert "VLLM_METAL_MEMORY_FRACTION=0.5" in message
    # Below 10 MiB with a decimal: whole MiB read "gets 1 MiB ... needs 1 MiB".
    assert "gets 0.5 MiB" in message and "1000-token sequence needs 1.0 MiB" in message
    # (7.5 MiB + 1000 KiB) / 16 MiB = 0.5298...
    assert "set VLLM_METAL_MEMORY_FRACTION to at least 0.53" in message
    assert err.allowed == ">= 0.53"
    assert "--max-model-len to 512 or less" in message


def suggested(err: envs.EnvError) -> tuple[str, int]:
    fraction = re.search(r"VLLM_METAL_MEMORY_FRACTION to at least ([0-9.]+)", str(err)).group(1)
    max_len = int(re.search(r"--max-model-len to (\d+) or less", str(err)).group(1))
    return fraction, max_len


def test_the_suggested_fixes_do_fit():
    """Following either hint starts the engine: the suggested --max-model-len (and not one token more),
    or the suggested fraction."""
    fraction, max_len = suggested(refusal())
    runner = make_runner(PagedModelRunner, weights=7 * MiB + MiB // 2, fraction="0.5", max_model_len=max_len)
    assert runner.kv_budget(16 * MiB, 0) >= max_len * PER_TOKEN
    refusal(max_model_len=max_len + 1)
    runner = make_runner(PagedModelRunner, weights=7 * MiB + MiB // 2, fraction=fraction)
    assert runner.kv_budget(16 * MiB, 0) >= MAX_LEN * PER_TOKEN


def test_the_suggested_fraction_fits_when_the_need_rounds_down():
    """Weights chosen so the fraction needed is 0.524: the hint must not say 0.52, which still fails."""
    weights = int(0.524 * 16 * MiB) - MAX_LEN * PER_TOKEN
    fraction, _ = suggested(refusal(weights=weights))
    runner = make_runner(PagedModelRunner, weights=weights, fraction=fraction)
    assert runner.kv_budget(16 * MiB, 0) >= MAX_LEN * PER_TOKEN


def test_weights_alone_beyond_the_device_suggest_a_smaller_model():
    """When no fraction could help (weights exceed the device), the hint is a smaller or quantized model,
    not a fraction above 1."""
    message = str(refusal(weights=20 * MiB, fraction="auto"))
    assert "use a smaller or quantized model" in message
    assert "VLLM_METAL_MEMORY_FRACTION=auto" in message
    assert "at least" not in message
    assert "--max-model-len" not in message  # "lower --max-model-len to 0 or less" helps no one


# ------------------------------------------------------------------------------------------ a draft model
DRAFT_PER_TOKEN = PER_TOKEN // 4  # a draft model's cache holds every token again, at a quarter of the bytes


@pytest.mark.parametrize("cls", [MlxModelRunner, PagedModelRunner])
def test_a_draft_models_cache_takes_its_share_of_the_budget(cls):
    """The draft's per-request caches grow outside the paged pools and beside the MLX path's caches, holding
    each token the model holds: the model gets 4/5 of what is left after the weights (the draft's included)."""
    runner = make_runner(cls, weights=8 * MiB, fraction="0.5", gpu_memory_utilization=0.5, max_num_seqs=64)
    alone = runner.kv_budget(64 * MiB, 2 * MiB)
    runner.drafter = SimpleNamespace(kv_bytes_per_token=DRAFT_PER_TOKEN)
    assert runner.kv_budget(64 * MiB, 2 * MiB) == alone * 4 // 5 == 22 * MiB * 4 // 5


def test_the_suggested_fraction_counts_the_drafts_cache():
    """Refused with a draft model beside it, the paged path's hint is a fraction at which one sequence fits in
    the pools with the draft's cache beside them (a hint that ignored the draft would be refused again)."""
    draft = SimpleNamespace(kv_bytes_per_token=DRAFT_PER_TOKEN)
    runner = make_runner(PagedModelRunner, weights=7 * MiB, fraction="0.5")
    runner.drafter = draft
    with pytest.raises(envs.EnvError) as refused:
        runner.kv_budget(16 * MiB, 0)
    fraction, max_len = suggested(refused.value)
    # (7 MiB + 1000 KiB * 5/4) / 16 MiB = 0.5137...
    assert fraction == "0.52"
    runner = make_runner(PagedModelRunner, weights=7 * MiB, fraction=fraction)
    runner.drafter = draft
    assert runner.kv_budget(16 * MiB, 0) >= MAX_LEN * PER_TOKEN
    runner = make_runner(PagedModelRunner, weights=7 * MiB, fraction="0.5", max_model_len=max_len)
    runner.drafter = draft
    assert runner.kv_budget(16 * MiB, 0) >= max_len * PER_TOKEN


# --------------------------------------------------------------------------------------- MLX's cache limit
@pytest.mark.parametrize(("device_bytes", "limit"), [
    (64 * GiB, 64 * GiB // 10),
    (16 * GiB, 16 * GiB // 10),
    (5 * GiB, 512 * MiB),  # a tenth is exactly 512 MiB
    (4 * GiB, 512 * MiB),  # a tenth would be less
    (0, 512 * MiB),
])
def test_cache_limit_is_a_tenth_of_the_device_but_at_least_512_mib(device_bytes, limit):
    """MLX keeps at most a tenth of the device of freed buffers for reuse, and never less than 512 MiB."""
    assert cache_limit_bytes(device_bytes) == limit


# --------------------------------------------------------------------------- what the worker leaves room for
@pytest.mark.parametrize("batched, managed, paged", [(2048, MAX_LEN, 2048), (512, 512, 512)])
def test_the_profiled_step_is_the_largest_step(batched, managed, paged):
    """vLLM profiles at `max_num_batched_tokens`. The MLX-managed path prefills each request on its own, so its
    largest forward is the longest prompt (`max_model_len` at most); a paged step packs every scheduled token
    into one forward."""
    assert make_runner(MlxModelRunner, weights=0, max_num_batched_tokens=batched).profile_tokens() == managed
    assert make_runner(PagedModelRunner, weights=0, max_num_batched_tokens=batched).profile_tokens() == paged


@pytest.mark.parametrize("step_mib, cache_mib", [(24, 512), (768, 768), (4096, 1024)])
def test_the_kv_budget_leaves_room_for_the_largest_steps_activations_and_mlx_s_cache(monkeypatch, step_mib,
                                                                                      cache_mib):
    """The worker profiles a forward of `profile_tokens` tokens, caps MLX's cache at that step's activation peak
    (at least 512 MiB, at most a tenth of the device: 1 GiB of this 10 GiB one) and hands the runner's budget
    rule the peak plus that cache: freed buffers MLX keeps for reuse are memory the KV cannot have."""
    import mlx.core as mx

    from vmetal.engine import worker as worker_module
    from vmetal.engine.worker import MetalWorker

    seen = {}
    limits = []

    class Runner:
        weights_bytes = 0
        kv_fraction = 0.9
        launches = Launches(threaded=False)

        def profile_tokens(self) -> int:
            return 96

        def warm_up(self, tokens=None):
            seen["tokens"] = tokens
            mx.eval(mx.zeros((step_mib, 2**18), dtype=mx.float32).sum())  # step_mib MiB at the peak

        def kv_budget(self, device_bytes, activation_bytes):
            seen["reserved"] = activation_bytes
            return 123 * MiB

    monkeypatch.setattr(worker_module, "device_memory_bytes", lambda device: 10 * GiB)
    monkeypatch.setattr(mx, "set_cache_limit", lambda limit: limits.append(limit) or 0)
    worker = object.__new__(MetalWorker)
    worker.cache_config = SimpleNamespace(kv_cache_memory_bytes=None)
    worker.vllm_config = SimpleNamespace(additional_config=None)
    worker.model_runner, worker.mlx_device, worker.cache_limit = Runner(), "cpu", cache_limit_bytes(10 * GiB)
    worker.ring = None  # one rank
    assert worker.determine_available_memory() == 123 * MiB
    assert seen["tokens"] == 96
    peak = seen["reserved"] - worker.cache_limit
    assert step_mib * MiB <= peak < step_mib * MiB + 8 * MiB
    assert limits == [worker.cache_limit] == [min(GiB, max(512 * MiB, peak))]
    assert abs(worker.cache_limit - cache_mib * MiB) < 8 * MiB
