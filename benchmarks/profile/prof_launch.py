"""Does a launch thread shorten a one-row decode step? mlx-lm's own generate loop against the same loop whose
`mx.async_eval` runs on a second thread while the first builds the next step's graph.

    python benchmarks/profile/prof_launch.py [--shape qwen3-0.6b] [--tokens 128] [--host-ms 0.3,0.8]

On a GPU a decode step of a small model is host work: the graph's build and MLX's launch (encoding every kernel)
run one after the other on the Python thread. MLX releases the GIL in `async_eval`, and a stream made with
`mx.new_thread_unsafe_stream` may be evaluated from another thread, so the launch of step N can overlap the
build of step N+1 (and an engine's own host work). Variants, each the same model and prompt, greedy:

- `serial`: `mlx_lm.generate`'s loop (build N+1, launch it, read N's token);
- `threaded`: the same through the runner's launch thread (`vmetal.engine.runner.launches.Launches`): N+1 is
  built while the thread encodes N and queued to it, then the host reads N's token.

`--host-ms` adds that much Python busy work a step to both (what vLLM's scheduling and a runner add). Prints
tok/s per variant and whether the tokens of every variant are the same.
"""

from __future__ import annotations

import argparse
import statistics
import time

from model_args import add_model_args, model_dir


def _busy(ms: float) -> None:
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def run(model, prompt, tokens: int, host_ms: float, launches):
    """tok/s and the greedy tokens of one generation, launched by `launches` (vmetal's own, threaded or not). The
    graphs are built on its stream; each step's token is read from an argmax of its own, which the next step does
    not take as an input (the next step is fed a cast of it), as the runner's `DecodeAhead` does."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    with launches.stream_context():
        cache = make_prompt_cache(model)

    def step(y):
        with launches.stream_context():
            token = mx.argmax(model(y[None], cache=cache)[:, -1, :], axis=-1)
            return token.astype(mx.int32), token

    feed, token = step(prompt)
    mx.eval(feed, token)
    out = []
    t0 = time.perf_counter()
    launched = launches.launch(feed, token)
    for _ in range(tokens):
        nxt = step(feed)  # with a launch thread: built while the thread launches the step before
        next_launched = launches.launch(*nxt)
        launches.settle(upto=launched)
        out.append(token.item())
        _busy(host_ms)
        (feed, token), launched = nxt, next_launched
    launches.settle()
    mx.eval(feed, token)
    return tokens / (time.perf_counter() - t0), out


def main() -> None:
    import mlx.core as mx
    from mlx_lm import load

    from vmetal.engine.runner.launches import Launches

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, "qwen3-0.6b")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--host-ms", default="0,0.3,0.8")
    args = ap.parse_args()
    model, _ = load(str(model_dir(args, "prof-launch-")))
    launches = {"serial": Launches(threaded=False), "threaded": Launches(threaded=True)}
    prompt = mx.array([1, 2, 3, 4, 5, 6, 7, 8], dtype=mx.int32)
    reference = None
    for host_ms in (float(h) for h in args.host_ms.split(",")):
        rates = {"serial": [], "threaded": []}
        for _ in range(args.trials):
            for variant in rates:
                rate, toks = run(model, prompt, args.tokens, host_ms, launches[variant])
                reference = reference or toks
                rates[variant].append(rate)
                if toks != reference:
                    print(f"TOKENS DIFFER: {variant} host_ms={host_ms}", flush=True)
        s, t = (statistics.median(rates[v]) for v in ("serial", "threaded"))
        ratios = [b / a for a, b in zip(rates["serial"], rates["threaded"])]
        print(f"host_ms={host_ms}: serial {s:.1f} tok/s, threaded {t:.1f} tok/s, ratio {t / s:.2f} "
              f"(per trial {', '.join(f'{r:.2f}' for r in ratios)})", flush=True)
    launches["threaded"].close()


if __name__ == "__main__":
    main()
