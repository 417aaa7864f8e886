"""Where a speculating step's time goes, beside a plain decode step: vLLM's `LLM` on one stream, with and without
speculation, and the runner's own step timer (`MetalWorker.step_times`: graph build, launch, wait, vLLM's share) for
each.

    python benchmarks/profile/prof_draft.py [SHAPE] [DRAFT_LAYERS | ngram] [TRIALS] [TOKENS]

SHAPE is a `vmetal.bench.shapes` name (default qwen3-0.6b, bfloat16; `deep-tiny` or `copy-tiny` on the CPU host). The
drafts come from the checkpoint's first DRAFT_LAYERS layers (default 4), or with `ngram` from vLLM's n-gram lookup
(meant for a copying shape, `qwen3-0.6b-copying`, whose drafts are kept), TOKENS a step (default what `vmetal serve
--speculative` drafts: 3 for a draft model, as mlx-lm does; on CUDA a verify of fewer than 4 positions takes MLX's
vector attention kernel, of 4 or more cuDNN's, whose graph MLX builds again for every new key length: on an H200 neither
changed the ~8 ms a speculating step waits for its launches, RESULTS-gpu.md). Three engines, alive at once in this
process (VLLM_ENABLE_V1_MULTIPROCESSING=0, so this process can reach their drafters): plain, the drafter as served, and
the drafter the other way about queuing ahead (the drafts' and their verify forward queued at the end of the step
before, `decode_ahead.VerifyAhead`: as served on for n-gram, and for a draft model where a launch thread runs, as on a
GPU; the drafter's `queue_ahead`), and where the served drafter queues ahead a fourth: the same with its verify forward
launched whole rather than in parts (`MlxModelRunner.verify_launch_parts`). Each trial (default 5) runs 96 greedy tokens
of one code prompt on each engine in turn, the order rotating, after a warm-up request each: a lent GPU's speed drifts
by tens of percent between minutes, and engines stepped in turn see the same drift, so the per-trial ratios tell a few
percent apart where separate runs cannot (as prof_ab.py does for two settings). Prints one JSON object per engine
(output tok/s per trial and their median; the step summary by kind over all its trials' steps: `decode` plain decode
rows, `mixed` steps that verified drafts), then one with the medians of the per-trial ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n" * 3


def _queue_ahead(worker, ahead: bool | None = None) -> bool:
    """This engine's drafter's `queue_ahead`, set to `ahead` first unless None."""
    drafter = getattr(worker, "worker", worker).model_runner.drafter
    if ahead is not None:
        drafter.queue_ahead = ahead
    return drafter.queue_ahead


def _verify_parts(worker, parts: int) -> None:
    """Launch this engine's verify forwards queued ahead in `parts` (`MlxModelRunner.verify_launch_parts`)."""
    getattr(worker, "worker", worker).model_runner.verify_launch_parts = parts


def start(model: Path, spec: dict | None, ahead: bool | None, parts: int | None = None) -> object:
    from vllm import LLM

    llm = LLM(model=str(model), max_model_len=1024, max_num_seqs=4, seed=0,
              **({"speculative_config": spec} if spec else {}))
    if ahead is not None:
        llm.collective_rpc(_queue_ahead, args=(ahead,))
    if parts is not None:
        llm.collective_rpc(_verify_parts, args=(parts,))
    trial(llm)  # warm-up
    llm.collective_rpc("step_times", kwargs={"clear": True})  # the steps of the trials alone
    return llm


def trial(llm) -> tuple[float, list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)
    began = time.perf_counter()
    out = llm.generate([PROMPT], params, use_tqdm=False)[0]
    return len(out.outputs[0].token_ids) / (time.perf_counter() - began), list(out.outputs[0].token_ids)


def main() -> None:
    from vmetal.bench.inprocess import prepare_environ
    from vmetal.bench.shapes import SHAPES, build_model, first_layers

    prepare_environ()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engines in this process: `start` reaches the drafters
    from vmetal.preflight.features import DRAFT_TOKENS, ngram_config

    shape_name = sys.argv[1] if len(sys.argv) > 1 else "qwen3-0.6b"
    drafts = sys.argv[2] if len(sys.argv) > 2 else "4"
    trials = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    tokens = int(sys.argv[4]) if len(sys.argv) > 4 else None
    dtype = "bfloat16" if shape_name.startswith("qwen3-0.6b") else "float32"
    root = Path(tempfile.gettempdir()) / "vmetal-prof-draft"
    model = build_model(root / f"{shape_name}-{dtype}", dtype, SHAPES[shape_name])
    if drafts == "ngram":
        spec = ngram_config(tokens)
    else:
        draft = first_layers(model, root / f"{shape_name}-{dtype}-first{drafts}", int(drafts))
        spec = {"model": str(draft), "num_speculative_tokens": tokens or DRAFT_TOKENS}
    method = spec.get("method", "draft")
    engines = {"plain": start(model, None, None), method: start(model, spec, None)}
    served = engines[method].collective_rpc(_queue_ahead)[0]
    engines[f"{method}, {'not ' if served else ''}queued ahead"] = start(model, spec, not served)
    if served:  # and, queued ahead as served, its verify forward launched whole rather than in parts
        engines[f"{method}, verify launched whole"] = start(model, spec, None, parts=1)
    rates: dict[str, list[float]] = {name: [] for name in engines}
    same: dict[str, bool] = dict.fromkeys(engines, True)
    plain_tokens = None
    for t in range(trials):
        order = list(engines)[t % len(engines):] + list(engines)[:t % len(engines)]
        for name in order:
            tok_s, ids = trial(engines[name])
            rates[name].append(tok_s)
            plain_tokens = ids if name == "plain" and plain_tokens is None else plain_tokens
            if name != "plain" and plain_tokens is not None:
                same[name] &= ids == plain_tokens
        print(f"trial {t + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()), flush=True)
    for name, llm in engines.items():
        print(json.dumps({"engine": name, "tok_s": round(statistics.median(rates[name]), 1),
                          "trials": [round(r, 1) for r in rates[name]],
                          "steps": llm.collective_rpc("step_times")[0],
                          "counts": llm.collective_rpc("step_counts")[0], "tokens_as_plain": same[name]}),
              flush=True)
    ratio = lambda a, b: round(statistics.median(x / y for x, y in zip(rates[a], rates[b])), 3)  # noqa: E731
    flipped = list(engines)[2]
    ratios = {f"{method} / plain": ratio(method, "plain"), f"{flipped} / {method}": ratio(flipped, method)}
    if served:
        ratios[f"{method} / {method}, verify launched whole"] = ratio(method, f"{method}, verify launched whole")
    print(json.dumps({"shape": shape_name, "drafts": drafts, "tokens": spec["num_speculative_tokens"], "trials": trials,
                      **ratios}), flush=True)
    for llm in engines.values():
        llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
