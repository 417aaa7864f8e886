"""Serving through the OpenAI API: vmetal paged vs vmetal MLX-managed vs `mlx_lm.server`, one run.

Each backend serves the same random-weight Qwen3-shaped model (bench_engine.py's SHAPES, picked with
`--shape`) from the same folder, each on its own port:

- `paged`:    vmetal, `VLLM_METAL_USE_PAGED_ATTENTION=1` (vLLM's block tables drive one packed forward)
- `mlx`:      vmetal, the MLX-managed KV cache (the default path)
- `mlx_lm`:   `python -m mlx_lm.server`, mlx-lm's own continuous-batching server (BatchGenerator),
              `--decode-concurrency` set to the highest concurrency measured
- `vllm_cpu`: (opt-in) vLLM's own CPU backend, the same `vllm serve` with the vmetal plugin off

The two vmetal servers are `vllm serve` started through `vmetal.server.process.ServerProcess` with
`--max-num-seqs 32 --max-model-len 1024` and the same explicit KV capacity (`--kv-cache-memory-bytes`,
32 full-length sequences), so neither path gets more room than the other.

The load is vLLM's own: `vllm.benchmarks.serve.benchmark()` (what `vllm bench serve` runs) with
`--max-concurrency C`, every request sent at once (request rate inf), prompts from vLLM's
`RandomDataset` of `--input-len` tokens (its decode/re-encode step leaves a few a token or two
longer; the same prompts go to every backend), `max_tokens=--output-len`, `ignore_eos`, greedy,
streamed over `/v1/completions`. Its metrics are used as they are: output tok/s = output tokens /
wall time of the run, TTFT/TPOT/ITL/E2EL mean, median, p90, p99.

Two substitutions, both small, both needed for a fair comparison:

1. The request function. vLLM's `openai` request function strips every network chunk before SSE
   parsing; `mlx_lm.server` sends an SSE comment (`: keepalive N/M`) before each stream's first token,
   and once stripped it glues onto the next `data:` event, which is then dropped: half the requests
   fail ("Never received a valid chunk") and the rest lose their first token (so TTFT reads as the
   whole request). Same bug as vllm-project/vllm PRs #27412 and #51172 (open). `_openai_completions`
   below is vLLM's function with the strip removed (the PR's fix), registered into vLLM's
   `ASYNC_REQUEST_FUNCS`, and used for every backend so all are measured by the same client.
2. The prompts. `RandomDataset` builds each prompt as a run of consecutive token ids from a random
   offset; with this model's ~500-token vocabulary a run of 64 prompts holds a few pairs that start
   at the same offset and are identical, which vLLM's prefix caching (on for paged) and mlx-lm's
   prompt cache would serve from cache while the MLX-managed path recomputes. `_IIDRandomDataset` keeps everything else of
   RandomDataset but draws the tokens i.i.d., so no two prompts share a prefix.

All servers are started at once and warmed up (one full-length request, then one wave of short ones at
the highest concurrency); then the timed runs are interleaved, every backend in turn for each
concurrency (the order rotates between trials), so drift in a shared machine's load hits all alike;
an idle server uses no CPU to speak of. Prompts differ between runs (a seed per concurrency and trial)
and are the same for every backend. Other processes' CPU use during each run is recorded
(bench_engine's CpuWatch); runs where they used more than `--max-foreign` cores are marked CONTENDED.

Results go to benchmarks/RESULTS.md between `<!-- serving:begin -->` and `<!-- serving:end -->`;
the rest of the file is left as it is.

    python benchmarks/bench_serving.py                                     # ~10 min on a quiet 2-core box
    python benchmarks/bench_serving.py --backends paged,mlx,mlx_lm,vllm_cpu # + vLLM's CPU backend, ~11 min
    python benchmarks/bench_serving.py --quick                             # ~3 min
    python benchmarks/bench_serving.py --shape qwen3-0.6b --dtype bfloat16 --trials 3 --output-len 128 \
        --no-write --json serving.json                                     # the GPU row, ~4 min there
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "RESULTS.md"

sys.path.insert(0, str(HERE))
# The engine benchmark's model shape, model builder, machine/version info and contention watch.
from bench_engine import _CLK, SHAPES, CpuWatch, _proc_tree_jiffies, build_model, machine_info, versions  # noqa: E402
from results_md import publish  # noqa: E402

ALL_BACKENDS = ("paged", "mlx", "mlx_lm", "vllm_cpu")
DEFAULT_BACKENDS = ("paged", "mlx", "mlx_lm")
LABELS = {"paged": "vmetal paged", "mlx": "vmetal MLX-managed", "mlx_lm": "mlx_lm.server",
          "vllm_cpu": "vLLM CPU backend"}
# Targets from the issue, at 32 concurrent requests.
TARGET_C = 32
TARGET_VS_MLX = 3.75     # paged output tok/s / MLX-managed output tok/s
TARGET_VS_MLX_LM = 1.5   # paged output tok/s / mlx_lm.server output tok/s
TARGET_TTFT = 10.0       # MLX-managed TTFT p50 / paged TTFT p50
MAX_NUM_SEQS = 32
MAX_MODEL_LEN = 1024
SERVED_NAME = "bench"
PERCENTILES = [50.0, 90.0, 99.0]

# For the duration estimate. MLX's CPU matmul is single-threaded and compute-bound here (~3.3 GFLOPS
# at M=1 and M=128 alike), so an MLX server's cost is close to proportional to prompt + output tokens
# processed: this model is ~26 MFLOP a token, i.e. ~100 tokens/s on one core of a quiet box (~65-70
# measured under other sessions' load). vLLM's CPU backend (oneDNN, all cores) is far faster.
EST_TOKENS_PER_S = {"paged": 100.0, "mlx": 100.0, "mlx_lm": 120.0, "vllm_cpu": 1000.0}
EST_START_S = 60.0  # all servers starting together, ready and warmed up (the vLLM CPU one is slowest)


# --------------------------------------------------------------------------- vLLM's load generator
def _openai_completions_factory():
    """vLLM's `async_request_openai_completions`, without the per-chunk `.strip()` (see the docstring)."""
    import aiohttp  # noqa: F401 - the session type
    from vllm.benchmarks.lib import endpoint_request_func as erf

    async def _openai_completions(request_func_input, session, pbar=None):
        api_url = request_func_input.api_url
        erf._validate_api_url(api_url, "OpenAI Completions API", "completions")
        payload = {
            "model": request_func_input.model_name or request_func_input.model,
            "prompt": request_func_input.prompt,
            "max_tokens": request_func_input.output_len,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        erf._update_payload_common(payload, request_func_input)
        headers = erf._get_headers()
        erf._update_headers_common(headers, request_func_input)

        output = erf.RequestFuncOutput()
        output.prompt_len = request_func_input.prompt_len
        generated_text = ""
        st = time.perf_counter()
        output.start_time = st
        most_recent_timestamp = st
        try:
            async with session.post(url=api_url, json=payload, headers=headers) as response:
                if response.status == 200:
                    first_chunk_received = False
                    handler = erf.StreamedResponseHandler()
                    async for chunk_bytes in response.content.iter_any():
                        for message in handler.add_chunk(chunk_bytes):
                            if message.startswith(":"):  # SSE comment (mlx_lm.server keep-alive)
                                continue
                            chunk = message.removeprefix("data:").strip()
                            if chunk == "[DONE]":
                                continue
                            data = json.loads(chunk)
                            if choices := data.get("choices"):
                                text = choices[0].get("text")
                                timestamp = time.perf_counter()
                                if not first_chunk_received:
                                    first_chunk_received = True
                                    output.ttft = timestamp - st
                                else:
                                    output.itl.append(timestamp - most_recent_timestamp)
                                most_recent_timestamp = timestamp
                                generated_text += text or ""
                            elif usage := data.get("usage"):
                                output.output_tokens = usage.get("completion_tokens")
                                if (pt := usage.get("prompt_tokens")) is not None:
                                    output.prompt_len = pt
                    output.success = first_chunk_received
                    if not first_chunk_received:
                        output.error = "Never received a valid chunk to calculate TTFT."
                    output.generated_text = generated_text
                    output.latency = most_recent_timestamp - st
                else:
                    output.error = f"HTTP {response.status}: {(await response.text())[:300]}"
        except Exception as exc:  # noqa: BLE001 - recorded per request, as vLLM does
            output.success = False
            output.error = f"{type(exc).__name__}: {exc}"
        if pbar:
            pbar.update(1)
        return output

    return _openai_completions


ENDPOINT = "openai-sse"


def _make_dataset_cls():
    import numpy as np
    from vllm.benchmarks.datasets.datasets import RandomDataset, gen_prompt_decode_to_target_len

    class _IIDRandomDataset(RandomDataset):
        """RandomDataset with i.i.d. prompt tokens (no shared prefixes at a small vocabulary)."""

        def generate_token_sequence(self, *, tokenizer, prefix_token_ids, prefix_len, vocab_size,
                                    input_len, offset, index, allowed_tokens):
            inner = allowed_tokens[self._rng.integers(0, len(allowed_tokens), size=input_len)]
            prompt, adjusted, mismatch = gen_prompt_decode_to_target_len(
                tokenizer=tokenizer, token_sequence=prefix_token_ids + np.asarray(inner).tolist(),
                target_token_len=prefix_len + int(input_len), add_special_tokens=False, rng=self._rng)
            return prompt, len(adjusted), mismatch

    return _IIDRandomDataset


def sample_requests(tokenizer, n: int, input_len: int, output_len: int, seed: int):
    cls = _make_dataset_cls()
    return cls(random_seed=seed).sample(tokenizer=tokenizer, num_requests=n, input_len=input_len,
                                        output_len=output_len, range_ratio=0.0,
                                        request_id_prefix=f"s{seed}-")


def run_load(*, base_url: str, model_id: str, tokenizer, requests, concurrency: int,
             extra_body: dict, log_file) -> dict:
    """One `vllm bench serve`-style run: all requests queued at once, at most `concurrency` in flight."""
    from vllm.benchmarks.serve import TaskType, benchmark

    coro = benchmark(
        task_type=TaskType.GENERATION, endpoint_type=ENDPOINT,
        api_url=base_url + "/v1/completions", base_url=base_url,
        model_id=model_id, model_name=None, tokenizer=tokenizer, input_requests=requests,
        logprobs=None, request_rate=float("inf"), burstiness=1.0, disable_tqdm=True,
        num_warmups=0, profile=False,
        selected_percentile_metrics=["ttft", "tpot", "itl", "e2el"],
        selected_percentiles=PERCENTILES, ignore_eos=True, goodput_config_dict={},
        max_concurrency=concurrency, lora_modules=None, extra_headers=None, extra_body=extra_body,
        # No ready-check request: it would send requests[0] once more, ahead of the timed run, and
        # prime prefix caches for it. The server is already up and warmed.
        ready_check_timeout_sec=0,
    )
    with contextlib.redirect_stdout(log_file):
        return asyncio.run(coro)


KEEP = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
        "request_throughput", "output_throughput", "total_token_throughput",
        "max_output_tokens_per_s", "max_concurrent_requests",
        "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
        "mean_tpot_ms", "median_tpot_ms", "p90_tpot_ms", "p99_tpot_ms",
        "mean_itl_ms", "median_itl_ms", "p90_itl_ms", "p99_itl_ms",
        "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms")


# --------------------------------------------------------------------------- servers
def _clean_environ(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VLLM_METAL_", "VLLM_MLX_", "VMETAL_"))}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def kv_bytes(model_dir: Path) -> int:
    """KV bytes for MAX_NUM_SEQS sequences of MAX_MODEL_LEN tokens of this model."""
    c = json.loads((model_dir / "config.json").read_text())
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[c["torch_dtype"]]
    per_token = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * itemsize
    return MAX_NUM_SEQS * MAX_MODEL_LEN * per_token


def make_server(backend: str, model_dir: Path, port: int, max_c: int, log_path: Path,
                extra_vllm_args: tuple[str, ...] = ()):
    """A `ServerProcess` for `backend` (for mlx_lm its argv and environment are replaced). `extra_vllm_args`
    go to every vLLM server (vmetal's two and vllm_cpu)."""
    from vmetal import envs
    from vmetal.server.process import ServerProcess

    vllm_args = ["--max-num-seqs", str(MAX_NUM_SEQS), "--max-model-len", str(MAX_MODEL_LEN),
                 "--seed", "0", *extra_vllm_args]
    if backend in ("paged", "mlx"):
        env = _clean_environ()
        overrides = {"VLLM_METAL_USE_PAGED_ATTENTION": "1"} if backend == "paged" else {}
        cfg = envs.load_config(env, overrides)
        return ServerProcess(str(model_dir), port=port, served_model_name=SERVED_NAME, config=cfg,
                             vllm_args=vllm_args + ["--kv-cache-memory-bytes", str(kv_bytes(model_dir))],
                             environ=env, echo=False, log_path=log_path)
    if backend == "vllm_cpu":
        # The same `vllm serve`, plugin off: vLLM picks its own CPU platform. Its CPU platform would
        # downcast a float32 checkpoint to bfloat16; vmetal computes in the checkpoint's dtype (MLX),
        # so the dtype is pinned to the checkpoint's for the same arithmetic.
        dtype = json.loads((model_dir / "config.json").read_text())["torch_dtype"]
        sp = ServerProcess(str(model_dir), port=port, served_model_name=SERVED_NAME,
                           config=envs.load_config(_clean_environ()),
                           vllm_args=vllm_args + ["--dtype", dtype],
                           environ=_clean_environ(), echo=False, log_path=log_path)
        sp.environ["VMETAL_ENABLE"] = "0"
        sp.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        return sp
    if backend == "mlx_lm":
        # ServerProcess only for its process-group handling, /health polling and logging.
        sp = ServerProcess(str(model_dir), port=port, echo=False, log_path=log_path)
        sp.argv = [sys.executable, "-m", "mlx_lm.server", "--model", str(model_dir),
                   "--host", "127.0.0.1", "--port", str(port),
                   "--decode-concurrency", str(max(max_c, 1)), "--prompt-concurrency", "8",
                   "--temp", "0.0", "--log-level", "WARNING"]
        sp.environ = _clean_environ(PYTHONUNBUFFERED="1")
        return sp
    raise ValueError(backend)


def extra_body_for(backend: str) -> dict:
    if backend == "mlx_lm":
        # mlx_lm.server validates `logprobs` as a bool (vLLM's client sends null) and treats any
        # repetition_penalty other than 0 as "on"; greedy like the others.
        return {"temperature": 0.0, "logprobs": False, "repetition_penalty": 0.0}
    return {"temperature": 0.0}


def shown_argv(argv: list[str], model_dir: Path) -> str:
    out = []
    for a in argv:
        if a == sys.executable:
            a = "python"
        out.append("MODEL" if a == str(model_dir) else a)
    return shlex.join(out)


# --------------------------------------------------------------------------- report
def _summ(vals: list[float]) -> float:
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else float("nan")


def summarize(runs: list[dict]) -> dict:
    """Median over trials of each kept metric (one trial: the values themselves)."""
    out = {k: _summ([r[k] for r in runs if k in r]) for k in KEEP}
    out["trials"] = len(runs)
    out["foreign_cores_max"] = max(r["foreign_cores"] for r in runs)
    out["own_cores"] = _summ([r.get("own_cores", float("nan")) for r in runs])
    out["input_lens"] = sorted({n for r in runs for n in r["input_lens"]})
    out["complete"] = all(r["complete"] for r in runs)
    out["failed_total"] = sum(r["failed"] for r in runs)
    return out


def ratios(report: dict) -> dict:
    s = {b: d.get("summary", {}) for b, d in report["backends"].items()}
    out = {}
    for c in report["args"]["concurrency"]:
        row = {}
        p = s.get("paged", {}).get(c)
        for other, key in (("mlx", "vs_mlx"), ("mlx_lm", "vs_mlx_lm"), ("vllm_cpu", "vs_vllm_cpu")):
            o = s.get(other, {}).get(c)
            if p and o:
                row[f"tps_{key}"] = p["output_throughput"] / o["output_throughput"]
                row[f"ttft_p50_{key}"] = o["median_ttft_ms"] / p["median_ttft_ms"]
                row[f"ttft_p99_{key}"] = o["p99_ttft_ms"] / p["p99_ttft_ms"]
        out[c] = row
    return out


def _f(x, d=1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def _check(val, target) -> str:
    if val is None or math.isnan(val):
        return "n/a"
    return "**met**" if val >= target else "**not met**"


def render(r: dict) -> str:
    a = r["args"]
    m = r["machine"]
    L = ["## Serving: vmetal paged vs MLX-managed vs mlx_lm.server (OpenAI API)", ""]
    L.append(f"Generated by `benchmarks/bench_serving.py` on {r['date']} in {r['elapsed_s'] / 60:.1f} min"
             + (" (**--quick**: few requests per run, indicative only)" if a["quick"] else "") + ".")
    L.append("")
    L.append(f"- Command: `{r['command']}`")
    L.append(f"- Machine: {m['cpu']}, {m['usable_cores']} usable cores, "
             f"{_f(m.get('ram_gib'))} GiB RAM, {m['os']}; MLX device `{r['mlx_device']}`")
    L.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()))
    sh = r["shape"]
    L.append(f"- Model: random-weight {sh['arch']} (vmetal.demo.build_tiny_model), hidden {sh['hidden_size']}, "
             f"{sh['num_layers']} layers, {sh['num_heads']} heads / {sh['num_kv_heads']} KV heads, "
             f"intermediate {sh['intermediate_size']}, vocab {r['vocab_size']}, **{a['dtype']}**")
    L.append(f"- Load: vLLM's `benchmark()` (vllm/benchmarks/serve.py), streamed `/v1/completions`, "
             f"{a['input_len']} prompt tokens (vLLM RandomDataset, i.i.d. tokens), {a['output_len']} "
             f"output tokens (`ignore_eos`, greedy), all requests queued at once, at most C in flight; "
             f"requests per run: " + ", ".join(f"C={c}: {r['num_prompts'][str(c)]}" for c in a["concurrency"])
             + f"; {a['trials']} trial(s) per C (median reported); each server warmed up first with "
             f"one full-length request and one wave of C={max(a['concurrency'])} short ones")
    L.append("- Servers (MODEL = the model folder):")
    for b, d in r["backends"].items():
        L.append(f"  - {LABELS[b]}: `{d['command']}`" + (f" with `{d['env']}`" if d.get("env") else "")
                 + (f" (all started together; ready after {d['startup_s']:.0f} s)"
                    if d.get("startup_s") else ""))
    L.append("")
    L.append("| backend | C | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | ITL p50 ms | "
             "E2EL p50 ms | prompt+output tok/s | req | CPU cores: ours / others |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b, d in r["backends"].items():
        if d.get("error"):
            L.append(f"| {LABELS[b]} | – | failed: {d['error'][:120]} | | | | | | | | |")
            continue
        for c in a["concurrency"]:
            s = d["summary"].get(c)
            if not s:
                continue
            flag = "" if s["foreign_cores_max"] <= a["max_foreign"] else " CONTENDED"
            bad = "" if s["complete"] and not s["failed_total"] else " (INCOMPLETE)"
            L.append(f"| {LABELS[b]} | {c} | {_f(s['output_throughput'])}{bad} | {_f(s['median_ttft_ms'])} | "
                     f"{_f(s['p99_ttft_ms'])} | {_f(s['median_tpot_ms'])} | {_f(s['median_itl_ms'])} | "
                     f"{_f(s['median_e2el_ms'])} | {_f(s['total_token_throughput'])} | {int(s['completed'])} | "
                     f"{_f(s['own_cores'], 2)} / {s['foreign_cores_max']:.2f}{flag} |")
    L.append("")
    rat = r["ratios"]
    L.append("Ratios (paged over the other; TTFT: the other's over paged, so higher is better for paged):")
    L.append("")
    L.append("| C | tok/s paged/MLX | tok/s paged/mlx_lm | TTFT p50 MLX/paged | TTFT p99 MLX/paged | "
             "TTFT p50 mlx_lm/paged |" + (" tok/s paged/vLLM-CPU |" if "vllm_cpu" in r["backends"] else ""))
    L.append("|---:|---:|---:|---:|---:|---:|" + ("---:|" if "vllm_cpu" in r["backends"] else ""))
    for c in a["concurrency"]:
        x = rat.get(c, {})
        row = (f"| {c} | {_f(x.get('tps_vs_mlx'), 2)} | {_f(x.get('tps_vs_mlx_lm'), 2)} | "
               f"{_f(x.get('ttft_p50_vs_mlx'), 1)} | {_f(x.get('ttft_p99_vs_mlx'), 1)} | "
               f"{_f(x.get('ttft_p50_vs_mlx_lm'), 1)} |")
        if "vllm_cpu" in r["backends"]:
            row += f" {_f(x.get('tps_vs_vllm_cpu'), 2)} |"
        L.append(row)
    L.append("")
    tc = r["target_c"]
    x = rat.get(tc, {})
    if tc is not None:
        L.append(f"Targets at C={tc}: paged/MLX-managed output tok/s {_f(x.get('tps_vs_mlx'), 2)}x "
                 f"(target >= {TARGET_VS_MLX}x: {_check(x.get('tps_vs_mlx'), TARGET_VS_MLX)}); "
                 f"paged/mlx_lm.server {_f(x.get('tps_vs_mlx_lm'), 2)}x (target >= {TARGET_VS_MLX_LM}x: "
                 f"{_check(x.get('tps_vs_mlx_lm'), TARGET_VS_MLX_LM)}); TTFT p50 MLX-managed/paged "
                 f"{_f(x.get('ttft_p50_vs_mlx'), 1)}x (target >= {TARGET_TTFT:g}x: "
                 f"{_check(x.get('ttft_p50_vs_mlx'), TARGET_TTFT)}).")
    else:
        L.append(f"Targets are stated at C={TARGET_C}, which this run did not measure.")
    L.append("")
    for n in r["notes"]:
        L.append(f"- {n}")
    return "\n".join(L)


def notes(r: dict) -> list[str]:
    a = r["args"]
    out = ["Output tok/s is vLLM's `output_throughput`: all output tokens of the run / its wall time "
           "(first request sent to last token received), so it includes prefill and the ramp-up; "
           "TTFT includes queueing inside the server behind other requests.",
           "vLLM's own `openai` request function cannot parse `mlx_lm.server`'s streams (it strips each "
           "network chunk, which glues mlx-lm's `: keepalive` SSE comment onto the first `data:` event; "
           "vllm-project/vllm #27412, #51172), so every backend is driven by the same copy of it with "
           "that strip removed; the rest of the load generator and all metrics are vLLM's.",
           "Server output token counts come from each server's streamed `usage`; every run was checked "
           f"to return exactly {a['output_len']} tokens per request"
           + ("" if r["all_complete"] else " — **some runs did not (marked INCOMPLETE)**") + "; "
           f"prompts (decoded, re-encoded by the servers) were {r['input_len_range'][0]}-"
           f"{r['input_len_range'][1]} tokens.",
           "prompt+output tok/s is vLLM's `total_token_throughput` (prompt and output tokens of the run / "
           "its wall time). CPU cores: what this benchmark's process tree (client + servers) used "
           "during the run, and the most any run of that row saw other processes use.",
           f"MLX device `{r['mlx_device']}`: the model's largest matmul ({a['dtype']}, measured before "
           f"the servers started, other processes using {r['matmul_gflops']['foreign_cores']:.2f} cores) "
           f"runs at {r['matmul_gflops'][1]:.1f} GFLOPS at M=1 and {r['matmul_gflops'][128]:.1f} at "
           f"M=128 on {r['matmul_gflops']['cores']:.1f} cores"
           + (": compute-bound, no gain from batching rows."
              if r["matmul_gflops"][128] < 2 * r["matmul_gflops"][1] else ".")]
    bad = [f"{LABELS[b]} C={c}" for b, d in r["backends"].items() for c, s in d.get("summary", {}).items()
           if s["foreign_cores_max"] > a["max_foreign"]]
    if bad:
        out.append(f"**Warning:** other processes used more than {a['max_foreign']} cores of this shared "
                   f"box during: {', '.join(bad)} (CONTENDED); those numbers are not reliable. Re-run "
                   "when the machine is idle.")
    else:
        out.append(f"Other processes stayed under {a['max_foreign']} cores during every timed run.")
    if {"paged", "mlx"} & set(r["backends"]):
        out.append("The vmetal servers' logs show vLLM's own config line with dtype=torch.bfloat16 (vLLM's "
                   "CPU default); vmetal does not use it: mlx-lm loads and computes the model in the "
                   f"checkpoint's {a['dtype']}, and the KV capacity given (`--kv-cache-memory-bytes` "
                   f"{r['kv_cache_memory_bytes']}) is {MAX_NUM_SEQS} x {MAX_MODEL_LEN} tokens in that dtype.")
    if "vllm_cpu" in r["backends"] and not r["backends"]["vllm_cpu"].get("error"):
        out.append(f"vLLM's CPU backend ran with `--dtype {a['dtype']}` (it would otherwise downcast to "
                   "bfloat16); its OpenMP binding: " + (r.get("vllm_cpu_binding") or "not found in its log")
                   + ".")
    failed = [b for b, d in r["backends"].items() if d.get("error")]
    if failed:
        out.append("Backends that did not run: " + "; ".join(
            f"{LABELS[b]}: {r['backends'][b]['error']}" for b in failed))
    if a["quick"]:
        out.append("This was a --quick run (one short run per concurrency): a smoke test of the "
                   "harness, not a measurement; run without --quick for the numbers.")
    return out


def _matmul_gflops(hidden: int, inter: int, dtype: str) -> dict:
    """MLX GFLOPS of the model's largest matmul (x @ W.T, W [inter, hidden]) at M=1 and M=128."""
    import mlx.core as mx

    out = {}
    w = mx.random.normal((inter, hidden)).astype(getattr(mx, dtype))
    for m in (1, 128):
        a = mx.random.normal((m, hidden)).astype(getattr(mx, dtype))
        mx.eval(a, w, a @ w.T)
        n, t, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t < 1.0:
            mx.eval(a @ w.T)
            n += 1
        dt = time.perf_counter() - t
        out[m] = 2 * m * hidden * inter * n / dt / 1e9
        out["cores"] = (time.process_time() - cpu) / dt
    return out


# --------------------------------------------------------------------------- main
def default_num_prompts(c: int, quick: bool) -> int:
    # Full: two waves of C (the second starts as the first finishes, so the run is not one
    # lock-step batch) and >= 6 requests; quick: one wave.
    return max(2, c) if quick else max(6, 2 * c)


WARM_OUT = 4


def warm_len(input_len: int) -> int:
    return min(16, input_len)


def work_tokens(conc, nprompts: dict, input_len: int, output_len: int, trials: int) -> int:
    """Prompt + output tokens one backend processes, warm-up included."""
    timed = sum(trials * nprompts[c] * (input_len + output_len) for c in conc)
    warm = (input_len + min(16, output_len)) + max(conc) * (warm_len(input_len) + WARM_OUT)
    return timed + warm


def estimate_s(backends, work: int, slowdown: float = 1.0) -> float:
    return EST_START_S + sum(slowdown * work / EST_TOKENS_PER_S[b] for b in backends) + 10


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="one wave per concurrency, 64 prompt / 32 output tokens (~3-4 min)")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated (default 1,8,32)")
    ap.add_argument("--num-prompts", type=int,
                    help="requests per run (default: max(6, 2*C), two waves; quick: max(2, C))")
    ap.add_argument("--input-len", type=int, help="prompt tokens (default 128; quick 64)")
    ap.add_argument("--output-len", type=int, help="output tokens (default 64; quick 32)")
    ap.add_argument("--vllm-args", default="",
                    help="more arguments for every vLLM server, one shell-quoted string (default none)")
    ap.add_argument("--trials", type=int, default=1, help="runs per concurrency and backend (default 1)")
    ap.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                    help=f"comma-separated, of {', '.join(ALL_BACKENDS)} (default {','.join(DEFAULT_BACKENDS)})")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="model dtype (default float32, as bench_engine.py)")
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES),
                    help="model shape, as bench_engine.py (default tiny; qwen3-0.6b for GPU runs)")
    ap.add_argument("--model-dir", type=Path, help="where to build (or reuse) the model; default a temp folder")
    ap.add_argument("--log-dir", type=Path, help="server and load-generator logs; default a temp folder")
    ap.add_argument("--results", type=Path, default=RESULTS, help="markdown file to update")
    ap.add_argument("--no-write", action="store_true", help="print the section, do not write it")
    ap.add_argument("--json", type=Path, help="also dump all raw numbers as JSON here")
    ap.add_argument("--max-foreign", type=float, default=0.25,
                    help="a run counts as uncontended when other processes used at most this many "
                         "cores during it (default 0.25)")
    args = ap.parse_args(argv)
    if args.input_len is None:
        args.input_len = 64 if args.quick else 128
    if args.output_len is None:
        args.output_len = 32 if args.quick else 64
    conc = sorted({int(x) for x in args.concurrency.split(",") if x.strip()})
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in ALL_BACKENDS:
            ap.error(f"unknown backend {b!r}; choose from {', '.join(ALL_BACKENDS)}")
    if any(c < 1 for c in conc):
        ap.error("concurrency must be >= 1")
    if max(conc) > MAX_NUM_SEQS:
        print(f"note: C={max(conc)} > --max-num-seqs {MAX_NUM_SEQS}: the vLLM servers queue the rest",
              file=sys.stderr)
    if args.input_len + args.output_len > MAX_MODEL_LEN:
        ap.error(f"--input-len + --output-len must fit --max-model-len {MAX_MODEL_LEN}")
    nprompts = {c: args.num_prompts or default_num_prompts(c, args.quick) for c in conc}

    start = time.perf_counter()
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # aiohttp's session trusts proxy variables; loopback must never go through one.
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost,::1"
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="vmetal-bench-serving-"))
    log_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[bench_serving {time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    work = work_tokens(conc, nprompts, args.input_len, args.output_len, args.trials)
    est = estimate_s(backends, work)
    log(f"plan: backends {backends}, C {conc}, requests {nprompts}, {args.input_len} in / "
        f"{args.output_len} out, {args.trials} trial(s): {work} prompt+output tokens per backend; "
        f"estimated ~{est / 60:.1f} min on a quiet 2-core box (MLX servers ~100 tokens/s), "
        f"~{estimate_s(backends, work, 1.5) / 60:.1f} min at the ~65-70 seen under other sessions' "
        f"load; logs in {log_dir}")

    import mlx.core as mx
    from vllm.benchmarks.lib.endpoint_request_func import ASYNC_REQUEST_FUNCS
    from vllm.tokenizers import get_tokenizer

    from vmetal.server.process import free_port

    ASYNC_REQUEST_FUNCS[ENDPOINT] = _openai_completions_factory()
    log("building model")
    shape = SHAPES[args.shape]
    model_dir = build_model(args.model_dir, args.dtype, shape)
    cfg = json.loads((model_dir / "config.json").read_text())
    tokenizer = get_tokenizer(str(model_dir))
    log(f"model at {model_dir}; MLX matmul micro-benchmark")
    watch = CpuWatch()
    mark = watch.start()
    matmul = _matmul_gflops(cfg["hidden_size"], cfg["intermediate_size"], args.dtype)
    matmul["foreign_cores"] = watch.stop(mark)

    # The same prompts for every backend: one set per (C, trial), one for the warm-up.
    warm_c = max(conc)
    warm_one = sample_requests(tokenizer, 1, args.input_len, min(16, args.output_len), seed=7)
    warm_reqs = sample_requests(tokenizer, warm_c, warm_len(args.input_len), WARM_OUT, seed=8)
    run_reqs = {(c, t): sample_requests(tokenizer, nprompts[c], args.input_len, args.output_len,
                                        seed=1000 * (t + 1) + c)
                for c in conc for t in range(args.trials)}
    report_backends: dict[str, dict] = {}
    servers = {}
    load_log = (log_dir / "load.log").open("w", encoding="utf-8")
    try:
        # All servers up at once (start-up is not timed), then the timed runs interleaved: for each
        # C every backend in turn, so drift in a shared machine's load hits them alike.
        t_start = time.perf_counter()
        for b in backends:
            port = free_port()
            server = make_server(b, model_dir, port, warm_c, log_dir / f"server-{b}.log",
                                 tuple(shlex.split(args.vllm_args)))
            env_shown = ("VLLM_METAL_USE_PAGED_ATTENTION=1" if b == "paged"
                         else "VMETAL_ENABLE=0" if b == "vllm_cpu" else "")
            report_backends[b] = {
                "command": shown_argv(server.argv, model_dir), "env": env_shown, "port": port,
                "log": str(log_dir / f"server-{b}.log"), "runs": {}, "summary": {},
                "base_url": f"http://127.0.0.1:{port}",
                "model_id": "default_model" if b == "mlx_lm" else SERVED_NAME,
            }
            log(f"{b}: starting {report_backends[b]['command']}")
            servers[b] = server
            server.start()
        for b, server in servers.items():
            entry = report_backends[b]
            try:
                server.wait_ready(timeout=300)
                entry["startup_s"] = time.perf_counter() - t_start
                log(f"{b}: ready after {entry['startup_s']:.1f}s; warm-up")
                print(f"\n===== {b} warm-up", file=load_log, flush=True)
                for reqs, c in ((warm_one, 1), (warm_reqs, warm_c)):
                    w = run_load(base_url=entry["base_url"], model_id=entry["model_id"],
                                 tokenizer=tokenizer, requests=reqs, concurrency=c,
                                 extra_body=extra_body_for(b), log_file=load_log)
                    if w["failed"]:
                        errs = [e for e in w["errors"] if e]
                        raise RuntimeError(f"warm-up requests failed: {errs[0][:300] if errs else '?'}")
            except Exception as exc:  # noqa: BLE001 - record it and go on without this backend
                entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                log(f"{b}: FAILED: {exc}")
                server.stop()
        live = [b for b in backends if not report_backends[b].get("error")]
        per_run = {b: {c: [] for c in conc} for b in live}
        t_timed, done_tokens = time.perf_counter(), 0
        total_tokens = len(live) * sum(args.trials * nprompts[c] for c in conc) * (
            args.input_len + args.output_len)
        for t in range(args.trials):
            order = live[t % len(live):] + live[:t % len(live)] if live else []
            for c in conc:
                for b in order:
                    entry = report_backends[b]
                    if entry.get("error"):
                        continue
                    print(f"\n===== {b} C={c} trial {t + 1}", file=load_log, flush=True)
                    try:
                        mark = watch.start()
                        res = run_load(base_url=entry["base_url"], model_id=entry["model_id"],
                                       tokenizer=tokenizer, requests=run_reqs[(c, t)], concurrency=c,
                                       extra_body=extra_body_for(b), log_file=load_log)
                        own = _proc_tree_jiffies(os.getpid())
                        run = {k: res.get(k) for k in KEEP}
                        run["foreign_cores"] = watch.stop(mark)
                        if mark is not None:
                            run["own_cores"] = (own - mark[2]) / _CLK / (time.perf_counter() - mark[0])
                        run["complete"] = (res["failed"] == 0
                                           and all(n == args.output_len for n in res["output_lens"]))
                        run["input_lens"] = sorted(set(res["input_lens"]))
                        run["errors"] = sorted({e[:200] for e in res["errors"] if e})[:3]
                    except Exception as exc:  # noqa: BLE001 - e.g. the server died mid-run
                        entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                        log(f"{b} C={c}: FAILED: {exc}")
                        continue
                    per_run[b][c].append(run)
                    done_tokens += nprompts[c] * (args.input_len + args.output_len)
                    rate = done_tokens / (time.perf_counter() - t_timed)
                    log(f"{b} C={c}: {run['output_throughput']:.1f} output tok/s, TTFT p50 "
                        f"{run['median_ttft_ms']:.0f} ms / p99 {run['p99_ttft_ms']:.0f} ms, TPOT p50 "
                        f"{run['median_tpot_ms']:.1f} ms, {run['completed']}/{nprompts[c]} ok"
                        f"{'' if run['complete'] else ' INCOMPLETE'}; cores used: ours "
                        f"{run.get('own_cores', float('nan')):.2f}, other processes "
                        f"{run['foreign_cores']:.2f}; ~{(total_tokens - done_tokens) / rate / 60:.1f} "
                        "min of runs left")
        for b in live:
            for c in conc:
                if per_run[b][c]:
                    report_backends[b]["runs"][c] = per_run[b][c]
                    report_backends[b]["summary"][c] = summarize(per_run[b][c])
    finally:
        for b, server in servers.items():
            server.stop()
        log("servers stopped")
        load_log.close()

    argv_shown = sys.argv if argv is None else ["benchmarks/bench_serving.py", *argv]
    try:
        argv_shown = [os.path.relpath(argv_shown[0], REPO), *argv_shown[1:]]
    except ValueError:
        pass
    report = {
        "date": date,
        "command": "python " + shlex.join(argv_shown),
        "args": {"quick": args.quick, "concurrency": conc, "input_len": args.input_len,
                 "output_len": args.output_len, "trials": args.trials, "dtype": args.dtype,
                 "max_foreign": args.max_foreign, "backends": backends},
        "num_prompts": {str(c): n for c, n in nprompts.items()},
        "machine": machine_info(),
        "versions": versions(),
        "mlx_device": str(mx.default_device()),
        "shape": shape,
        "vocab_size": cfg["vocab_size"],
        "kv_cache_memory_bytes": kv_bytes(model_dir),
        "backends": report_backends,
        "target_c": TARGET_C if TARGET_C in conc else None,
        "log_dir": str(log_dir),
    }
    report["all_complete"] = all(s["complete"] for d in report_backends.values()
                                 for s in d["summary"].values())
    lens = [n for d in report_backends.values() for s in d["summary"].values() for n in s["input_lens"]]
    report["input_len_range"] = [min(lens), max(lens)] if lens else [args.input_len, args.input_len]
    report["matmul_gflops"] = matmul
    if args.model_dir is None:  # the temp folder build_model made; nothing else is in it
        shutil.rmtree(model_dir.parent, ignore_errors=True)
    report["ratios"] = ratios(report)
    if "vllm_cpu" in report_backends:
        try:
            text = Path(report_backends["vllm_cpu"]["log"]).read_text(errors="replace")
            found = [ln.split("]", 1)[-1].strip() for ln in text.splitlines()
                     if "core ids=" in ln or "reserved_cpus=" in ln]
            report["vllm_cpu_binding"] = "; ".join(dict.fromkeys(found))
        except OSError:
            pass
    report["elapsed_s"] = time.perf_counter() - start
    report["notes"] = notes(report)
    section = render(report)
    publish("serving", section, report, json_path=args.json, write=not args.no_write, path=args.results)
    if not args.no_write:
        log(f"wrote {args.results}")
    x = report["ratios"].get(TARGET_C, {})
    log(f"done in {report['elapsed_s'] / 60:.1f} min (estimated {est / 60:.1f}); at C={TARGET_C}: "
        f"paged/MLX {_f(x.get('tps_vs_mlx'), 2)}x (target {TARGET_VS_MLX}), paged/mlx_lm "
        f"{_f(x.get('tps_vs_mlx_lm'), 2)}x (target {TARGET_VS_MLX_LM}), TTFT p50 MLX/paged "
        f"{_f(x.get('ttft_p50_vs_mlx'), 1)}x (target {TARGET_TTFT:g})")
    return 0 if not any(d.get("error") for d in report_backends.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
