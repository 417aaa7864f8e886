"""Does a lone stream decode as fast after a batch as before it? One engine: a single request's decode steps
(the engine's own timer, `step_times`), then a batch of `--rows` requests, then the single request again, twice.

    python benchmarks/profile/prof_after_batch.py [--shape deep-tiny] [--rows 32] [--tokens 128]

What it found (2026-12-07, this CPU host, deep-tiny, two runs each): before the runner emptied MLX's buffer cache
at a batch's end (`ModelRunnerBase._shrink_cache`), the lone stream after a 32-row batch ran at 0.57-0.83 of its
speed before it (58.0 -> 40.1 and 37.3 tok/s, 49.2 -> 33.2 and 40.8; graph build 3.4 -> 5.7 ms, compute 13.2 ->
17.0 ms a step): the cache held the batch's wide buffers. With it: 47.3 -> 61.2 and 61.7, 54.7 -> 55.5 and 55.6.
Prints one line per run: tok/s and the step's phases in ms.
"""

from __future__ import annotations

import argparse

from model_args import add_model_args, model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, "deep-tiny")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()

    from vmetal.bench.inprocess import engine_run, make_prompts, prepare_environ

    prepare_environ()
    checkpoint = model_dir(args, "prof-after-batch-")
    from vllm import LLM

    llm = LLM(model=str(checkpoint), max_model_len=args.tokens + 32, max_num_seqs=args.rows, seed=0)
    tokenizer = llm.get_tokenizer()
    one, many = make_prompts(tokenizer, 1, 16), make_prompts(tokenizer, args.rows, 16)
    engine_run(llm, one, 16)

    def single(label: str) -> None:
        llm.collective_rpc("step_times", kwargs={"clear": True})
        run = engine_run(llm, one, args.tokens)
        step = llm.collective_rpc("step_times")[0]["decode"][1]
        phases = ", ".join(f"{k[:-3]} {v:.2f}" for k, v in step.items() if k.endswith("_ms"))
        print(f"{label}: {run['agg_decode_tps']:.1f} tok/s; ms a step: {phases}", flush=True)

    single("lone stream, before any batch")
    engine_run(llm, many, 32)
    single(f"lone stream, after a {args.rows}-row batch")
    single("lone stream, after that")
    print("step counts:", llm.collective_rpc("step_counts")[0], flush=True)
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
