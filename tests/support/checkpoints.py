"""Model folders the memory tests can judge without loading anything: a real model's config.json and a
sparse weights file of its real size (a valid safetensors header, no disk used)."""

from __future__ import annotations

import json
import os

# Qwen/Qwen3-0.6B's config.json: the fields the estimate reads, and those mlx-lm's model class needs to be built
# (serve's pre-flight builds it, without weights, to see which caches it keeps).
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "max_position_embeddings": 40960, "torch_dtype": "bfloat16", "vocab_size": 151936,
    "intermediate_size": 3072, "rms_norm_eps": 1e-06, "rope_theta": 1000000, "tie_word_embeddings": True,
}
QWEN3_06B_WEIGHTS = 1_200_000_000  # ~1.2 GB of bf16 weights
QWEN3_06B_KV_PER_TOKEN = 2 * 28 * 8 * 128 * 2  # K and V, 28 layers, 8 KV heads, head_dim 128, 2 bytes


def model_folder(path, config, weight_bytes):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    header = b'{"__metadata__": {}}'
    with open(path / "model.safetensors", "wb") as f:
        # A valid safetensors header (serve's pre-flight reads it), then sparse bytes: no disk is used.
        f.write(len(header).to_bytes(8, "little") + header)
        os.truncate(f.fileno(), weight_bytes)
    return path
