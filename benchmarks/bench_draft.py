"""Draft-model speculation, one stream: vmetal's engine beside `mlx_lm.generate --draft-model` on the same pair.

The target is a random-weight Qwen3-shaped model (`vmetal.bench.shapes`, `--shape`); the draft is the same
checkpoint cut to its first `--draft-layers` layers (`shapes.first_layers`). Random weights agree with their cut
rarely (about 1% of drafts kept on Qwen3-0.6B's shape), so that pair measures what speculating costs. A copying
shape (`copy-deep-tiny` here, `qwen3-0.6b-copying` on a GPU: `vmetal.bench.copying`) does all its work in its first
layers and adds nothing after them, so its cut to those computes what the target does: nearly every draft is kept,
the agreeing pair that no hub here can give (a trained pair keeps fewer; its figure lies between). Per trial, one
request at a time, greedy: vmetal's `LLM` without and with `speculative_config={"model": DRAFT,
"num_speculative_tokens": k}`, and mlx-lm's `stream_generate` without and with `draft_model=DRAFT,
num_draft_tokens=k` (what `mlx_lm.generate --draft-model` runs), each started (or loaded) and warmed once for all
trials. The anchor is mlx-lm with the draft, measured in the same trial: the issue's target is vmetal ≥ 1.1x it on a
GPU. Every output is compared token for token with plain mlx-lm's.

`--paged` runs both vmetal engines on the paged KV path (`VLLM_METAL_USE_PAGED_ATTENTION=1`), where the target
verifies the drafts as query rows of its packed forward.

Results go to benchmarks/RESULTS.md between `<!-- draft:begin -->` and `<!-- draft:end -->` (with `--paged`,
`draft-paged`; a copying shape's to a section of its own, `draft-copy-deep-tiny`).

    python benchmarks/bench_draft.py                  # ~4 min on 2 cores
    python benchmarks/bench_draft.py --paged
    python benchmarks/bench_draft.py --shape copy-deep-tiny --draft-layers 4   # an agreeing pair
    python benchmarks/bench_draft.py --shape qwen3-0.6b --dtype bfloat16 --draft-layers 4 --no-write --json d.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_speculative import CODE, Engine, measure_trials
from results_md import add_output_args, publish_run, run_header

from vmetal.bench.inprocess import prepare_environ
from vmetal.bench.shapes import SHAPES, build_model, first_layers, section_name


class MlxLm:
    """mlx-lm's own loop on `model_dir`, with or without the draft, one prompt at a time, greedy (its default
    sampler): loaded and warmed once for every trial, as `Engine` is."""

    def __init__(self, model_dir: Path, draft_dir: Path | None, prompts: list[str], output_len: int, k: int):
        from mlx_lm import load

        self.model, self.tokenizer = load(str(model_dir))
        self.extra = {} if draft_dir is None else {"draft_model": load(str(draft_dir))[0], "num_draft_tokens": k}
        self.prompts, self.output_len = prompts, output_len
        self._generate(prompts[0])  # warm, as `Engine` is

    def _generate(self, prompt: str) -> list:
        from mlx_lm.generate import stream_generate

        return list(stream_generate(self.model, self.tokenizer, prompt, max_tokens=self.output_len, **self.extra))

    def measure(self) -> dict:
        tokens, elapsed, drafted = [], 0.0, 0
        for prompt in self.prompts:
            t0 = time.perf_counter()
            out = self._generate(prompt)
            elapsed += time.perf_counter() - t0
            tokens.append([int(r.token) for r in out])
            drafted += sum(bool(getattr(r, "from_draft", False)) for r in out)
        return {"tok_s": sum(map(len, tokens)) / elapsed, "tokens": tokens, "from_draft": drafted}

    def close(self) -> None:
        import mlx.core as mx

        self.model = self.extra = None
        mx.clear_cache()


def render(rows: list[dict], args: argparse.Namespace, shape: dict, started: str, elapsed: float, argv) -> str:
    def med(name: str) -> float:
        return statistics.median(r[name]["tok_s"] for r in rows)

    def ratio(a: str, b: str) -> float:
        return statistics.median(r[a]["tok_s"] / r[b]["tok_s"] for r in rows)

    drafted = sum(r["vmetal draft"]["spec_draft_tokens"] for r in rows)
    accepted = sum(r["vmetal draft"]["spec_accepted_tokens"] for r in rows)
    same = all(r[name]["tokens"] == r["mlx-lm"]["tokens"] for r in rows for name in r)
    names = ("vmetal", "vmetal draft", "mlx-lm", "mlx-lm draft")
    copies = shape.get("copying")
    if copies is None:
        pair = ("A draft of random weights agrees with its target far less than a trained small sibling does, so "
                "speculation gains little or loses here whatever the engine")
    elif args.draft_layers > copies:
        pair = (f"The target's copying lives in its first {copies + 1} layers (`vmetal.bench.copying`), so the cut "
                "computes what the target does and keeps nearly every draft, more than a trained small sibling "
                "would (speculation at its best)")
    else:
        pair = (f"The cut drops layers the target's copying needs (its first {copies + 1}), so its drafts "
                "agree with the target's tokens only by chance")
    lines = [
        *run_header("Draft-model speculation, one stream" + (", paged KV path" if args.paged else ""),
                    "bench_draft.py", argv, started, elapsed, args.shape, shape, args.dtype),
        f"**Draft:** the same checkpoint cut to its first {args.draft_layers} of {shape['num_layers']} layers "
        f"(`shapes.first_layers`), {args.tokens} tokens drafted a step.", "",
        f"**Workload:** vmetal's `LLM` on the {'paged' if args.paged else 'MLX-managed'} KV path; {args.prompts} "
        f"prompts (a small Python file repeated 3 times, each with its own first line) one at a time, "
        f"{args.output_len} greedy tokens each; {args.trials} trials; ratios are medians of the per-trial ratios.",
        "",
        "| Engine | output tok/s (median) | vs itself without the draft | vs mlx-lm with the draft |",
        "|---|---:|---:|---:|",
    ]
    for name in names:
        plain = name.removesuffix(" draft")
        lines.append(f"| {name} | {med(name):.1f} | {ratio(name, plain) if name != plain else 1.0:.2f} | "
                     f"**{ratio(name, 'mlx-lm draft'):.2f}** |")
    mlx_kept = sum(r["mlx-lm draft"]["from_draft"] for r in rows)
    lines += ["", f"vmetal's drafts checked: {drafted}, accepted: {accepted} ({accepted / max(drafted, 1):.0%}); "
              f"tokens mlx-lm took from its draft: {mlx_kept}; greedy tokens identical to plain mlx-lm's for every "
              f"engine in every trial: {'yes' if same else 'NO'}.", "",
              f"What it says: at the same acceptance (the same greedy drafts) vmetal keeps "
              f"{ratio('vmetal draft', 'vmetal'):.2f} of its own plain speed with the draft and mlx-lm "
              f"{ratio('mlx-lm draft', 'mlx-lm'):.2f} of its own; with the draft vmetal runs at "
              f"{ratio('vmetal draft', 'mlx-lm draft'):.2f} of mlx-lm, the plain engines at "
              f"{ratio('vmetal', 'mlx-lm'):.2f}. {pair}: the figure that carries over is vmetal with the draft "
              f"against mlx-lm with the same draft (a {args.draft_layers}-of-{shape['num_layers']}-layer cut of "
              f"the target).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--draft-layers", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=3, help="tokens drafted a step (mlx-lm's default)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=96)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--paged", action="store_true", help="vmetal's engines on the paged KV path")
    add_output_args(parser)
    args = parser.parse_args(argv)
    prepare_environ(paged=args.paged)  # the plugin on (off by default on hosts other than Apple silicon)
    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.monotonic()
    shape = SHAPES[args.shape]
    folder = Path(tempfile.mkdtemp(prefix="vmetal-bench-draft-"))
    model = build_model(folder / "model", args.dtype, shape)
    draft = first_layers(model, folder / "draft", args.draft_layers)
    spec = {"model": str(draft), "num_speculative_tokens": args.tokens}
    prompts = [f"# file {i}\n{CODE}" for i in range(args.prompts)]
    rows = measure_trials({"vmetal": lambda: Engine(model, None, prompts, args.output_len),
                           "vmetal draft": lambda: Engine(model, spec, prompts, args.output_len),
                           "mlx-lm": lambda: MlxLm(model, None, prompts, args.output_len, args.tokens),
                           "mlx-lm draft": lambda: MlxLm(model, draft, prompts, args.output_len, args.tokens)},
                          args.trials)
    section = render(rows, args, shape, started, time.monotonic() - t0, argv)
    publish_run(section_name("draft-paged" if args.paged else "draft", args.shape), section, {"rows": rows}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
