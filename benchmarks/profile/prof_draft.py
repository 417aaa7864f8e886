"""Where a draft-model speculation step's time goes, beside a plain decode step: vLLM's `LLM` on one stream,
with and without a draft, and the runner's own step timer (`MetalWorker.step_times`: graph build, launch,
wait, vLLM's share) for each.

    python benchmarks/profile/prof_draft.py [SHAPE] [DRAFT_LAYERS]

SHAPE is a `vmetal.bench.shapes` name (default qwen3-0.6b, bfloat16; `deep-tiny` on the CPU host), the draft
its first DRAFT_LAYERS layers (default 4), 96 greedy tokens of one code prompt, after a warm-up request. Prints
one JSON object per engine: output tok/s and the step summary by kind (`decode`: plain decode rows;
`mixed`: steps that verified drafts) and rows. Three engines: plain, with the draft, and with the draft but
nothing queued ahead (no draft or verify forward queued before vLLM's per-step work, as before the runner's
verify-ahead; `decode_ahead_enabled` off, which this process can switch because the engine runs in it:
VLLM_ENABLE_V1_MULTIPROCESSING=0 for all three, so they compare like with like).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path


def run(model: Path, draft: Path | None, ahead: bool = True) -> dict:
    from vllm import LLM, SamplingParams

    from vmetal.engine.runner.mlx_runner import MlxModelRunner

    MlxModelRunner.decode_ahead_enabled = ahead

    spec = {"speculative_config": {"model": str(draft), "num_speculative_tokens": 3}} if draft else {}
    llm = LLM(model=str(model), max_model_len=1024, max_num_seqs=4, seed=0, **spec)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)
        prompt = "def fibonacci(n):\n    if n < 2:\n        return n\n" * 3
        llm.generate([prompt], params, use_tqdm=False)  # warm-up
        llm.collective_rpc("step_times", kwargs={"clear": True})
        start = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        elapsed = time.perf_counter() - start
        name = ("draft" if ahead else "draft, nothing ahead") if draft else "plain"
        return {"engine": name, "tok_s": round(len(out.outputs[0].token_ids) / elapsed, 1),
                "steps": llm.collective_rpc("step_times")[0], "counts": llm.collective_rpc("step_counts")[0],
                "tokens": list(out.outputs[0].token_ids)}
    finally:
        llm.llm_engine.engine_core.shutdown()


def main() -> None:
    from vmetal.bench.inprocess import prepare_environ
    from vmetal.bench.shapes import SHAPES, build_model, first_layers

    prepare_environ()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: `run` switches its runner
    shape_name = sys.argv[1] if len(sys.argv) > 1 else "qwen3-0.6b"
    layers = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    dtype = "bfloat16" if shape_name == "qwen3-0.6b" else "float32"
    root = Path(tempfile.gettempdir()) / "vmetal-prof-draft"
    model = build_model(root / f"{shape_name}-{dtype}", dtype, SHAPES[shape_name])
    draft = first_layers(model, root / f"{shape_name}-{dtype}-first{layers}", layers)
    plain = None
    for d, ahead in ((None, True), (draft, True), (draft, False)):
        got = run(model, d, ahead)
        tokens = got.pop("tokens")
        plain = plain or tokens
        print(json.dumps({**got, "tokens_as_plain": tokens == plain}), flush=True)


if __name__ == "__main__":
    main()
