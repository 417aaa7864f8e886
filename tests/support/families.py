"""Tiny random-weight checkpoints of the model families vmetal serves beyond the demo's four, built from
mlx-lm's own model classes (`vmetal.demo.build_checkpoint`: its parameter names and `sanitize`) with the demo
tokenizer.

Each config is the family's config.json as its Hugging Face checkpoints spell it (vLLM's front-end reads it
through transformers; mlx-lm's `ModelArgs` pick their fields from it), shrunk to hidden 64, 2 layers, 4 query
heads, so that a family's own structure is kept: MoE routing, MLA's low-rank K/V, fused projections, NoPE
layers, output scalings. Values that change what the output code computes (Granite's `logits_scaling`, Gemma 2's
final softcapping) are set so that skipping them changes the logprobs by whole units.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_COMMON: dict[str, Any] = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 128, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02,
    "use_cache": True, "vocab_size": None,
}

FAMILIES: dict[str, dict[str, Any]] = {
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"], "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "moe_intermediate_size": 64, "norm_topk_prob": True,
        "attention_bias": False,
    },
    "mixtral": {
        "architectures": ["MixtralForCausalLM"], "num_local_experts": 4, "num_experts_per_tok": 2,
        "sliding_window": None,
    },
    "phi3": {
        # Fused qkv_proj and gate_up_proj.
        "architectures": ["Phi3ForCausalLM"], "original_max_position_embeddings": 2048, "sliding_window": None,
        "partial_rotary_factor": 1.0,
    },
    "smollm3": {
        # Layer 1 without RoPE (NoPE), as every 4th layer of SmolLM3-3B.
        "architectures": ["SmolLM3ForCausalLM"], "no_rope_layers": [1, 0], "no_rope_layer_interval": 4,
        "attention_bias": False, "mlp_bias": False, "use_sliding_window": False, "sliding_window": None,
    },
    "granite": {
        # Scaled embeddings, residuals and attention, and logits divided by `logits_scaling`; tied, as
        # Granite 3 is.
        "architectures": ["GraniteForCausalLM"], "logits_scaling": 4.0, "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5, "attention_multiplier": 0.25, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": True,
    },
    "glm4": {
        # Half-rotary, interleaved RoPE; q/k/v biases; extra post-norms.
        "architectures": ["Glm4ForCausalLM"], "head_dim": 16, "attention_bias": True,
        "partial_rotary_factor": 0.5,
    },
    "olmo2": {
        # q/k norms over all heads; norms after attention and MLP.
        "architectures": ["Olmo2ForCausalLM"], "attention_bias": False,
    },
    "deepseek_v2": {
        # MLA (DeepSeek-V2-Lite: no q_lora), K 24 wide (16 + 8 rotary), V 16; one dense layer then MoE with a
        # shared expert.
        "architectures": ["DeepseekV2ForCausalLM"], "num_key_value_heads": 4, "kv_lora_rank": 32,
        "q_lora_rank": None, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
        "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "greedy", "routed_scaling_factor": 1.0,
        "n_group": 1, "topk_group": 1, "scoring_func": "softmax", "norm_topk_prob": False,
        "attention_bias": False,
        # DeepSeek-V2-Lite's YaRN (mlx-lm's DeepSeek-V2 attention reads it unconditionally).
        "max_position_embeddings": 163840,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    },
    "gemma": {
        # No lm_head: the embedding is the output matrix; embeddings scaled by sqrt(hidden).
        "architectures": ["GemmaForCausalLM"], "head_dim": 16, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
    },
    "gemma2": {
        # Gemma's tied head, then tanh softcapping of the final logits at 30, as Gemma 2 ships it (the tiny
        # model's raw logits reach ±100, so the cap changes them by whole units); attention logits capped too.
        # As many KV heads as query heads: mlx-lm's Gemma 2 cannot batch grouped-query attention
        # (`batch_obstacle`), which is what every published Gemma 2 uses (`gemma2_gqa` below).
        "architectures": ["Gemma2ForCausalLM"], "head_dim": 16, "num_key_value_heads": 4,
        "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
        "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 16,
        "sliding_window": 4096, "cache_implementation": "hybrid",
    },
    "gemma3_text": {
        # Gemma 3: sliding-window layers (a RotatingKVCache each) and global ones, one in two here, with a window
        # of 8 that every test prompt passes; Gemma's tied, scaled embedding.
        "architectures": ["Gemma3ForCausalLM"], "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
        "sliding_window_pattern": 2, "hidden_activation": "gelu_pytorch_tanh", "rope_local_base_freq": 10000.0,
        "tie_word_embeddings": True,
    },
    "gpt_oss": {
        # gpt-oss: MoE, alternating sliding-window (8 here) and full layers, attention sinks; float weights
        # (the published checkpoint's mxfp4 is a separate matter).
        "architectures": ["GptOssForCausalLM"], "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
        "intermediate_size": 64, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"],
    },
    "falcon_h1": {
        # Falcon-H1: every layer a Mamba-2 mixer beside attention, so each keeps two caches (mlx-lm's
        # CacheList(ArraysCache, KVCache)); mlx-lm's muP multipliers on embeddings, heads and the SSM.
        "architectures": ["FalconH1ForCausalLM"], "head_dim": 16, "mamba_d_conv": 4, "mamba_d_head": 16,
        "mamba_d_ssm": 64, "mamba_d_state": 16, "mamba_expand": 2, "mamba_n_groups": 1, "mamba_n_heads": 4,
        "mamba_chunk_size": 16,
    },
    "lfm2": {
        # LFM2: a hybrid, short-convolution blocks (a recurrent ArraysCache each) and attention layers; one of
        # each here.
        "architectures": ["Lfm2ForCausalLM"], "norm_eps": 1e-5, "conv_bias": False, "conv_L_cache": 3,
        "block_dim": 64, "block_multiple_of": 16, "block_ffn_dim_multiplier": 1.0, "block_auto_adjust_ff_dim": False,
        "block_ff_dim": 128, "full_attn_idxs": [1],
    },
    "qwen3_next": {
        # Qwen3-Next: gated DeltaNet linear-attention layers (an ArraysCache of conv and recurrent state each)
        # with a full-attention layer every 2nd (every 4th in the published model), MoE with a shared expert.
        "architectures": ["Qwen3NextForCausalLM"], "head_dim": 16, "partial_rotary_factor": 0.25,
        "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
        "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "num_experts": 4, "num_experts_per_tok": 2,
        "decoder_sparse_step": 1, "shared_expert_intermediate_size": 64, "mlp_only_layers": [],
        "moe_intermediate_size": 64, "full_attention_interval": 2,
    },
}
for _family, _config in FAMILIES.items():
    FAMILIES[_family] = {**_COMMON, "model_type": _family, **_config}
# Gemma 2 as published: grouped-query attention (2 KV heads for 4 query heads), which only the paged path serves.
FAMILIES["gemma2_gqa"] = {**FAMILIES["gemma2"], "num_key_value_heads": 2}
# Gemma 3 4B and up as published: the language model above under `text_config`, beside a vision tower that
# mlx-lm's `gemma3` drops (vLLM is told the wrapper is text-only: `vmetal.engine.text_only`).
FAMILIES["gemma3"] = {
    "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "vocab_size": None,
    "tie_word_embeddings": True, "mm_tokens_per_image": 4, "boi_token_index": 3, "eoi_token_index": 4,
    "image_token_index": 5,
    "text_config": {k: v for k, v in FAMILIES["gemma3_text"].items() if k not in ("architectures", "vocab_size")},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
}
# Qwen3.5 as published: a hybrid language model (gated DeltaNet layers, full attention every 2nd here) with
# multimodal RoPE sections, under `text_config` beside a vision tower that mlx-lm's `qwen3_5` drops.
FAMILIES["qwen3_5"] = {
    "model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"], "vocab_size": None,
    "tie_word_embeddings": False,
    "text_config": {**{k: v for k, v in _COMMON.items() if k != "vocab_size"}, "model_type": "qwen3_5_text",
                    "head_dim": 16, "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
                    "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "full_attention_interval": 2,
                    "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0,
                                        "partial_rotary_factor": 0.5}},
    "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64},
}


def build_family(path: Path, family: str, seed: int = 0, **config: Any) -> Path:
    """A tiny random `family` checkpoint (float32) with the demo tokenizer in `path`; `config` overrides
    entries of its config.json (`num_hidden_layers=3`)."""
    from vmetal.demo import build_checkpoint

    return build_checkpoint(path, {**FAMILIES[family], **config}, seed=seed)


def as_sliding_window(config: dict[str, Any]) -> dict[str, Any]:
    """`config` relabelled as a Gemma 3 text model of the same shape: mlx-lm's `gemma3_text` then makes a
    sliding-window `RotatingKVCache` for every other layer and a `KVCache` for the rest (a pattern of 2; mlx-lm's
    Gemma 3 needs at least as many layers as its pattern), a state only the MLX-managed path holds. Only the
    config changes."""
    return {**config, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "sliding_window": 16,
            "sliding_window_pattern": 2}


def as_chunked_attention(config: dict[str, Any]) -> dict[str, Any]:
    """`config` relabelled as a Llama 4 model of the same shape: mlx-lm's `llama4` then makes a chunked-attention
    `ChunkedKVCache` for three layers in four (every layer of a 2-layer model), a state no vmetal KV path holds
    yet. Only the config changes: it is refused before any weight is read."""
    text = {"model_type": "llama4_text", "attention_bias": False, "attention_chunk_size": 16,
            "head_dim": config.get("head_dim") or config.get("hidden_size", 64) // config.get("num_attention_heads", 4),
            "interleave_moe_layer_step": 1, "intermediate_size_mlp": config.get("intermediate_size", 128),
            "num_experts_per_tok": 1, "num_local_experts": 2, "rope_scaling": None, "use_qk_norm": True,
            **{k: config.get(k, v) for k, v in (("hidden_size", 64), ("intermediate_size", 128),
                                                 ("max_position_embeddings", 2048), ("num_attention_heads", 4),
                                                 ("num_hidden_layers", 2), ("num_key_value_heads", 2),
                                                 ("rms_norm_eps", 1e-6), ("rope_theta", 10000.0),
                                                 ("vocab_size", 512))}}
    return {**{k: v for k, v in config.items() if k not in text}, "model_type": "llama4",
            "architectures": ["Llama4ForConditionalGeneration"], "text_config": text}



def first_layers(source: Path, path: Path, layers: int) -> Path:
    """`vmetal.bench.shapes.first_layers`: a draft model for `source` (its first `layers` layers)."""
    from vmetal.bench.shapes import first_layers as cut

    return cut(source, path, layers)


def as_published_mxfp4(source: Path, path: Path) -> Path:
    """The gpt_oss checkpoint `source` as OpenAI publishes gpt-oss: each layer's experts quantized to mxfp4 and
    stored as `gate_up_proj_{blocks,scales,bias}` and `down_proj_{blocks,scales,bias}` (blocks uint8 [E, out,
    in/32, 16], two e2m1 values a byte, low nibble first; scales uint8 E8M0 [E, out, in/32]; gate and up rows
    interleaved, gate first), the rest as it was, and config.json's `quantization_config` saying `mxfp4`.

    MLX's own mxfp4 packing is those bytes read as uint32, so `mx.quantize` makes them; mlx-lm then loads the
    folder back through its gpt_oss `sanitize` and its loader's mxfp4 mapping."""
    import json
    import shutil

    import mlx.core as mx

    weights = mx.load(str(source / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    out = {k: v for k, v in weights.items() if ".mlp.experts." not in k}

    def packed(w: mx.array) -> tuple[mx.array, mx.array]:
        q, scales = mx.quantize(w, group_size=32, bits=4, mode="mxfp4")
        return q.view(mx.uint8).reshape(*q.shape[:2], -1, 16), scales

    def interleaved(a: mx.array, b: mx.array) -> mx.array:  # rows of a at even, of b at odd positions
        return mx.stack([a, b], axis=2).reshape(a.shape[0], 2 * a.shape[1], *a.shape[2:])

    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp.experts."
        (gate, gate_s), (up, up_s) = packed(weights[p + "gate_proj.weight"]), packed(weights[p + "up_proj.weight"])
        down, down_s = packed(weights[p + "down_proj.weight"])
        out |= {p + "gate_up_proj_blocks": interleaved(gate, up), p + "gate_up_proj_scales": interleaved(gate_s, up_s),
                p + "gate_up_proj_bias": interleaved(weights[p + "gate_proj.bias"], weights[p + "up_proj.bias"]),
                p + "down_proj_blocks": down, p + "down_proj_scales": down_s,
                p + "down_proj_bias": weights[p + "down_proj.bias"]}
    if path.exists():
        shutil.rmtree(path)
    shutil.copytree(source, path, ignore=shutil.ignore_patterns("model.safetensors", "config.json"))
    mx.save_safetensors(str(path / "model.safetensors"), out, metadata={"format": "pt"})
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path
