"""What one projection costs the host to launch, by its number of rows: MLX's matmul alone, no model.

    python benchmarks/profile/prof_matmul.py [--rows 1,2,4,8,32] [--products 100] [--reps 20] [--kernel]

A verify forward of a few positions (speculative decoding) and a 32-row decode step run the same projections as a
one-row step with more rows. On CUDA MLX (v0.32) takes its own gemv kernel for a one-row product only; any other
goes to cuBLASLt, whose descriptors and algorithm heuristic MLX sets up anew for every call (RESULTS-gpu.md), so the
host's launch of a forward may grow with its first extra row and not after. This times `--products` products
[rows x 1024] @ [1024 x 3072] (Qwen3-0.6B's packed query/key/value width) per repetition, bfloat16: the graph
build, the `mx.async_eval` that launches them, and the wait for their results, each the median over `--reps`
after 5 warm-ups. `--rows-apart` also times each row as a one-row product of its own (gemv each) and concatenates
them. `--kernel` (CUDA only) times a plain hand-written kernel of the same product, launched through
`mx.fast.cuda_kernel` with no per-call setup: whether the cost is cuBLASLt's or any launch's. vmetal runs no such
kernel: on a Mac Metal's matmul encodes MLX's own kernels with no per-call query, and the lent GPU stands in for one.
"""

from __future__ import annotations

import argparse
import statistics
import time

# One warp per output column, each lane summing a strided share of the dot product for every row (M <= 32).
_KERNEL = r"""
const unsigned lane = threadIdx.x;
const unsigned n = blockIdx.y * blockDim.y + threadIdx.y;
if (n >= unsigned(N)) return;
float acc[M];
#pragma unroll
for (int m = 0; m < M; ++m) acc[m] = 0.0f;
const size_t row = size_t(n) * K;
for (int k = int(lane) * 8; k < K; k += 256) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float wv = static_cast<float>(w[row + k + j]);
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] += wv * static_cast<float>(x[size_t(m) * K + k + j]);
  }
}
#pragma unroll
for (int m = 0; m < M; ++m) {
  float v = acc[m];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) out[size_t(m) * N + n] = static_cast<T>(v);
}
"""


def _kernel_product():
    import mlx.core as mx

    kernel = mx.fast.cuda_kernel(name="rows_product", input_names=["x", "w"], output_names=["out"],
                                 source=_KERNEL)

    def product(x, w):
        m, k = x.shape
        n = w.shape[0]
        return kernel(inputs=[x, w], template=[("T", x.dtype), ("M", m), ("K", k), ("N", n)], grid=(32, n, 1),
                      threadgroup=(32, 4, 1), output_shapes=[(m, n)], output_dtypes=[x.dtype])[0]

    return product


def time_products(rows: int, product, weights, products: int, reps: int) -> dict[str, float]:
    import mlx.core as mx

    x = mx.random.normal((rows, weights[0].shape[1])).astype(weights[0].dtype)
    mx.eval(x)
    phases: dict[str, list[float]] = {"build": [], "launch": [], "wait": []}
    for rep in range(reps + 5):
        t0 = time.perf_counter()
        outs = [product(x, weights[i % len(weights)]) for i in range(products)]
        t1 = time.perf_counter()
        mx.async_eval(outs)
        t2 = time.perf_counter()
        mx.eval(outs)
        t3 = time.perf_counter()
        if rep >= 5:
            for name, ms in (("build", t1 - t0), ("launch", t2 - t1), ("wait", t3 - t2)):
                phases[name].append(ms * 1e3)
    return {name: round(statistics.median(v), 3) for name, v in phases.items()}


def main() -> None:
    import mlx.core as mx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,32")
    ap.add_argument("--products", type=int, default=100)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rows-apart", action="store_true", help="also each row as a one-row product of its own")
    ap.add_argument("--kernel", action="store_true", help="also a hand-written kernel (CUDA only)")
    args = ap.parse_args()
    if args.kernel and not mx.cuda.is_available():
        ap.error("--kernel needs MLX's CUDA backend (mlx[cuda]); this MLX has none")
    if not all(r.isdigit() and 0 < int(r) <= 32 for r in args.rows.split(",")):
        ap.error(f"--rows {args.rows!r} is not a list of row counts from 1 to 32 (e.g. 1,2,4)")
    rows = [int(r) for r in args.rows.split(",")]
    weights = [mx.random.normal((3072, 1024)).astype(mx.bfloat16) for _ in range(8)]  # more than a cache holds
    mx.eval(weights)
    variants = {"matmul": lambda x, w: x @ w.T}
    if args.rows_apart:
        variants["rows apart"] = lambda x, w: mx.concatenate([x[r:r + 1] @ w.T for r in range(x.shape[0])])
    if args.kernel:
        product = _kernel_product()
        x = mx.random.normal((4, 1024)).astype(mx.bfloat16)
        want, got = (x @ weights[0].T).astype(mx.float32), product(x, weights[0]).astype(mx.float32)
        print(f"kernel: max error {(mx.abs(want - got).max() / mx.abs(want).max()).item():.2e} of the largest "
              "output", flush=True)
        variants["kernel"] = product
    print(f"device {mx.default_device()}; {args.products} products [rows x 1024] @ [1024 x 3072] bfloat16 a "
          "repetition; median ms of build / launch / wait", flush=True)
    for name, product in variants.items():
        for n in rows:
            if name == "rows apart" and n == 1:
                continue
            t = time_products(n, product, weights, args.products, args.reps)
            print(f"{name} rows={n}: build {t['build']} launch {t['launch']} wait {t['wait']}", flush=True)


if __name__ == "__main__":
    main()
