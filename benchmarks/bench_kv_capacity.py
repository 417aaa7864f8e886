"""KV capacity of the paged path for sliding-window models: vLLM's hybrid KV cache manager vs one block table.

On the paged path a sliding-window layer is a KV cache group of its own whose blocks vLLM frees once they fall
behind the window (`vmetal/engine/runner/kv/paged_pools.py`). The anchor is the same engine started with
`--disable-hybrid-kv-cache-manager`: one block table whose blocks hold every token in every layer, which is what
the paged path did before. Both engines get the same KV bytes (`kv_cache_memory_bytes`); the figures are vLLM's
own, as its engine logs them at start-up: the KV tokens the pool holds and how many requests of the full context
fit at once ("Maximum concurrency"). One short greedy request per engine checks that it serves.

The layer patterns, windows and contexts are the published models' (Gemma 3 27B: 62 layers, five sliding in six,
window 1,024, 128k context; gpt-oss-20b: 24 layers alternating, window 128, 128k context); the widths are tiny,
since the ratio depends only on the pattern, the windows, the context and the step's chunk (a sliding layer
holds its window less one plus the tokens of one step: `--max-num-batched-tokens`).

Results go to benchmarks/RESULTS.md between `<!-- kv-capacity:begin -->` and `<!-- kv-capacity:end -->`.

    python benchmarks/bench_kv_capacity.py     # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_md import REPO, add_output_args, publish_run, section_header

TINY = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
        "intermediate_size": 128, "vocab_size": None, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": True}
PATTERNS = {
    "Gemma 3 27B": {
        "config": {**TINY, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
                   "num_hidden_layers": 62, "sliding_window": 1024, "sliding_window_pattern": 6,
                   "query_pre_attn_scalar": 16, "hidden_activation": "gelu_pytorch_tanh",
                   "rope_local_base_freq": 10000.0, "max_position_embeddings": 131072},
        "max_model_len": 131072,
    },
    "gpt-oss-20b": {
        "config": {**TINY, "model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "num_hidden_layers": 24,
                   "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 128,
                   "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072},
        "max_model_len": 131072,
    },
}
KV_BYTES = 2 << 30  # the same pool for both engines
STEP_TOKENS = 2048  # --max-num-batched-tokens: a sliding layer holds its window - 1 + one step's tokens
CAPACITY = re.compile(r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: "
                      r"([\d.]+)x")

# Run in a child per engine: each `LLM` starts and stops an engine of its own, and vLLM logs its capacity there.
CHILD = """
import sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    path, max_len, kv_bytes, step, hybrid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    llm = LLM(model=path, max_model_len=max_len, max_num_seqs=8, max_num_batched_tokens=step, block_size=16,
              kv_cache_memory_bytes=kv_bytes, disable_hybrid_kv_cache_manager=hybrid == "off", seed=0)
    out = llm.generate(["the quick brown fox"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    print("SERVED", len(out[0].outputs[0].token_ids), flush=True)
"""


def build(path: Path, config: dict) -> Path:
    from vmetal.demo import build_checkpoint

    return build_checkpoint(path, config, dtype="float32")  # MLX CPU gathers MoE experts in float32 only


def measure(model: Path, max_len: int, hybrid: bool) -> dict:
    env = {**os.environ, "VLLM_METAL_USE_PAGED_ATTENTION": "1", "VMETAL_ENABLE": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    argv = [sys.executable, "-c", CHILD, str(model), str(max_len), str(KV_BYTES), str(STEP_TOKENS),
            "on" if hybrid else "off"]
    started = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    text = out.stdout + out.stderr
    found = CAPACITY.search(text)
    if out.returncode != 0 or found is None or "SERVED 8" not in text:
        raise SystemExit(f"engine ({'hybrid' if hybrid else 'one table'}) failed ({out.returncode}): {text[-3000:]}")
    return {"kv_tokens": int(found.group(1).replace(",", "")), "concurrency": float(found.group(3)),
            "seconds": round(time.monotonic() - started, 1)}


def render(results: dict, started: str, elapsed: float, argv: list[str] | None) -> str:
    lines = [
        *section_header("KV capacity of sliding-window models on the paged path", "bench_kv_capacity.py", argv,
                        started, elapsed),
        f"**Models:** random-weight checkpoints with the published layer pattern, windows and context of each "
        f"model (hidden 64, 4 heads, 1 KV head of 16, float32); {KV_BYTES >> 30} GiB of KV for both engines; "
        f"`--max-num-batched-tokens {STEP_TOKENS}`, block size 16. Figures are vLLM's own start-up log line "
        "(KV cache size, maximum concurrency of full-context requests); the anchor is the same engine with "
        "`--disable-hybrid-kv-cache-manager` (one block table, every layer holding every token).", "",
        "| model pattern | context | KV tokens: one table | KV tokens: sliding groups | full-context requests at "
        "once: one table | sliding groups | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        one, groups = r["one table"], r["sliding groups"]
        lines.append(f"| {name} | {PATTERNS[name]['max_model_len']:,} | {one['kv_tokens']:,} | "
                     f"{groups['kv_tokens']:,} | {one['concurrency']:.2f} | {groups['concurrency']:.2f} | "
                     f"{groups['concurrency'] / one['concurrency']:.2f}x |")
    lines += ["", "What it says: with the same KV memory, a Gemma 3 serves about as many more full-context requests "
              "as its sliding layers outnumber its global ones (less the window and one step each keeps, and the "
              "padding vLLM adds to make its groups equal), and a gpt-oss about twice as many. On a Mac, where the "
              "KV shares unified memory with the weights, that is what decides how many long conversations fit. "
              "The tokens each engine decodes are the tests' concern (tests/engine/test_families.py)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_args(parser)
    args = parser.parse_args(argv)
    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.monotonic()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="vmetal-bench-kv-") as tmp:
        for name, pattern in PATTERNS.items():
            model = build(Path(tmp) / name.replace(" ", "-"), pattern["config"])
            results[name] = {}
            for label, hybrid in (("one table", False), ("sliding groups", True)):
                print(f"{name}: {label}", file=sys.stderr, flush=True)
                results[name][label] = measure(model, pattern["max_model_len"], hybrid)
    section = render(results, started, time.monotonic() - t0, argv)
    publish_run("kv-capacity", section, {"results": results}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
