"""Memory-bandwidth floor of decode: bytes one decode step must read / measured copy bandwidth.

A decode step reads every weight the forward uses once (the embedding table only when it is tied to the
output layer; otherwise one row per token) plus each sequence's K and V so far, whatever the batch. So
no engine decodes faster than

    floor tok/s at batch C = C / ((weight bytes + C * context * KV bytes per token) / bandwidth)

Bandwidth is measured on the device MLX computes on (an elementwise pass over a large bf16 buffer:
bytes read + bytes written over the time), and with PyTorch's device-to-device copy where a CUDA
torch is present. The larger of the two is used: the floor is the fastest anything could go.

    python benchmarks/bench_floor.py MODEL_DIR --concurrency 1,32 --context 144 [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def mlx_copy_bandwidth(gib: float = 2.0, reps: int = 20) -> dict:
    import mlx.core as mx

    n = int(gib * 2**30) // 2
    x = mx.random.uniform(shape=(n,)).astype(mx.bfloat16)
    mx.eval(x)
    for _ in range(3):
        mx.eval(x + 1)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(x + 1)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"device": str(mx.default_device()), "bytes_moved": 4 * n, "median_s": med,
            "tb_per_s": 4 * n / med / 1e12, "best_tb_per_s": 4 * n / min(times) / 1e12}


def torch_copy_bandwidth(gib: float = 2.0, reps: int = 20) -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    n = int(gib * 2**30)
    x = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        y.copy_(x)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    med = statistics.median(times)
    out = {"device": torch.cuda.get_device_name(0), "bytes_moved": 2 * n, "median_s": med,
           "tb_per_s": 2 * n / med / 1e12, "best_tb_per_s": 2 * n / min(times) / 1e12}
    del x, y
    torch.cuda.empty_cache()
    return out


def step_bytes(model_dir: Path) -> dict:
    """Weight bytes a decode step reads, and K+V bytes per token of context, from the checkpoint."""
    from mlx.utils import tree_flatten
    from mlx_lm import load

    model, _ = load(str(model_dir), lazy=True)
    params = dict(tree_flatten(model.parameters()))
    total = sum(v.nbytes for v in params.values())
    c = json.loads((model_dir / "config.json").read_text())
    embed = sum(v.nbytes for k, v in params.items() if "embed_tokens" in k)
    read = total if c.get("tie_word_embeddings") else total - embed
    itemsize = next(iter(params.values())).dtype.size
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    kv = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim * itemsize
    return {"params": sum(v.size for v in params.values()), "weight_bytes": total,
            "weight_bytes_read_per_step": read, "kv_bytes_per_token": kv}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--concurrency", default="1,32", help="batch sizes to give the floor for")
    ap.add_argument("--context", type=float, default=0.0,
                    help="mean tokens of context per sequence during decode (prompt + half the output)")
    ap.add_argument("--gib", type=float, default=2.0, help="buffer size of the bandwidth test")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not (args.model_dir / "config.json").is_file():
        ap.error(f"{args.model_dir} has no config.json: pass a model folder")
    sb = step_bytes(args.model_dir)
    bw = {"mlx": mlx_copy_bandwidth(args.gib), "torch": torch_copy_bandwidth(args.gib)}
    best = max(b["tb_per_s"] for b in bw.values() if b) * 1e12
    floors = {}
    for c in (int(x) for x in args.concurrency.split(",")):
        nbytes = sb["weight_bytes_read_per_step"] + c * args.context * sb["kv_bytes_per_token"]
        floors[c] = {"bytes_per_step": nbytes, "step_ms": 1e3 * nbytes / best,
                     "tok_per_s": c * best / nbytes}
    report = {**sb, "bandwidth": bw, "bandwidth_used_tb_per_s": best / 1e12, "context": args.context,
              "floors": floors}
    for name, b in bw.items():
        if b:
            print(f"{name} copy on {b['device']}: {1e3 * b['tb_per_s']:.0f} GB/s (read + written, median)")
    print(f"{sb['params'] / 1e6:.1f} M parameters, {sb['weight_bytes'] / 2**30:.3f} GiB; a decode step "
          f"reads {sb['weight_bytes_read_per_step'] / 2**30:.3f} GiB of weights + "
          f"{sb['kv_bytes_per_token']} B of K/V per token of context ({args.context:g})")
    for c, f in floors.items():
        print(f"C={c}: {f['bytes_per_step'] / 2**30:.3f} GiB per step -> {f['step_ms']:.3f} ms, "
              f"floor {f['tok_per_s']:.0f} tok/s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
