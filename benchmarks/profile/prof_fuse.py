"""Would fewer kernels a step make a one-row decode step shorter? A Qwen3 decode loop (mlx-lm's `generate_step`
shape: build N+1, launch it, read N's token) with a layer's small kernels fused, on a GPU.

    python benchmarks/profile/prof_fuse.py [--shape qwen3-0.6b] [--tokens 128] [--trials 5]

Variants, each the same model, prompt and greedy loop:

- `mlx_lm`: the model as mlx-lm builds it, its own forward (the anchor's graph);
- `packed`: projections packed (`vmetal.engine.packed_projections`), mlx-lm's forward;
- `fused_qk`: packed, and each layer's query and key norms and RoPE one kernel (`vmetal.engine.fused_qk`, four
  launches before): the model as vmetal serves it;
- `fused_all`: `fused_qk`, and each residual add with the RMSNorm after it one kernel (two a layer before), a
  kernel of this script's own (CUDA) in a forward of its own: an experiment vmetal does not serve.

Where MLX computes on CUDA the fused ops are kernels; elsewhere their pure-MLX references run (the tokens then
equal `packed`'s, which this script checks). Prints tok/s per variant, the step graph's node count, and whether
each variant's tokens and logits equal `packed`'s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from model_args import add_model_args, model_dir

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


class AddNorm:
    """A residual add and the RMSNorm after it, as one CUDA kernel or as the two ops."""

    def __init__(self, cuda: bool):
        import mlx.core as mx

        self.kernel = mx.fast.cuda_kernel("vmetal_add_rms_norm", ["x", "r", "w", "eps"], ["h_out", "n_out"],
                                          ADD_NORM_SOURCE) if cuda else None

    def __call__(self, x, r, norm):
        import mlx.core as mx

        if self.kernel is None:
            h = x + r
            return h, norm(h)
        eps = getattr(norm, "_eps_arr", None)
        if eps is None:
            eps = norm._eps_arr = mx.array([norm.eps], dtype=mx.float32)
        n = x.shape[-1]
        h, y = self.kernel(inputs=[x, r, norm.weight, eps], template=[("T", x.dtype), ("N", n)],
                           grid=(256, x.size // n, 1), threadgroup=(256, 1, 1),
                           output_shapes=[x.shape, x.shape], output_dtypes=[x.dtype, x.dtype])
        return h, y


def fused_forward(model, ids, cache, add_norm: AddNorm):
    """Qwen3's forward (its attention layers fused by `fused_qk`) with each residual add and the norm after it
    one call of `add_norm`."""
    from mlx_lm.models.base import create_attention_mask

    inner = model.model
    layers = inner.layers
    h = inner.embed_tokens(ids)
    mask = create_attention_mask(h, cache[0])
    x = layers[0].input_layernorm(h)
    for i, layer in enumerate(layers):
        h, y = add_norm(h, layer.self_attn(x, mask, cache[i]), layer.post_attention_layernorm)
        h, x = add_norm(h, layer.mlp(y), layers[i + 1].input_layernorm if i + 1 < len(layers) else inner.norm)
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


def logit_gap(forward, anchor, model, prompt) -> str:
    """The largest difference between two forwards' logits over a prompt and the three steps after it (each
    fed the anchor's greedy token), and whether their greedy tokens agree."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    caches = make_prompt_cache(model), make_prompt_cache(model)
    ids, worst, agree = prompt[None], 0.0, 0
    for _ in range(4):
        a, b = anchor(ids, caches[0])[:, -1, :], forward(ids, caches[1])[:, -1, :]
        worst = max(worst, mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item())
        agree += int(mx.argmax(a).item() == mx.argmax(b).item())
        ids = mx.argmax(a, axis=-1)[None].astype(mx.int32)
    return f"max |diff| {worst:.4g}, argmax agrees {agree}/4"


def main() -> None:
    import mlx.core as mx
    from mlx_lm import load

    from vmetal.engine import fused_qk
    from vmetal.engine.packed_projections import pack

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, "qwen3-0.6b")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--reference", action="store_true", help="the fused ops' pure-MLX references even on CUDA")
    args = ap.parse_args()
    checkpoint = str(model_dir(args, "prof-fuse-"))
    cuda = mx.default_device() == mx.gpu and mx.cuda.is_available() and not args.reference
    add_norm = AddNorm(cuda)
    plain, _ = load(checkpoint)
    packed, _ = load(checkpoint)
    pack(packed)
    fused, _ = load(checkpoint)
    pack(fused)
    fused_qk.install(fused, None if cuda else False)
    prompt = mx.array([1, 2, 3, 4, 5, 6, 7, 8], dtype=mx.int32)
    variants = {
        "mlx_lm": (plain, lambda ids, c: plain(ids, cache=c)),
        "packed": (packed, lambda ids, c: packed(ids, cache=c)),
        "fused_qk": (fused, lambda ids, c: fused(ids, cache=c)),
        "fused_all": (fused, lambda ids, c: fused_forward(fused, ids, c, add_norm)),
    }
    print(f"shape {args.shape} {args.dtype}, device {mx.default_device()}, fused ops "
          f"{'CUDA kernels' if cuda else 'pure-MLX references'}", flush=True)
    tokens = {}
    for name, (model, forward) in list(variants.items()):
        try:
            generate(forward, model, prompt, 8)  # warm-up (kernel compiles)
        except Exception as e:  # a kernel that does not compile: report it, time the others
            print(f"{name}: failed: {type(e).__name__}: {e}", flush=True)
            del variants[name]
            continue
        print(f"{name}: {graph_nodes(forward, model, prompt)} kernel nodes a step; logits against packed's: "
              f"{logit_gap(forward, variants['packed'][1], model, prompt)}", flush=True)
    rates = {name: [] for name in variants}
    for _ in range(args.trials):
        for name, (model, forward) in variants.items():
            rate, out = generate(forward, model, prompt, args.tokens)
            rates[name].append(rate)
            tokens.setdefault(name, out)
    anchor = statistics.median(rates["mlx_lm"])
    best = 0.0
    for name, found in rates.items():
        best = max(found) / max(rates["mlx_lm"])
        same = sum(a == b for a, b in zip(tokens[name], tokens["packed"]))
        print(f"{name}: {statistics.median(found):.1f} tok/s, best {max(found):.1f} / {best:.3f}x mlx_lm's best "
              f"(trials {', '.join(f'{r:.1f}' for r in found)}), "
              f"{statistics.median(found) / anchor:.3f}x mlx_lm, tokens equal to packed's: {same}/{args.tokens}",
              flush=True)


if __name__ == "__main__":
    main()
