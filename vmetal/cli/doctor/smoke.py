"""`vmetal doctor --smoke`: a real greedy generation through vLLM's `LLM` in a child, checked against mlx-lm.

The child is `python -m vmetal.cli.doctor.smoke MODEL [TOKENS]` (see the `__main__` guard below).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

from vmetal import envs
from vmetal.cli.doctor.base import Check, _fail, _ok

SMOKE_TIMEOUT_S = 300.0
SMOKE_TOKENS = 32
_SMOKE_MARK = "VMETAL_SMOKE "


def smoke_child(model: str, max_tokens: int) -> int:
    """Runs in the child: a real greedy generation through vLLM's `LLM`, compared with mlx-lm's own."""
    import logging

    out: dict[str, Any] = {"model": model}
    try:
        t0 = time.perf_counter()
        from vllm import LLM, SamplingParams

        # vLLM's defaults otherwise, as `vmetal serve` users get them.
        llm = LLM(model=model, max_model_len=256, seed=0)
        out["load_s"] = round(time.perf_counter() - t0, 2)
        prompt = "Hello world, she reads a red book"
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)  # warm-up
        t1 = time.perf_counter()
        (result,) = llm.generate([prompt], params, use_tqdm=False)
        took = time.perf_counter() - t1
        tokens = list(result.outputs[0].token_ids)
        out.update(tokens=len(tokens), tokens_per_s=round(len(tokens) / took, 1) if took > 0 else None,
                   text=result.outputs[0].text)
        llm.llm_engine.engine_core.shutdown()

        from mlx_lm import load
        from mlx_lm.generate import stream_generate

        logging.getLogger().setLevel(logging.WARNING)
        mlx_model, tokenizer = load(model)
        reference = [int(r.token) for r in stream_generate(mlx_model, tokenizer, prompt=result.prompt_token_ids,
                                                            max_tokens=max_tokens)][:max_tokens]
        n = min(len(reference), len(tokens))
        out["matches_mlx_lm"] = n > 0 and reference[:n] == tokens[:n]
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as data
        out["error"] = f"{type(exc).__name__}: {exc}"
    print(_SMOKE_MARK + json.dumps(out), flush=True)
    return 0 if "error" not in out else 1


def check_smoke(environ: Mapping[str, str], timeout: float = SMOKE_TIMEOUT_S) -> Check:
    from vmetal.demo import ensure_demo_model
    from vmetal.server.process import server_environ

    title = "Smoke test"
    started = time.monotonic()
    try:
        cfg = envs.load_config(environ)
        envs.check_available(cfg)
    except envs.EnvError as exc:
        return _fail("smoke", title, f"not run: the environment is invalid ({exc})",
                     "fix the `Environment` check first", model=None, error=str(exc))
    try:
        model = str(ensure_demo_model())
    except Exception as exc:  # noqa: BLE001
        return _fail("smoke", title, f"could not build the demo model: {type(exc).__name__}: {exc}",
                     "check that MLX works (`MLX devices` check) and VMETAL_HOME is writable", model=None,
                     error=str(exc))
    env = server_environ(cfg, environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = [sys.executable, "-P", "-m", "vmetal.cli.doctor.smoke", model, str(SMOKE_TOKENS)]
    # Its own session, so that on a timeout the engine process vLLM spawned goes too.
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        import signal

        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return _fail("smoke", title, f"no result within {timeout:g} s", "run again; if it persists, run "
                     "`vmetal serve --demo` to see vLLM's output", model=model, error="timeout")
    result: dict[str, Any] = {}
    for line in reversed(out.splitlines()):
        if line.startswith(_SMOKE_MARK):
            result = json.loads(line[len(_SMOKE_MARK):])
            break
    else:
        tail = " | ".join((err or out).strip().splitlines()[-6:])
        result = {"model": model, "error": f"the smoke child exited with code {proc.returncode}: {tail}"}
    details = {k: result.get(k) for k in ("model", "tokens", "tokens_per_s", "load_s", "matches_mlx_lm", "error")}
    if result.get("error"):
        return _fail("smoke", title, f"generation failed: {result['error']}", "run `vmetal serve --demo` to see "
                     f"vLLM's full output (with {envs.DEBUG}=1)", **details)
    if not result.get("matches_mlx_lm"):
        return _fail("smoke", title, "vLLM's greedy tokens differ from mlx-lm's on the same model",
                     "this is a bug in vmetal; please report it with the block below", **details)
    return _ok("smoke", title, f"{result['tokens']} greedy tokens at {result['tokens_per_s']} tokens/s through "
               f"vLLM's `LLM` (engine ready in {result['load_s']} s), equal to mlx-lm's", **details)


if __name__ == "__main__":
    if len(sys.argv) >= 2:
        sys.exit(smoke_child(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else SMOKE_TOKENS))
    sys.exit("usage: python -m vmetal.cli.doctor.smoke MODEL [TOKENS]  (use `vmetal doctor --smoke`)")
