"""MetalModelRunner: vLLM's SchedulerOutput -> MLX forward passes -> ModelRunnerOutput.

Two-phase like vLLM's GPU runner: `execute_model` runs the forward and keeps the
logits, `sample_tokens` samples them. The engine calls the two back to back, so
vLLM's scheduler and output processing never wait on a half-built batch.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

from vmetal.engine.runner.decode_ahead import DecodeAhead
from vmetal.engine.runner.kv import mlx_cache
from vmetal.engine.runner.prompt_logprobs import prompt_logprobs_dict
from vmetal.engine.runner.sampling import MetalSampler, needs_torch_sampler

logger = logging.getLogger("vllm.vmetal")  # under "vllm": its handlers and level apply


class StepLogits(NamedTuple):
    """What execute_model leaves for sample_tokens."""

    logits: dict[str, Any]  # req_id -> last position's logits [V]
    partial: set[str]  # requests whose prompt chunk does not reach the end: nothing to sample
    so: Any  # the step's SchedulerOutput
    prompt_logits: dict[str, Any]  # req_id -> [n, V] for each scheduled position (prompt logprobs)
    # (row order, [B, V] logits, their argmax or None) when every scheduled request is a decode row
    decode_only: Any = None


class MetalModelRunner(DecodeAhead):
    # Decode-ahead (below) needs MLX's lazy, asynchronous evaluation.
    decode_ahead = True

    def __init__(self, vllm_config: Any, device: Any):
        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.scheduler_config = vllm_config.scheduler_config
        self.cache_config = vllm_config.cache_config
        self.device = device  # torch device of the sampler: always CPU
        self.max_num_reqs = self.scheduler_config.max_num_seqs
        self.max_model_len = self.model_config.max_model_len
        self.loaded = None
        self.model = None
        # req_id -> vLLM's CachedRequestState (prompt, outputs, params, generator)
        self.requests: dict[str, Any] = {}
        # Per-request caches: requests in prefill, or decoders the scheduler paused.
        self.request_caches: dict[str, list[Any]] = {}
        # Tokens held in each request's KV cache (per-request or decode row).
        self.cache_len: dict[str, int] = {}
        self.torch_reqs: set[str] = set()
        self.decode: mlx_cache.DecodeBatch | None = None
        self.input_batch = None
        self.sampler: MetalSampler | None = None
        # execute_model -> sample_tokens
        self._pending: StepLogits | None = None
        # req_id -> top-k of prompt logprobs asked for, until its prompt's logprobs are all out.
        self.num_prompt_logprobs: dict[str, int] = {}
        self.prefix_cache = None  # vmetal.engine.runner.kv.prefix_cache.PrefixCache when enabled
        # The next decode step, started at the end of sample_tokens (see _start_next_decode).
        # (row order, tokens fed, [B, V] logits, their argmax)
        self._next_decode: tuple[tuple[str, ...], tuple[int, ...], Any, Any] | None = None

    # ---------------------------------------------------------------- set-up
    def load_model(self) -> None:
        from vmetal.engine import models

        self.loaded = models.load(self.model_config.model, revision=self.model_config.revision)
        self.model = self.loaded.model
        self.decode = mlx_cache.DecodeBatch(self.loaded.num_layers)
        self._build_input_batch()
        logprobs_mode = getattr(self.model_config, "logprobs_mode", "raw_logprobs")
        self.sampler = MetalSampler(str(getattr(logprobs_mode, "value", logprobs_mode)))

    def _build_input_batch(self) -> None:
        from vllm.utils.math_utils import cdiv
        from vllm.v1.sample.logits_processor import build_logitsprocs
        from vllm.v1.worker.gpu_input_batch import InputBatch

        block_size = self.cache_config.block_size
        self.input_batch = InputBatch(
            max_num_reqs=self.max_num_reqs,
            max_model_len=self.max_model_len,
            max_num_batched_tokens=self.scheduler_config.max_num_batched_tokens,
            device=self.device,
            vocab_size=self.model_config.get_vocab_size(),
            block_sizes=[block_size],
            max_num_blocks_per_req=[cdiv(self.max_model_len, block_size)],
            logitsprocs=build_logitsprocs(self.vllm_config, self.device, False, False),
        )

    def enable_prefix_cache(self, budget_bytes: int) -> None:
        from vmetal.engine.runner.kv.prefix_cache import PrefixCache

        self.prefix_cache = PrefixCache(budget_bytes, self.cache_config.block_size)
        logger.info("vmetal: MLX-path prefix cache on, %.1f MiB", budget_bytes / 2**20)

    def _reuse_prefix(self, req_id: str, state: Any, cache: list[Any], limit: int) -> int:
        """Seed a fresh request cache from the prefix cache; returns the tokens now held."""
        hit = self.prefix_cache.lookup(list(state.prompt_token_ids), limit)
        if hit is None:
            return 0
        keys, values, n = hit
        for layer, k, v in zip(cache, keys, values):
            layer.state = (k, v, n)
        self.cache_len[req_id] = n
        return n

    def kv_bytes_per_token(self) -> int:
        assert self.loaded is not None
        return self.loaded.kv_bytes_per_token

    def warm_up(self) -> None:
        """One tiny prefill and decode so MLX compiles its kernels before traffic."""
        import mlx.core as mx

        cache = mlx_cache.new_request_cache(self.model)
        logits = mlx_cache.prefill(self.model, cache, [0, 1, 2, 3])
        batch = mlx_cache.DecodeBatch(self.loaded.num_layers)
        batch.add("warm-up", cache)
        mx.eval(logits, batch.forward(self.model, [int(mx.argmax(logits).item())]))

    # ------------------------------------------------------------ state sync
    def _drop(self, req_id: str) -> None:
        """Forget a request's KV (finished, aborted or preempted)."""
        assert self.decode is not None
        self.decode.remove({req_id})
        self.request_caches.pop(req_id, None)
        self.cache_len.pop(req_id, None)

    def _update_states(self, so: Any) -> None:
        import torch
        from vllm.sampling_params import SamplingType
        from vllm.v1.worker.gpu_input_batch import CachedRequestState

        ib = self.input_batch
        for req_id in so.finished_req_ids:
            self._drop(req_id)
            self.requests.pop(req_id, None)
            self.torch_reqs.discard(req_id)
            self.num_prompt_logprobs.pop(req_id, None)
            ib.remove_request(req_id)
        for req_id in so.preempted_req_ids or ():
            # vLLM freed its blocks; it will be resumed from scratch (recompute).
            self._drop(req_id)

        scheduled = so.num_scheduled_tokens.keys()
        resumed = so.scheduled_cached_reqs.resumed_req_ids
        for req_id in ib.req_id_to_index.keys() - (scheduled - resumed):
            ib.remove_request(req_id)

        to_add = []
        for new in so.scheduled_new_reqs:
            params = new.sampling_params
            generator = None
            if params is not None and params.sampling_type == SamplingType.RANDOM_SEED:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(params.seed)
            state = CachedRequestState(
                req_id=new.req_id,
                prompt_token_ids=new.prompt_token_ids,
                prompt_embeds=None,
                mm_features=[],
                sampling_params=params,
                generator=generator,
                block_ids=tuple(list(ids) for ids in new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
                output_token_ids=[],
                lora_request=None,
            )
            self.requests[new.req_id] = state
            if needs_torch_sampler(params):
                self.torch_reqs.add(new.req_id)
            if params is not None and params.prompt_logprobs is not None:
                # -1 asks for the whole vocabulary (vLLM's convention).
                k = params.prompt_logprobs
                self.num_prompt_logprobs[new.req_id] = ib.vocab_size if k == -1 else k
            to_add.append(state)

        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self.requests[req_id]
            state.num_computed_tokens = cached.num_computed_tokens[i]
            num_output = cached.num_output_tokens[i]
            if num_output < len(state.output_token_ids):
                del state.output_token_ids[num_output:]
            new_blocks = cached.new_block_ids[i]
            if req_id in resumed:
                self._drop(req_id)
                if new_blocks is not None:
                    state.block_ids = tuple(list(ids) for ids in new_blocks)
            elif new_blocks is not None:
                for ids, more in zip(state.block_ids, new_blocks):
                    ids.extend(more)
            index = ib.req_id_to_index.get(req_id)
            if index is None:
                to_add.append(state)
            else:
                ib.num_computed_tokens_cpu[index] = state.num_computed_tokens
                ib.num_tokens_no_spec[index] = state.num_tokens

        for state in to_add:
            ib.add_request(state)
        ib.condense()
        ib.refresh_metadata()

    # Compute hooks: the one place the MLX runner and the PyTorch baseline
    # (torch_runner.py) differ; scheduling, caching policy and sampling are shared.
    def _new_request_cache(self) -> Any:
        return mlx_cache.new_request_cache(self.model)

    def _trim_request_cache(self, cache: Any, drop: int) -> None:
        for layer in cache:
            layer.trim(drop)

    def _prefill(self, cache: Any, tokens: list[int], start: int, all_logits: bool = False) -> Any:
        return mlx_cache.prefill(self.model, cache, tokens, all_logits)

    def _stack(self, rows: list[Any]) -> Any:
        import mlx.core as mx

        return mx.stack(rows)

    def _compute(self) -> Any:
        """Context for a step's forwards (torch: inference mode)."""
        import contextlib

        return contextlib.nullcontext()

    def _tokens(self, state: Any, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without copying the whole sequence every step."""
        prompt = state.prompt_token_ids
        n = len(prompt)
        if end <= n:
            return list(prompt[start:end])
        return list(prompt[start:n]) + state.output_token_ids[max(0, start - n) : end - n]

    def _cache_for_prefill(self, req_id: str, start: int) -> list[Any]:
        """The request's own cache, holding exactly `start` tokens."""
        assert self.decode is not None
        if req_id in self.decode:
            self.request_caches[req_id] = self.decode.extract(req_id)
        cache = self.request_caches.get(req_id)
        held = self.cache_len.get(req_id, 0)
        if cache is None or held < start:
            if start > 0 and held < start:
                # Only reachable if vLLM claimed cached tokens we never computed
                # (prefix caching is switched off on this path for that reason).
                raise RuntimeError(
                    f"request {req_id}: scheduler says {start} tokens are computed, "
                    f"the MLX cache holds {held}"
                )
            cache = self._new_request_cache()
            held = 0
        if held > start:
            self._trim_request_cache(cache, held - start)
        self.request_caches[req_id] = cache
        self.cache_len[req_id] = start
        return cache

    # ---------------------------------------------------------------- steps
    def execute_model(self, so: Any) -> Any:
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

        self._update_states(so)
        self._pending = None
        if so.total_num_scheduled_tokens == 0:
            return EMPTY_MODEL_RUNNER_OUTPUT
        assert self.decode is not None

        decoding, prefilling = [], []
        for req_id, n in so.num_scheduled_tokens.items():
            state = self.requests[req_id]
            is_decode = (
                n == 1
                and req_id in self.decode
                and self.cache_len.get(req_id) == state.num_computed_tokens
            )
            (decoding if is_decode else prefilling).append(req_id)

        ahead, ahead_greedy = self._take_next_decode(decoding)

        # Decode rows the scheduler skipped this step keep their KV aside.
        for req_id in [r for r in self.decode.req_ids if r not in decoding]:
            if req_id in self.requests and req_id not in prefilling:
                self.request_caches[req_id] = self.decode.extract(req_id)

        logits: dict[str, Any] = {}
        prompt_logits: dict[str, Any] = {}
        partial: set[str] = set()
        with self._compute():
            for req_id in prefilling:
                state = self.requests[req_id]
                start, n = state.num_computed_tokens, so.num_scheduled_tokens[req_id]
                cache = self._cache_for_prefill(req_id, start)
                begin = start
                want_prompt = req_id in self.num_prompt_logprobs
                if start == 0 and self.prefix_cache is not None and not want_prompt:
                    # At least the chunk's last token is computed: its logits are needed.
                    begin = self._reuse_prefix(req_id, state, cache, limit=n - 1)
                tokens = self._tokens(state, begin, start + n)
                out = self._prefill(cache, tokens, begin, all_logits=want_prompt)
                if want_prompt:
                    prompt_logits[req_id], out = out, out[-1]
                logits[req_id] = out
                if start + n < state.num_tokens:
                    partial.add(req_id)

            if decoding:
                order = list(self.decode.req_ids)
                if ahead is not None:
                    batch_logits = ahead
                else:
                    tokens = [self.requests[r].get_token_id(self.requests[r].num_computed_tokens)
                              for r in order]
                    batch_logits = self.decode.forward(self.model, tokens)
                for i, req_id in enumerate(order):
                    logits[req_id] = batch_logits[i]

        decode_only = None
        if decoding and not prefilling:
            decode_only = (tuple(order), batch_logits, ahead_greedy if ahead is not None else None)
        self._pending = StepLogits(logits, partial, so, prompt_logits, decode_only)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("vmetal step: %d decoding in one batch, %d prefilling (%d partial)",
                         len(decoding), len(prefilling), len(partial))
        return None

    def sample_tokens(self, grammar_output: Any = None) -> Any:
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

        if self._pending is None:
            return EMPTY_MODEL_RUNNER_OUTPUT
        logits, partial, so, prompt_logits, decode_only = self._pending
        self._pending = None
        num_scheduled = so.num_scheduled_tokens
        ib = self.input_batch
        req_ids = list(ib.req_ids)
        grammar = None
        if grammar_output is not None:
            # Structured output: vLLM's grammar bitmask, applied by vLLM's own
            # function to the CPU torch logits right before its sampler.
            def grammar(torch_logits: Any) -> None:
                from vllm.v1.structured_output.utils import apply_grammar_bitmask

                apply_grammar_bitmask(so, grammar_output, ib, torch_logits)
        use_torch = grammar is not None or any(r in self.torch_reqs for r in req_ids)
        ahead = None
        if decode_only is not None and not use_torch and self.decode_ahead:
            tokens, ahead = self._argmax_feeding_next_decode(*decode_only, req_ids)
            logprobs = None
        else:
            stacked = self._stack([logits[r] for r in req_ids])
            tokens, logprobs = self.sampler.sample(stacked, ib, use_torch, grammar)

        sampled: list[list[int]] = []
        for i, req_id in enumerate(req_ids):
            state = self.requests[req_id]
            self.cache_len[req_id] = state.num_computed_tokens + num_scheduled[req_id]
            if req_id in partial:
                sampled.append([])
                if use_torch and state.generator is not None:
                    # The sampler drew for this row; give the draw back so a
                    # seeded request samples the same with or without chunking.
                    state.generator.set_offset(state.generator.get_offset() - 4)
                continue
            token = int(tokens[i])
            state.output_token_ids.append(token)
            end = state.num_tokens
            ib.token_ids_cpu[i, end - 1] = token
            ib.num_tokens_no_spec[i] = end
            sampled.append([token])
            if req_id in self.request_caches:
                cache = self.request_caches.pop(req_id)
                if self.prefix_cache is not None:
                    self.prefix_cache.insert(list(state.prompt_token_ids), cache)
                self.decode.add(req_id, cache)

        prompt_logprobs = (prompt_logprobs_dict(self, prompt_logits, num_scheduled)
                           if self.num_prompt_logprobs else {})
        if ahead is not None:
            self._next_decode = ahead
        else:
            self._start_next_decode()
        return ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index=dict(ib.req_id_to_index),
            sampled_token_ids=sampled,
            logprobs=logprobs,
            prompt_logprobs_dict=prompt_logprobs,
        )
