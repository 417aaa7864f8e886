"""Would fewer kernels a step make a one-row decode step shorter? A Qwen3 decode loop (mlx-lm's `generate_step`
shape: build N+1, launch it, read N's token) with a layer's small kernels fused by hand, on a GPU.

    python benchmarks/profile/prof_fuse.py [--shape qwen3-0.6b] [--tokens 128] [--trials 5]

Variants, each the same model, prompt and greedy loop:

- `mlx_lm`: the model as mlx-lm builds it, its own forward (the anchor's graph);
- `packed`: projections packed (`vmetal.engine.packed_projections`), mlx-lm's forward (what vmetal serves);
- `fused_qk`: packed, and each layer's query and key norms and RoPE one kernel (four before);
- `fused_all`: `fused_qk`, and each residual add with the RMSNorm after it one kernel (two a layer before).

The fused kernels are CUDA (`mx.fast.cuda_kernel`) where MLX computes on CUDA; elsewhere the same forward runs
their pure-MLX references (the tokens then must equal `packed`'s, which this script checks). Prints tok/s per
variant, the step graph's node count, and whether each variant's tokens equal `packed`'s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

QK_SOURCE = """
    // grid (32, NQ + NK, rows): one warp per (row, head) of the packed [q | k | v] projection.
    constexpr int HALF = D / 2;
    constexpr int PER = HALF / 32;
    int lane = threadIdx.x, head = blockIdx.y, row = blockIdx.z;
    const T* src = qkv + (size_t)row * ((NQ + 2 * NK) * D) + head * D;
    const T* w = head < NQ ? qw : kw;
    float a[PER], b[PER], ss = 0.f;
    for (int j = 0; j < PER; ++j) {
        int i = lane + 32 * j;
        a[j] = static_cast<float>(src[i]);
        b[j] = static_cast<float>(src[i + HALF]);
        ss += a[j] * a[j] + b[j] * b[j];
    }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
    float inv = rsqrtf(ss / D + eps[0]);
    int l = row % L, bb = row / L;
    float pos = static_cast<float>(offset[0] + l);
    T* dst = head < NQ ? q_out + ((size_t)(bb * NQ + head) * L + l) * D
                       : k_out + ((size_t)(bb * NK + head - NQ) * L + l) * D;
    for (int j = 0; j < PER; ++j) {
        int i = lane + 32 * j;
        float x1 = static_cast<float>(static_cast<T>(static_cast<float>(w[i]) *
                                      static_cast<float>(static_cast<T>(a[j] * inv))));
        float x2 = static_cast<float>(static_cast<T>(static_cast<float>(w[i + HALF]) *
                                      static_cast<float>(static_cast<T>(b[j] * inv))));
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        dst[i] = static_cast<T>(x1 * c - x2 * s);
        dst[i + HALF] = static_cast<T>(x2 * c + x1 * s);
    }
"""

ADD_NORM_SOURCE = """
    // grid (256, rows, 1): one block of 256 threads per row of N.
    constexpr int PER = (N + 255) / 256;
    int t = threadIdx.x, row = blockIdx.y;
    size_t base = (size_t)row * N;
    float h[PER], ss = 0.f;
    for (int j = 0; j < PER; ++j) {
        int i = t + 256 * j;
        h[j] = 0.f;
        if (i < N) {
            T v = static_cast<T>(static_cast<float>(x[base + i]) + static_cast<float>(r[base + i]));
            h_out[base + i] = v;
            h[j] = static_cast<float>(v);
            ss += h[j] * h[j];
        }
    }
    __shared__ float part[8];
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
    if ((t & 31) == 0) part[t >> 5] = ss;
    __syncthreads();
    float total = 0.f;
    for (int k = 0; k < 8; ++k) total += part[k];
    float inv = rsqrtf(total / N + eps[0]);
    for (int j = 0; j < PER; ++j) {
        int i = t + 256 * j;
        if (i < N) n_out[base + i] = static_cast<T>(static_cast<float>(w[i]) *
                                                    static_cast<float>(static_cast<T>(h[j] * inv)));
    }
"""


class Fused:
    """The two fused ops, as CUDA kernels or as their pure-MLX references."""

    def __init__(self, cuda: bool):
        import mlx.core as mx

        self.cuda = cuda
        if cuda:
            self.qk = mx.fast.cuda_kernel("vmetal_qk_norm_rope", ["qkv", "qw", "kw", "inv_freq", "eps", "offset"],
                                          ["q_out", "k_out"], QK_SOURCE)
            self.add_norm_k = mx.fast.cuda_kernel("vmetal_add_rms_norm", ["x", "r", "w", "eps"], ["h_out", "n_out"],
                                                  ADD_NORM_SOURCE)

    def qk_norm_rope(self, qkv, attn, offset: int):
        import mlx.core as mx

        B, L, _ = qkv.shape
        nq, nk, d = attn.n_heads, attn.n_kv_heads, attn.q_norm.weight.shape[0]
        if not self.cuda:
            q = attn.q_norm(qkv[..., :nq * d].reshape(B, L, nq, d)).transpose(0, 2, 1, 3)
            k = attn.k_norm(qkv[..., nq * d:(nq + nk) * d].reshape(B, L, nk, d)).transpose(0, 2, 1, 3)
            return attn.rope(q, offset=offset), attn.rope(k, offset=offset)
        inv_freq = getattr(attn, "_inv_freq", None)
        if inv_freq is None:
            base = attn.rope.base
            inv_freq = attn._inv_freq = mx.power(base, -mx.arange(0, d // 2, dtype=mx.float32) / (d // 2))
            inv_freq = mx.concatenate([inv_freq, inv_freq])
            attn._inv_freq = inv_freq
            attn._eps = mx.array([attn.q_norm.eps], dtype=mx.float32)
            mx.eval(inv_freq, attn._eps)
        q, k = self.qk(inputs=[qkv, attn.q_norm.weight, attn.k_norm.weight, inv_freq, attn._eps,
                               mx.array([offset], dtype=mx.int32)],
                       template=[("T", qkv.dtype), ("D", d), ("NQ", nq), ("NK", nk), ("L", L)],
                       grid=(32, nq + nk, B * L), threadgroup=(32, 1, 1),
                       output_shapes=[(B, nq, L, d), (B, nk, L, d)], output_dtypes=[qkv.dtype, qkv.dtype])
        return q, k

    def add_norm(self, x, r, norm):
        import mlx.core as mx

        if not self.cuda:
            h = x + r
            return h, norm(h)
        eps = getattr(norm, "_eps_arr", None)
        if eps is None:
            eps = norm._eps_arr = mx.array([norm.eps], dtype=mx.float32)
        n = x.shape[-1]
        rows = x.size // n
        h, y = self.add_norm_k(inputs=[x, r, norm.weight, eps], template=[("T", x.dtype), ("N", n)],
                               grid=(256, rows, 1), threadgroup=(256, 1, 1),
                               output_shapes=[x.shape, x.shape], output_dtypes=[x.dtype, x.dtype])
        return h, y


def fused_forward(model, ids, cache, fused: Fused, fuse_add: bool):
    """Qwen3's forward with the fused ops (packed projections: each attention has `qkv_proj`)."""
    import mlx.core as mx

    inner = model.model
    layers = inner.layers
    h = inner.embed_tokens(ids)
    x = layers[0].input_layernorm(h)
    for i, layer in enumerate(layers):
        attn, c = layer.self_attn, cache[i]
        B, L, _ = x.shape
        qkv = attn["qkv_proj"](x)
        q, k = fused.qk_norm_rope(qkv, attn, c.offset)
        nq, nk, d = attn.n_heads, attn.n_kv_heads, q.shape[-1]
        v = qkv[..., (nq + nk) * d:].reshape(B, L, nk, d).transpose(0, 2, 1, 3)
        k, v = c.update_and_fetch(k, v)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=attn.scale,
                                               mask="causal" if L > 1 else None)
        r = attn.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))
        nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else inner.norm
        if fuse_add:
            h, y = fused.add_norm(h, r, layer.post_attention_layernorm)
            h, x = fused.add_norm(h, layer.mlp(y), nxt)
        else:
            h = h + r
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            x = nxt(h)
    return inner.embed_tokens.as_linear(x) if model.args.tie_word_embeddings else model.lm_head(x)


def generate(forward, model, prompt, tokens: int):
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)

    def step(y):
        return mx.argmax(forward(y[None], cache)[:, -1, :], axis=-1)

    y = step(prompt)
    mx.eval(y)
    out = []
    t0 = time.perf_counter()
    for _ in range(tokens):
        nxt = step(y)
        mx.async_eval(nxt)
        out.append(y.item())
        y = nxt
    mx.eval(y)
    return tokens / (time.perf_counter() - t0), out


def graph_nodes(forward, model, prompt) -> int:
    import collections
    import re

    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(forward(prompt[None], cache))
    out = forward(prompt[None, :1], cache)
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, out, *[a for c in cache for a in (c.keys, c.values)])
        names = collections.Counter(re.findall(r'label ="([A-Za-z]+)', f.read()))
    views = ("Reshape", "Transpose", "Slice", "Split", "Broadcast", "ExpandDims", "Squeeze", "Flatten", "Unflatten")
    return sum(v for k, v in names.items() if k not in views)


def main() -> None:
    import mlx.core as mx
    from mlx_lm import load

    from vmetal.bench.shapes import SHAPES, build_model
    from vmetal.engine.packed_projections import pack

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--reference", action="store_true", help="the fused ops' pure-MLX references even on CUDA")
    args = ap.parse_args()
    model_dir = build_model(args.model_dir or Path(tempfile.mkdtemp(prefix="prof-fuse-")), args.dtype,
                            SHAPES[args.shape])
    cuda = mx.default_device() == mx.gpu and mx.cuda.is_available() and not args.reference
    fused = Fused(cuda)
    plain, _ = load(str(model_dir))
    packed, _ = load(str(model_dir))
    pack(packed)
    prompt = mx.array([1, 2, 3, 4, 5, 6, 7, 8], dtype=mx.int32)
    variants = {
        "mlx_lm": (plain, lambda ids, c: plain(ids, cache=c)),
        "packed": (packed, lambda ids, c: packed(ids, cache=c)),
        "fused_qk": (packed, lambda ids, c: fused_forward(packed, ids, c, fused, False)),
        "fused_all": (packed, lambda ids, c: fused_forward(packed, ids, c, fused, True)),
    }
    print(f"shape {args.shape} {args.dtype}, device {mx.default_device()}, fused ops "
          f"{'CUDA kernels' if cuda else 'pure-MLX references'}", flush=True)
    rates = {name: [] for name in variants}
    tokens = {}
    for name, (model, forward) in variants.items():
        generate(forward, model, prompt, 8)  # warm-up (kernel compiles)
        print(f"{name}: {graph_nodes(forward, model, prompt)} kernel nodes a step", flush=True)
    for _ in range(args.trials):
        for name, (model, forward) in variants.items():
            rate, out = generate(forward, model, prompt, args.tokens)
            rates[name].append(rate)
            tokens.setdefault(name, out)
    anchor = statistics.median(rates["mlx_lm"])
    for name, found in rates.items():
        same = sum(a == b for a, b in zip(tokens[name], tokens["packed"]))
        print(f"{name}: {statistics.median(found):.1f} tok/s (trials {', '.join(f'{r:.1f}' for r in found)}), "
              f"{statistics.median(found) / anchor:.3f}x mlx_lm, tokens equal to packed's: {same}/{args.tokens}",
              flush=True)


if __name__ == "__main__":
    main()
