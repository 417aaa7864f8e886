"""vLLM's own load generator, fitted to drive mlx_lm.server as well as vLLM's servers (bench_serving.py).

The load is `vllm.benchmarks.serve.benchmark()`, what `vllm bench serve` runs, with two substitutions, both
small, both needed for a fair comparison:

1. The request function. vLLM's `openai` request function strips every network chunk before SSE
   parsing; `mlx_lm.server` sends an SSE comment (`: keepalive N/M`) before each stream's first token,
   and once stripped it glues onto the next `data:` event, which is then dropped: half the requests
   fail ("Never received a valid chunk") and the rest lose their first token (so TTFT reads as the
   whole request). Same bug as vllm-project/vllm PRs #27412 and #51172 (open). `_openai_completions`
   below is vLLM's function with the strip removed (the PR's fix); `register()` adds it to vLLM's
   `ASYNC_REQUEST_FUNCS` as `ENDPOINT`, and every backend is measured through it, by the same client.
2. The prompts. `RandomDataset` builds each prompt as a run of consecutive token ids from a random
   offset; with a ~500-token vocabulary a run of 64 prompts holds a few pairs that start at the same
   offset and are identical, which vLLM's prefix caching (on for paged) and mlx-lm's prompt cache would
   serve from cache while the MLX-managed path recomputes. `_IIDRandomDataset` keeps everything else of
   RandomDataset but draws the tokens i.i.d., so no two prompts share a prefix.

vLLM is imported inside the functions: the script parses its flags first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

PERCENTILES = [50.0, 90.0, 99.0]
ENDPOINT = "openai-sse"  # the name `register()` gives `_openai_completions` in vLLM's table


def register() -> None:
    """Make `ENDPOINT` a request function of vLLM's load generator (before the first `run_load`)."""
    from vllm.benchmarks.lib.endpoint_request_func import ASYNC_REQUEST_FUNCS

    ASYNC_REQUEST_FUNCS[ENDPOINT] = _openai_completions_factory()


def _openai_completions_factory():
    """vLLM's `async_request_openai_completions`, without the per-chunk `.strip()` (see the docstring).

    vLLM's private helpers (`_validate_api_url`, `_update_payload_common`, …) are used as its own function uses
    them, so every other detail of a request stays vLLM's.
    """
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


# What a run's record keeps of vLLM's result (it also holds every request's lengths and errors).
KEEP = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
        "request_throughput", "output_throughput", "total_token_throughput",
        "max_output_tokens_per_s", "max_concurrent_requests",
        "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
        "mean_tpot_ms", "median_tpot_ms", "p90_tpot_ms", "p99_tpot_ms",
        "mean_itl_ms", "median_itl_ms", "p90_itl_ms", "p99_itl_ms",
        "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms")
