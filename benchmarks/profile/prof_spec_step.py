"""What each launch of a speculating step costs the host, outside vLLM: one stream, the draft's forwards and
the target's verify forward built and launched (`mx.async_eval`) one by one as `draft_model.py` and the MLX
runner build them, each phase timed, beside a plain one-token step of the same target.

    python benchmarks/profile/prof_spec_step.py [--shape qwen3-0.6b] [--draft-layers 4] [--tokens 3] [--steps 64]
        [--loaders vmetal,vmetal-kernels-off,vmetal-unpacked,mlx-lm] [--widths 1,2,3,4,8]

On an H100 and an H200 a speculating step of Qwen3-0.6B's shape with a 4-layer draft kept the engine's thread
waiting about 8 ms for the launch thread where a plain step's launch takes about 2, on the H200 with 2 drafts as
with 3 and with cuDNN's attention off as on (`prof_draft.py`, RESULTS-gpu.md): this tells which launch holds it,
and whether the loader does (vmetal's `models.load`, with and without its kernels, against `mlx_lm.load`). Every
draft is rejected (the target's own token is kept and the caches trimmed back), so each step feeds one new token
to both models, as with a random-weight draft. Prints one line per loader: per phase the median ms over the steps;
then the target's forward alone at each of `--widths` token counts (build, launch, wait).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from model_args import add_model_args, model_dir


def _timed(fn):
    began = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - began) * 1e3


def run(target, draft, tokens: int, steps: int) -> dict[str, float]:
    import mlx.core as mx

    from vmetal.engine.runner.kv import mlx_cache

    tcache, dcache = mlx_cache.new_request_cache(target.model), mlx_cache.new_request_cache(draft.model)
    prompt = list(range(1, 17))
    last = int(mx.argmax(mlx_cache.prefill(target.model, tcache, prompt)).item())
    mlx_cache.prefill(draft.model, dcache, prompt[:-1])
    mx.eval([c.state for c in dcache])
    feed = [prompt[-1], last]  # what the draft has not seen
    phases: dict[str, list[float]] = {}
    for step in range(steps + 4):
        times: dict[str, float] = {}
        out = []
        logits, times["draft build 1"] = _timed(lambda: mlx_cache.prefill(draft.model, dcache, feed))
        out.append(mx.argmax(logits, axis=-1).astype(mx.int32))
        for i in range(tokens - 1):
            _, times[f"draft launch {i + 1}"] = _timed(lambda: mx.async_eval(out[-1]))
            logits, times[f"draft build {i + 2}"] = _timed(
                lambda: mlx_cache.prefill(draft.model, dcache, out[-1][None]))
            out.append(mx.argmax(logits, axis=-1).astype(mx.int32))
        drafts = mx.stack(out)
        _, times[f"draft launch {tokens}"] = _timed(lambda: mx.async_eval(drafts))
        inputs = mx.concatenate([mx.array([last], dtype=mx.int32), drafts])
        verify, times["verify build"] = _timed(
            lambda: mx.argmax(mlx_cache.prefill(target.model, tcache, inputs, last=tokens + 1), axis=-1))
        _, times["verify launch"] = _timed(lambda: mx.async_eval(verify))
        got, times["wait"] = _timed(lambda: verify.tolist())
        for layer in tcache:
            layer.trim(tokens)  # every draft rejected: the cache holds the context through `last`
        for layer in dcache:
            layer.trim(tokens - 1)
        last, feed = got[0], [got[0]]
        # The plain step: the target's token decoded alone (then trimmed, so the two loops stay in step).
        logits, times["plain build"] = _timed(lambda: mlx_cache.prefill(target.model, tcache, [last]))
        token = mx.argmax(logits, axis=-1)
        _, times["plain launch"] = _timed(lambda: mx.async_eval(token))
        _, times["plain wait"] = _timed(lambda: token.item())
        for layer in tcache:
            layer.trim(1)
        if step >= 4:
            for k, v in times.items():
                phases.setdefault(k, []).append(v)
    return {k: round(statistics.median(v), 3) for k, v in phases.items()}


def sweep(target, widths: list[int], steps: int) -> dict[str, float]:
    """One forward of the target over `width` new tokens (a verify's shape), built, launched and waited for
    alone, per width: the median ms of each phase, so a device's cost of a wider forward shows apart from the
    drafts queued before it. Each forward's positions are trimmed off again, so every one sees the same cache."""
    import mlx.core as mx

    from vmetal.engine.runner.kv import mlx_cache

    cache = mlx_cache.new_request_cache(target.model)
    mlx_cache.prefill(target.model, cache, list(range(1, 17)))
    mx.eval([c.state for c in cache])
    out: dict[str, float] = {}
    for width in widths:
        rows: dict[str, list[float]] = {}
        for step in range(steps + 4):
            logits, build = _timed(lambda: mx.argmax(
                mlx_cache.prefill(target.model, cache, list(range(3, 3 + width)), last=width), axis=-1))
            _, launch = _timed(lambda: mx.async_eval(logits))
            _, wait = _timed(lambda: logits.tolist())
            for layer in cache:
                layer.trim(width)
            if step >= 4:
                for k, v in (("build", build), ("launch", launch), ("wait", wait)):
                    rows.setdefault(k, []).append(v)
        for k, v in rows.items():
            out[f"{width} {k}"] = round(statistics.median(v), 3)
    return out


LOADERS = ("vmetal", "vmetal-kernels-off", "vmetal-unpacked", "mlx-lm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, "qwen3-0.6b")
    ap.add_argument("--draft-layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=3)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--loaders", default=",".join(LOADERS),
                    help="which loaders to time, comma-separated")
    ap.add_argument("--widths", default="1,2,3,4,8",
                    help="the target's forward timed alone at each of these token counts (none: '')")
    args = ap.parse_args()

    from vmetal.bench.inprocess import prepare_environ
    from vmetal.bench.shapes import first_layers

    names = args.loaders.split(",")
    unknown = [n for n in names if n not in LOADERS]
    if unknown:
        ap.error(f"unknown loader(s) {', '.join(unknown)}; choose from {', '.join(LOADERS)}")
    widths = [w for w in args.widths.split(",") if w]
    if not all(w.isdigit() and int(w) > 0 for w in widths):
        ap.error(f"--widths {args.widths!r} is not a list of positive token counts (e.g. 1,2,4)")
    widths = [int(w) for w in widths]
    prepare_environ()
    checkpoint = model_dir(args, "prof-spec-")
    draft_dir = first_layers(checkpoint, Path(str(checkpoint) + f"-first{args.draft_layers}"), args.draft_layers)

    from mlx_lm import load as mlx_lm_load

    from vmetal.engine import models

    class _Plain:  # mlx-lm's model as the loader hands it, in LoadedModel's shape
        def __init__(self, path):
            self.model = mlx_lm_load(str(path))[0]

    loaders = {"vmetal": lambda p: models.load(str(p)),
               "vmetal-kernels-off": lambda p: models.load(str(p), kernels=False),
               "vmetal-unpacked": lambda p: models.load(str(p), packed=False),
               "mlx-lm": _Plain}
    for name in names:
        load = loaders[name]
        target, draft = load(checkpoint), load(draft_dir)
        print(f"{name}: {run(target, draft, args.tokens, args.steps)}", flush=True)
        if widths:
            print(f"{name}, target alone: {sweep(target, widths, args.steps)}", flush=True)


if __name__ == "__main__":
    main()
