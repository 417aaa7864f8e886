"""Which KV path serves a model, decided by the state mlx-lm's model makes for its config
(`vmetal.preflight.cache_types`), and `vmetal serve`'s refusal of a model its path cannot hold: exit 2 with one
line, within a second, before any server process starts.

The decision table is checked on hand-made states; the states themselves come from mlx-lm's real model classes,
built from tiny configs in the pre-flight's child process (no weights anywhere).
"""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from tests.support import fakes
from tests.support.checkpoints import model_folder
from tests.support.families import FAMILIES, as_chunked_attention, as_sliding_window
from vmetal import envs
from vmetal.cli.app import app
from vmetal.preflight import cache_types
from vmetal.preflight.cache_types import ModelState, model_state, refusal, servable_paths
from vmetal.preflight.checkpoint import UnsupportedModelError
from vmetal.server.process import free_port

FAMILY = "fam (FamForCausalLM)"
QWEN3 = {**FAMILIES["qwen3_moe"], "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 512}
DEEPSEEK = {**FAMILIES["deepseek_v2"], "vocab_size": 512}
GEMMA2 = {**FAMILIES["gemma2"], "vocab_size": 512}
# LFM2's layout: convolution (recurrent) layers with attention layers between them.
LFM2 = {"model_type": "lfm2", "architectures": ["Lfm2ForCausalLM"], "vocab_size": 512, "hidden_size": 64,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
        "norm_eps": 1e-5, "conv_bias": False, "conv_L_cache": 3, "block_dim": 64, "block_multiple_of": 16,
        "block_ffn_dim_multiplier": 1.0, "block_auto_adjust_ff_dim": False, "block_ff_dim": 128,
        "full_attn_idxs": [1, 3]}


def state(*caches: str, paged: str | None = None, batch: str | None = None) -> ModelState:
    return ModelState(FAMILY, "fam", caches, paged, batch)


# ------------------------------------------------------------------------------------ the decision


def test_full_attention_kv_caches_are_served_on_both_paths():
    assert servable_paths(state("KVCache", "KVCache")) == ["mlx", "paged"]
    assert refusal(state("KVCache", "KVCache"), "torch") is None


def test_sliding_window_layers_are_served_on_both_mlx_paths_and_refused_on_torch_naming_them():
    sliding = state(*["RotatingKVCache"] * 5, "KVCache")
    assert refusal(sliding, "mlx") is None and refusal(sliding, "paged") is None
    assert refusal(sliding, "torch") == (f"{FAMILY}: 5 of 6 layers are sliding-window attention layers "
                                         "(mlx-lm's RotatingKVCache): use the MLX-managed path (leave out --paged)")
    assert servable_paths(sliding) == ["mlx", "paged"]


def test_hybrid_and_nested_caches_are_named():
    # A hybrid's recurrent layers: the MLX-managed path holds them (mlx-lm batches ArraysCache), the paged does not.
    assert refusal(state("ArraysCache", "KVCache"), "mlx") is None
    assert "1 of 2 layers are recurrent (SSM / linear-attention) layers of a hybrid model (mlx-lm's ArraysCache)" \
        in refusal(state("ArraysCache", "KVCache"), "paged")
    # Several caches per layer (mlx-lm's CacheList): the MLX-managed path batches each member by its own `merge`.
    assert refusal(state("CacheList(ArraysCache, KVCache)", "KVCache"), "mlx") is None
    line = refusal(state("CacheList(ArraysCache, KVCache)", "KVCache"), "paged")
    assert line.endswith("1 of 2 layers are layers with several caches each (mlx-lm's CacheList(ArraysCache, "
                         "KVCache)): use the MLX-managed path (leave out --paged)"), line
    assert "(mlx-lm's CacheList(ChunkedKVCache, KVCache)): no vmetal KV path serves it yet" in refusal(
        state("CacheList(ChunkedKVCache, KVCache)"), "mlx")
    assert "its layers are layers with a cache of their own kind (mlx-lm's OddCache)" in refusal(state("OddCache"),
                                                                                                  "paged")


def test_an_obstacle_of_one_path_points_at_the_other():
    own = state("KVCache", paged="its attention is computed in the model's own code")
    assert refusal(own, "mlx") is None
    assert refusal(own, "paged") == (f"{FAMILY}: its attention is computed in the model's own code: "
                                     "use the MLX-managed path (leave out --paged)")
    unbatchable = state("KVCache", batch="cannot batch")
    assert refusal(unbatchable, "mlx") == f"{FAMILY}: cannot batch: use --paged"
    assert servable_paths(state("KVCache", paged="a", batch="b")) == []


# ------------------------------------------------------------------------------------ states of real classes


def test_dense_and_moe_configs_make_kv_caches():
    qwen3 = model_state(QWEN3)
    assert (qwen3.module, qwen3.caches, qwen3.paged, qwen3.batch) == ("qwen3", ("KVCache",) * 2, None, None)
    mixtral = model_state({**FAMILIES["mixtral"], "vocab_size": 512})
    assert servable_paths(mixtral) == ["mlx", "paged"]


def test_mlx_lm_remappings_pick_the_module():
    # mlx-lm serves `mistral` through its llama module (MODEL_REMAPPING, read from its own utils.py).
    assert model_state({**QWEN3, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}).module == "llama"


def test_sliding_window_config_makes_rotating_caches():
    config = as_sliding_window({**QWEN3, "num_hidden_layers": 6})
    got = model_state(config)
    assert got.caches == ("RotatingKVCache", "KVCache") * 3
    assert got.family == "gemma3_text (Gemma3ForCausalLM)"
    assert got.held == (16, None) * 3  # the window's tokens, all of them (what `fit` sizes the KV by)


def test_the_config_decides_not_the_family_name():
    # mlx-lm's llama makes a RotatingKVCache for each layer its config marks sliding, a KVCache otherwise.
    config = {**QWEN3, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "layer_types": ["full_attention", "full_attention"]}
    assert model_state(config).caches == ("KVCache", "KVCache")
    sliding = {**config, "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16}
    assert model_state(sliding).caches == ("RotatingKVCache", "KVCache")


def test_hybrid_config_makes_arrays_caches():
    got = model_state(LFM2)
    assert got.caches == ("ArraysCache", "KVCache", "ArraysCache", "KVCache")
    assert got.held == (0, None, 0, None)  # a recurrent state holds no tokens
    assert refusal(got, "mlx") is None and got.batch is None  # mlx-lm batches it: the MLX-managed path holds it
    assert refusal(got, "paged").startswith("lfm2 (Lfm2ForCausalLM): 2 of 4 layers are recurrent")


def test_mla_and_gemma2_attention_code_are_served_on_the_paged_path():
    deepseek = model_state(DEEPSEEK)  # keys 24 wide, values 16: paged pools of their own widths
    assert servable_paths(deepseek) == ["mlx", "paged"] and deepseek.paged is None
    # Gemma 2 with grouped-query attention (every published one): its own attention code, which the paged path
    # attends for it (`own_attention`), and mlx-lm cannot batch it.
    gemma2 = model_state({**GEMMA2, "num_key_value_heads": 2})
    assert gemma2.paged is None
    assert "cannot decode requests of different lengths in one batch" in gemma2.batch
    assert servable_paths(gemma2) == ["paged"]


def test_attention_in_a_models_own_code_keeps_it_off_the_paged_path_unless_the_path_attends_that_class(
        monkeypatch):
    """The probe sees Gemma 2's attention bypass `scaled_dot_product_attention`; only its listing in
    `PAGED_OWN_ATTENTION` (a paged `__call__` in the engine's `own_attention`, one for every name) lets it on."""
    from mlx_lm.models import gemma2

    from vmetal.engine.runner.kv import own_attention

    assert set(own_attention.IMPLEMENTATIONS) == cache_types.PAGED_OWN_ATTENTION
    model = gemma2.Model(gemma2.ModelArgs.from_dict(GEMMA2))
    assert cache_types.paged_obstacle(model) is None
    monkeypatch.setattr(cache_types, "PAGED_OWN_ATTENTION", frozenset())
    assert cache_types.paged_obstacle(model) == (
        "its attention is computed in the model's own code, not through mlx-lm's scaled_dot_product_attention, "
        "which is where the paged path routes attention to its blocks")


def test_unknown_model_type_and_unbuildable_config_are_refused():
    with pytest.raises(UnsupportedModelError, match="mlx-lm has no model for model_type `no_such_model`"):
        model_state({"model_type": "no_such_model", "architectures": ["NoSuchForCausalLM"]})
    with pytest.raises(UnsupportedModelError, match="mlx-lm's `qwen3` model cannot be built from this config.json: "
                                                    "TypeError"):
        model_state({"model_type": "qwen3"})
    with pytest.raises(UnsupportedModelError, match="has no `model_type`"):
        model_state({"architectures": ["X"]})


def test_the_probe_keeps_mlx_out_of_the_calling_process():
    import subprocess
    import sys

    code = ("import json, sys\n"
            "from vmetal.preflight.cache_types import model_state\n"
            f"print(model_state(json.loads({json.dumps(json.dumps(QWEN3))})).caches)\n"
            "assert not {'mlx', 'mlx_lm', 'torch', 'vllm', 'transformers'} & set(sys.modules), sorted(sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "('KVCache', 'KVCache')"


# ------------------------------------------------------------------------------------ vmetal serve's refusal


@pytest.fixture
def fake_server(monkeypatch):
    for var in envs.VARIABLES:
        monkeypatch.delenv(var.name, raising=False)
    return fakes.install(monkeypatch)


def serve(*args: str):
    started = time.monotonic()
    result = CliRunner().invoke(app, ["serve", *args, "--port", str(free_port())])
    return result, time.monotonic() - started


@pytest.mark.parametrize("config,paged,line", [
    ({**GEMMA2, "num_key_value_heads": 2}, False,
     ("error: gemma2 (Gemma2ForCausalLM): mlx-lm's model cannot decode requests of different lengths in one batch "
      "(ValueError: [broadcast_shapes] Shapes (3,1,1,5) and (3,2,2,1,5) cannot be broadcast.): use --paged")),
    (LFM2, True,
     ("error: lfm2 (Lfm2ForCausalLM): 2 of 4 layers are recurrent (SSM / linear-attention) layers of a "
      "hybrid model (mlx-lm's ArraysCache): use the MLX-managed path (leave out --paged)")),
    (as_chunked_attention(QWEN3), False,
     ("error: llama4 (Llama4ForConditionalGeneration): its layers are chunked-attention layers (mlx-lm's "
      "ChunkedKVCache): no vmetal KV path serves it yet")),
], ids=["unbatchable-on-mlx", "hybrid-on-paged", "chunked-attention"])
def test_serve_refuses_what_its_kv_path_cannot_hold_within_a_second(fake_server, tmp_path, config, paged, line):
    folder = model_folder(tmp_path / "model", config, 1 << 20)
    cache_types._probe_in_child.cache_clear()  # the child's time is part of the promise
    result, seconds = serve(str(folder), *(["--paged"] if paged else []))
    assert result.exit_code == 2, result.output
    assert [x for x in result.stderr.splitlines() if x.startswith("error:")] == [line]
    assert fake_server == []  # no server process was built, let alone started
    # The promise: the refusal comes at once, not when vLLM's engine fails ~10 s later. What it takes is
    # the CLI's own checks plus one child interpreter importing mlx (~0.1-0.3 s on 2 cores).
    assert seconds < 1.0, seconds


def test_prefix_cache_is_refused_for_state_other_than_full_attention(fake_server, tmp_path):
    from vmetal.preflight.cache_types import check_prefix_cache

    check_prefix_cache(state("KVCache", "KVCache"))  # served
    with pytest.raises(UnsupportedModelError, match=r"keeps full-attention K/V only, and this model also keeps "
                                                    r"RotatingKVCache state"):
        check_prefix_cache(state("RotatingKVCache", "KVCache"))
    folder = model_folder(tmp_path / "model", as_sliding_window(QWEN3), 1 << 20)
    result, _ = serve(str(folder), "--prefix-cache")
    assert result.exit_code == 2, result.output
    assert [x for x in result.stderr.splitlines() if x.startswith("error:")] == [
        "error: gemma3_text (Gemma3ForCausalLM): VLLM_METAL_PREFIX_CACHE=1 (--prefix-cache) keeps full-attention "
        "K/V only, and this model also keeps RotatingKVCache state; serve it without the prefix cache"]
    assert fake_server == []
    result, _ = serve(str(folder), "--no-tool-parser")  # the same model without it: served (MLX path)
    assert result.exit_code == 0, result.output


def test_serve_starts_what_its_kv_path_holds(fake_server, tmp_path):
    folder = model_folder(tmp_path / "model", DEEPSEEK, 1 << 20)
    result, _ = serve(str(folder), "--no-tool-parser")
    assert result.exit_code == 0, result.output
    assert len(fake_server) == 1 and fake_server[0].events[0] == "start"


def test_serve_refusal_in_a_fresh_interpreter_imports_no_mlx(tmp_path):
    """The same refusal through the console script: exit 2, one line, and mlx, torch and vLLM stay out of the
    CLI's process (`run_main_fresh` fails otherwise)."""
    folder = model_folder(tmp_path / "model", as_chunked_attention(QWEN3), 1 << 20)
    proc = fakes.run_main_fresh(["serve", str(folder), "--port", str(free_port())])
    assert proc.returncode == 2, proc.stderr
    assert "error: llama4 (Llama4ForConditionalGeneration): its layers are chunked-attention layers" in proc.stderr
