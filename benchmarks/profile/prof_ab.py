"""One engine setting against another on the same machine in the same run: single-stream decode tok/s of two
engines (A and B, each its own EngineCore process, started with its own `VLLM_METAL_*` variables) and of
`mlx_lm.stream_generate`, interleaved trial by trial, and the median of the per-trial ratios.

    python benchmarks/profile/prof_ab.py --b VLLM_METAL_KERNELS=0 [--a NAME=VALUE] [--trials 9]
    python benchmarks/profile/prof_ab.py --b-arg max_num_seqs=40 --b-arg disable_log_stats=false

`--a-arg`/`--b-arg` set one engine's `LLM` keyword arguments (a JSON value, else the text): how bench_engine.py
starts its engine (room for its batch, vLLM's stats on) against how this script does. Two engines on the paged
path need `VLLM_METAL_MEMORY_FRACTION` (0.3 each, on both sides) or the second one's pools do not fit.

A lent GPU's speed drifts by tens of percent between minutes (RESULTS-gpu.md), more than most changes this
project measures; two engines alive at once and stepped in turn see the same drift, so their per-trial ratio
tells a few percent apart where two `bench_engine.py` runs cannot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from model_args import add_model_args, model_dir


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("VLLM_METAL_"):
        raise argparse.ArgumentTypeError(f"{text!r} is not VLLM_METAL_NAME=VALUE")
    return name, value


def _engine_arg(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE (an LLM keyword argument)")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, "qwen3-0.6b")
    ap.add_argument("--a", type=_setting, action="append", default=[], help="engine A's variables (default none)")
    ap.add_argument("--b", type=_setting, action="append", default=[], help="engine B's variables")
    ap.add_argument("--a-arg", type=_engine_arg, action="append", default=[], help="engine A's LLM keyword argument")
    ap.add_argument("--b-arg", type=_engine_arg, action="append", default=[], help="engine B's LLM keyword argument")
    ap.add_argument("--trials", type=int, default=9)
    ap.add_argument("--max-tokens", type=int, default=256)
    args = ap.parse_args()

    from vmetal.bench.inprocess import engine_run, make_prompts, mlx_single, prepare_environ

    prepare_environ()
    checkpoint = model_dir(args, "prof-ab-")
    from mlx_lm import load
    from vllm import LLM

    model, tokenizer = load(str(checkpoint))
    prompt = make_prompts(tokenizer, 1, 16)
    engines = {}
    for name, settings, extra in (("A", args.a, args.a_arg), ("B", args.b, args.b_arg)):
        saved = {k: os.environ.get(k) for k, _ in settings}
        os.environ.update(dict(settings))  # the EngineCore process is spawned with them
        kwargs = {"max_model_len": args.max_tokens + 32, "max_num_seqs": 8, "seed": 0, **dict(extra)}
        engines[name] = LLM(model=str(checkpoint), **kwargs)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        engine_run(engines[name], prompt, 32)
    mlx_single(model, tokenizer, prompt[0], 32)
    rates = {"A": [], "B": [], "mlx-lm": []}
    tokens = {}
    for trial in range(args.trials):
        order = ["A", "B"] if trial % 2 == 0 else ["B", "A"]
        for name in order:
            run = engine_run(engines[name], prompt, args.max_tokens)
            rates[name].append(run["agg_decode_tps"])
            tokens.setdefault(name, run["token_ids"][0])
        run = mlx_single(model, tokenizer, prompt[0], args.max_tokens)
        rates["mlx-lm"].append(run["decode_tps"])
        tokens.setdefault("mlx-lm", run["token_ids"])
        print(f"trial {trial + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()), flush=True)
    ratio = lambda x, y: statistics.median(a / b for a, b in zip(rates[x], rates[y]))  # noqa: E731
    a, b = dict(args.a) | dict(args.a_arg), dict(args.b) | dict(args.b_arg)
    print(f"A {a} vs B {b}, {args.shape} {args.dtype}, {args.trials} trials of "
          f"{args.max_tokens} tokens: A/B {ratio('A', 'B'):.3f}, A/mlx-lm {ratio('A', 'mlx-lm'):.3f}, "
          f"B/mlx-lm {ratio('B', 'mlx-lm'):.3f} (medians of per-trial ratios); medians tok/s "
          + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in rates.items())
          + "; tokens equal to mlx-lm's: " + ", ".join(f"{k} {tokens[k] == tokens['mlx-lm']}" for k in ("A", "B")),
          flush=True)
    for llm in engines.values():
        llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
