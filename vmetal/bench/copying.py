"""A Qwen3 checkpoint whose weights are set by hand so that its greedy output copies its context: the model
n-gram speculation is measured on.

What n-gram lookup (prompt lookup) gains depends on a model that repeats what it has seen, as an editing model
rewriting a file does; a random-weight model never does, so its drafts are rejected and a benchmark on it
measures only what speculating costs. No trained model is reachable here, and training one on this host's CPU
would take hours, so the copying is built into the weights of a model of the real shape (its matmuls, caches
and kernels are those of the shape; only the values differ). The construction is the induction circuit that
trained transformers learn:

- Each token's embedding is a random unit vector in a subspace A (the output head is tied, so the logits read
  the same vectors), plus 1.0 in the last dimension, which every token shares and the position heads key on.
- Layers 0..n-1 each hold a previous-token head: its query and key come from the shared dimension only, so
  after RoPE their score depends on the distance alone; the key is the query turned by one position's angle in
  the fastest rotating pairs, which makes the score peak at exactly one position back. Layer i copies the
  token vector i positions back into a subspace of its own (B_{i+1}).
- Layer n holds the induction heads: at position m the query is (token m, m-1, .., m-n+1) and the key at
  position p is (token p-1, p-2, .., p-n), each through a random projection into the slowest rotating pairs
  (whose rotation over the context is negligible, so the score is content alone); a head attends where the n
  tokens before p equal the last n tokens, and writes token p's vector into A, scaled above the current
  token's own. Every KV head does this with projections of its own and their outputs add, which averages the
  projections' noise away.
- Every MLP and every other layer's output projection is zero: their matmuls run, and add nothing.

So the greedy continuation of a context is what followed the last n tokens' earlier occurrences, where n
tokens are ambiguous (two functions that both begin `def`), whichever the heads weigh most: about as often
as a real editing model, n-gram drafts agree with it. `make_copying` needs head_dim >= 128 (the slow pairs
carry the content), n + 1 layers or more, and room for n + 1 token subspaces and the shared dimension.
"""

from __future__ import annotations

import json
from pathlib import Path

# config.json key that marks a checkpoint rewritten here, and how many tokens its heads match
MARK = "vmetal_copying"
# Fastest-rotating RoPE pairs the position heads use, and the scales that make their softmaxes one-hot.
_POSITION_PAIRS = 12
_POSITION_SCALE = 5.0  # q_norm / k_norm weight of a previous-token head: peak score ~280, next best ~250
_INDUCTION_SCALE = 3.0  # of an induction head: a full match scores ~100, one token fewer ~35 below it
_COPY_GAIN = 8.0  # the copied token's vector against the current token's own (1.0) in the final residual


def make_copying(path: Path, n: int = 3, seed: int = 0) -> None:
    """Rewrite the Qwen3-family checkpoint in `path` (config.json + model.safetensors) in place into a model
    that copies its context, matching the last `n` tokens."""
    import mlx.core as mx
    import numpy as np

    config = json.loads((path / "config.json").read_text())
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    layers, vocab = config["num_hidden_layers"], config["vocab_size"]
    theta = config.get("rope_theta", 1e6) ** (-2 * np.arange(head_dim // 2) / head_dim)
    half, dim = head_dim // 2, min(head_dim, (hidden - 1) // (n + 1))
    slow = np.nonzero(theta * 1024 < 0.5)[0]  # turned less than 0.5 rad across 1,024 positions
    per = len(slow) // n
    if head_dim < 128 or layers < n + 1 or per < 4 or dim < 32:
        raise ValueError(f"a copying model needs head_dim >= 128, more than {n} layers and a hidden size of at "
                         f"least {32 * (n + 1) + 1}; {path} has {head_dim}, {layers} and {hidden}")
    token = [slice(j * dim, (j + 1) * dim) for j in range(n + 1)]  # token[j]: the token j positions back
    shared = hidden - 1
    rng = np.random.default_rng(seed)
    loaded = mx.load(str(path / "model.safetensors"))
    dtype = loaded["model.embed_tokens.weight"].dtype
    w = {name: np.array(a.astype(mx.float32)) for name, a in loaded.items()}
    del loaded

    embed = np.zeros((vocab, hidden), np.float32)
    vectors = rng.standard_normal((vocab, dim)).astype(np.float32)
    embed[:, token[0]] = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    embed[:, shared] = 1.0
    w["model.embed_tokens.weight"] = embed
    if "lm_head.weight" in w:
        w["lm_head.weight"] = embed.copy()
    w["model.norm.weight"][:] = 1.0
    content = [np.concatenate([slow[j * per:(j + 1) * per], slow[j * per:(j + 1) * per] + half]) for j in range(n)]
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "mlp.down_proj.weight"][:] = 0.0
        w[p + "input_layernorm.weight"][:] = 1.0
        w[p + "post_attention_layernorm.weight"][:] = 1.0
        q, k, v, o = (w[p + f"self_attn.{name}_proj.weight"] for name in "qkvo")
        o[:] = 0.0
        if i > n:
            continue
        for a in (q, k, v):
            a[:] = 0.0
        # input_layernorm scales each unit token vector up by sqrt(hidden / (tokens held + the shared 1.0)): the
        # output projections scale it back, so every subspace holds unit vectors and weighs the same.
        back = np.sqrt((i + 2) / hidden)
        if i < n:
            for j in range(_POSITION_PAIRS):
                q[j, shared] = 1.0
                k[j, shared], k[j + half, shared] = np.cos(theta[j]), np.sin(theta[j])
            v[:dim, token[i]] = np.eye(dim)
            o[token[i + 1], :dim] = back * np.eye(dim)
            scale = _POSITION_SCALE
        else:
            for g in range(kv_heads):
                rows_q = slice(g * (heads // kv_heads) * head_dim, (g * (heads // kv_heads) + 1) * head_dim)
                rows_kv = slice(g * head_dim, (g + 1) * head_dim)
                for j in range(n):
                    proj = rng.standard_normal((len(content[j]), dim)).astype(np.float32)
                    q[rows_q][content[j], token[j]] = proj
                    k[rows_kv][content[j], token[j + 1]] = proj
                v[rows_kv][:dim, token[0]] = np.eye(dim)
                o[token[0], rows_q][:, :dim] = _COPY_GAIN / kv_heads * back * np.eye(dim)
            scale = _INDUCTION_SCALE
        w[p + "self_attn.q_norm.weight"][:] = scale
        w[p + "self_attn.k_norm.weight"][:] = scale
    mx.save_safetensors(str(path / "model.safetensors"), {name: mx.array(a).astype(dtype) for name, a in w.items()},
                        metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps({**config, MARK: n}, indent=2))
