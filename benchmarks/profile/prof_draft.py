"""Where a speculating step's time goes, beside a plain decode step: vLLM's `LLM` on one stream, with and
without speculation, and the runner's own step timer (`MetalWorker.step_times`: graph build, launch, wait,
vLLM's share) for each.

    python benchmarks/profile/prof_draft.py [SHAPE] [DRAFT_LAYERS | ngram]

SHAPE is a `vmetal.bench.shapes` name (default qwen3-0.6b, bfloat16; `deep-tiny` or `copy-tiny` on the CPU
host). The drafts come from the checkpoint's first DRAFT_LAYERS layers (default 4), or with `ngram` from vLLM's
n-gram lookup (meant for a copying shape, `qwen3-0.6b-copying`, whose drafts are kept). 96 greedy tokens of
one code prompt, after a warm-up request. Prints one JSON object per engine: output tok/s and the step summary
by kind (`decode`: plain decode rows; `mixed`: steps that verified drafts) and rows. Three engines: plain, the
drafter as served, and the drafter the other way about queuing ahead (the drafts' and their verify forward
queued at the end of the step before, `decode_ahead.VerifyAhead`: off as served for a draft model, on for
n-gram; the drafter's `queue_ahead`, which this process can switch because the engine runs in it:
VLLM_ENABLE_V1_MULTIPROCESSING=0 for all three, so they compare like with like).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path


def run(model: Path, spec: dict | None, drafter: type | None = None, ahead: bool = False) -> dict:
    from vllm import LLM, SamplingParams

    if drafter is not None:
        drafter.queue_ahead = ahead
    llm = LLM(model=str(model), max_model_len=1024, max_num_seqs=4, seed=0,
              **({"speculative_config": spec} if spec else {}))
    try:
        params = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)
        prompt = "def fibonacci(n):\n    if n < 2:\n        return n\n" * 3
        llm.generate([prompt], params, use_tqdm=False)  # warm-up
        llm.collective_rpc("step_times", kwargs={"clear": True})
        start = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        elapsed = time.perf_counter() - start
        name = "plain" if spec is None else f"{spec.get('method', 'draft')}{', queued ahead' if ahead else ''}"
        return {"engine": name, "tok_s": round(len(out.outputs[0].token_ids) / elapsed, 1),
                "steps": llm.collective_rpc("step_times")[0], "counts": llm.collective_rpc("step_counts")[0],
                "tokens": list(out.outputs[0].token_ids)}
    finally:
        llm.llm_engine.engine_core.shutdown()


def main() -> None:
    from vmetal.bench.inprocess import prepare_environ
    from vmetal.bench.shapes import SHAPES, build_model, first_layers

    prepare_environ()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: `run` switches its drafter
    from vmetal.engine.runner.draft_model import DraftModelDrafter
    from vmetal.engine.runner.speculative import NgramDrafter
    from vmetal.preflight.features import ngram_config

    shape_name = sys.argv[1] if len(sys.argv) > 1 else "qwen3-0.6b"
    drafts = sys.argv[2] if len(sys.argv) > 2 else "4"
    dtype = "bfloat16" if shape_name.startswith("qwen3-0.6b") else "float32"
    root = Path(tempfile.gettempdir()) / "vmetal-prof-draft"
    model = build_model(root / f"{shape_name}-{dtype}", dtype, SHAPES[shape_name])
    if drafts == "ngram":
        spec, drafter = ngram_config(), NgramDrafter
    else:
        draft = first_layers(model, root / f"{shape_name}-{dtype}-first{drafts}", int(drafts))
        spec, drafter = {"model": str(draft), "num_speculative_tokens": 3}, DraftModelDrafter
    served = drafter.queue_ahead
    plain = None
    for s, ahead in ((None, False), (spec, served), (spec, not served)):
        got = run(model, s, drafter if s else None, ahead)
        tokens = got.pop("tokens")
        plain = plain or tokens
        print(json.dumps({**got, "tokens_as_plain": tokens == plain}), flush=True)
    drafter.queue_ahead = served


if __name__ == "__main__":
    main()
