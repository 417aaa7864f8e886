"""What every model runner shares: vLLM's request bookkeeping, sampling, prompt logprobs, and the two-phase
step protocol (`execute_model` then `sample_tokens`).

Two-phase like vLLM's GPU runner: `execute_model` runs the forward and keeps the logits, `sample_tokens`
samples them. The engine calls the two back to back, so vLLM's scheduler and output processing never wait on
a half-built batch. A runner per KV path (`RUNNERS` in this package) supplies the forward and its KV: the
subclass hooks below are the only places where paths differ.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from vmetal.engine.runner import is_pooling
from vmetal.engine.runner.decode_ahead import DecodeAhead
from vmetal.engine.runner.launches import Launches, wanted
from vmetal.engine.runner.prompt_logprobs import PromptLogprobs
from vmetal.engine.runner.sampling import MetalSampler, needs_torch_sampler
from vmetal.engine.runner.step_times import StepTimes

logger = logging.getLogger("vllm.vmetal")  # under "vllm": its handlers and level apply


class RowLogits(Mapping):
    """req_id -> its row of a step's [B, V] logits, sliced when asked for: a greedy decode step samples the
    batch's argmax and never asks, and 32 MLX slices a step are host time a GPU step pays (step_times.py)."""

    def __init__(self, batch: Any, order: Sequence[str]) -> None:
        self.batch = batch
        self.index = {req_id: i for i, req_id in enumerate(order)}

    def __getitem__(self, req_id: str) -> Any:
        return self.batch[self.index[req_id]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


class StepLogits(NamedTuple):
    """What execute_model leaves for sample_tokens."""

    logits: Mapping[str, Any]  # req_id -> last position's logits [V]
    partial: set[str]  # requests whose prompt chunk does not reach the end: nothing to sample
    so: Any  # the step's SchedulerOutput
    prompt_logits: dict[str, Any]  # req_id -> [n, V] for each scheduled position (prompt logprobs)
    # (row order, [B, V] logits, their argmax or None) when every scheduled request is a decode row
    decode_only: Any = None
    # req_id -> (its draft tokens, [drafts + 1, V] logits of the positions that verify them): speculative.py
    drafts: Any = None


class ModelRunnerBase:
    """vLLM's SchedulerOutput in, ModelRunnerOutput out, for any forward and KV layout."""

    backend = "MLX"
    # Decode-ahead needs MLX's lazy, asynchronous evaluation.
    decode_ahead_enabled = True
    # Whether VLLM_METAL_LAUNCH_THREAD=auto gives this path a launch thread on a GPU (launches.wanted).
    launch_thread_by_default = True

    def __init__(self, vllm_config: Any, device: Any, metal_config: Any, group: Any = None):
        self.vllm_config = vllm_config
        # MLX's ring over every rank (`vmetal.engine.distributed`), None on one worker: the tensor-parallel
        # group, or the pipeline's stages (`vmetal.engine.pipeline`) with --pipeline-parallel-size.
        pipelined = vllm_config.parallel_config.pipeline_parallel_size > 1
        self.group = None if pipelined else group
        self.stages = group if pipelined else None
        self.stage = None  # this rank's pipeline.Stage, once loaded
        self.metal_config = metal_config
        self.model_config = vllm_config.model_config
        self.scheduler_config = vllm_config.scheduler_config
        self.cache_config = vllm_config.cache_config
        self.device = device  # torch device of the sampler: always CPU
        self.max_num_reqs = self.scheduler_config.max_num_seqs
        self.pooling = is_pooling(self.model_config)  # embeddings: PoolingParams, not SamplingParams
        self.max_model_len = self.model_config.max_model_len
        self.loaded = None
        self.model = None
        self.weights_bytes = 0
        # req_id -> vLLM's CachedRequestState (prompt, outputs, params, generator)
        self.requests: dict[str, Any] = {}
        self.torch_reqs: set[str] = set()  # requests whose sampling needs vLLM's sampler
        self.input_batch = None
        self.sampler: MetalSampler | None = None
        self.prompt_logprobs: PromptLogprobs | None = None
        # Where each step's time goes (step_times.py); VLLM_METAL_DEBUG=1 logs it every few hundred steps, at
        # INFO: vLLM's handler drops DEBUG records unless VLLM_LOGGING_LEVEL=DEBUG, and the setting is the opt-in.
        self.step_times = StepTimes(log=logger.info if getattr(metal_config, "debug", False) else None)
        # MLX's launches (launches.py): on the engine's thread until `_finish_loading` knows whether a thread of
        # their own can take them.
        self.launches = Launches(threaded=False)
        self.ahead = DecodeAhead(self.step_times, self.launches)
        self._pending: StepLogits | None = None  # execute_model -> sample_tokens
        # speculative.NgramDrafter or draft_model.DraftModelDrafter when vLLM's config asks for speculation
        self.drafter = None
        self.verifying: Any = frozenset()  # the requests fed draft positions in the step being sampled
        # What steps met ("preempted": requests vLLM preempted; the paged path's "ahead_*": how all-decode
        # steps used the decode-ahead; "spec_*": draft tokens checked and accepted, verify forwards queued ahead
        # used and dropped), for `MetalWorker.step_counts`.
        self.counts: Counter[str] = Counter()
        self.peak_requests = 0  # the most requests held at once since MLX's buffer cache was last emptied

    # ---------------------------------------------------------------- set-up
    def load_model(self) -> None:
        """Load the checkpoint with mlx-lm; `weights_bytes` is what it took of MLX's memory."""
        import mlx.core as mx

        from vmetal.engine import models

        before = mx.get_active_memory()
        self.loaded = models.load(self.model_config.model, revision=self.model_config.revision,
                                  kv_path=self.metal_config.kv_path, group=self.group, stages=self.stages,
                                  pooling=self.pooling, packed=self.metal_config.packed_projections,
                                  kernels=self.metal_config.kernels)
        self.weights_bytes = mx.get_active_memory() - before
        self.model = self.loaded.model
        self.stage = self.loaded.stage
        if self.stage is not None:
            # The next step's tokens come with the scheduler's output (every rank before the last samples
            # nothing), so none can be decoded ahead of it.
            self.decode_ahead_enabled = False
            logger.info("vmetal: %s", self.stage.describe())
        self._finish_loading(MetalSampler)

    def _new_drafter(self) -> Any:
        """The proposer vLLM's speculative config asks for; a draft model's weights count as this runner's."""
        from vmetal.preflight import features

        if self.vllm_config.speculative_config.method == features.NGRAM:
            from vmetal.engine.runner.speculative import NgramDrafter

            return NgramDrafter(self.vllm_config)
        from vmetal.engine.runner.draft_model import DraftModelDrafter

        drafter = DraftModelDrafter(self.vllm_config, self.loaded.config, self.step_times, self.launches)
        self.weights_bytes += drafter.weights_bytes
        return drafter

    def _finish_loading(self, sampler_class: type[MetalSampler]) -> None:
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
            logitsprocs=build_logitsprocs(self.vllm_config, self.device, False, self.pooling),
            is_pooling_model=self.pooling,
        )
        logprobs_mode = getattr(self.model_config, "logprobs_mode", "raw_logprobs")
        self.sampler = sampler_class(str(getattr(logprobs_mode, "value", logprobs_mode)))
        self.sampler.wait = self.step_times.wait
        self.prompt_logprobs = PromptLogprobs(self.input_batch.vocab_size)
        # A launch thread takes the decode-ahead's launches, on one worker (a tensor-parallel step's collectives
        # run on the ring's own streams, which only the engine's thread may evaluate).
        threaded = wanted(getattr(self.metal_config, "launch_thread", False), self.metal_config.mlx_device,
                          self.launch_thread_by_default)
        if threaded and self.decode_ahead_enabled and self.group is None:
            self.launches = self.ahead.launches = Launches(threaded=True)

    def describe_backend(self) -> str:
        return f"MLX {self.metal_config.mlx_device or 'default device'}"

    def warm_up(self, tokens: int | None = None) -> None:
        """A forward of `tokens` prompt tokens (None: a few), so the backend compiles its kernels before traffic;
        at `profile_tokens` the worker reads the largest step's activation peak from it."""
        raise NotImplementedError

    def profile_tokens(self) -> int:
        """The tokens of the largest forward a step runs, whose activations the KV budget leaves room for (vLLM's
        own profiling run takes `max_num_batched_tokens`): this path prefills each request on its own, so the
        longest prompt a step holds."""
        return max(1, min(self.scheduler_config.max_num_batched_tokens, self.max_model_len))

    # -------------------------------------------------------------- KV cache
    def kv_bytes_per_token(self) -> int:
        assert self.loaded is not None
        return self.loaded.kv_bytes_per_token

    def kv_cache_spec(self) -> dict[str, Any]:
        """vLLM's view of the KV cache: one full-attention layer spec per layer."""
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        from vmetal.engine.runner.torch_dtypes import torch_dtype_of

        loaded = self.loaded
        k_dim, v_dim = loaded.kv_dims
        spec = FullAttentionSpec(block_size=self.cache_config.block_size, num_kv_heads=loaded.num_kv_heads,
                                 head_size=k_dim, head_size_v=v_dim, dtype=torch_dtype_of(loaded.dtype))
        # A pipeline stage names its layers as the whole model numbers them: vLLM merges every rank's specs.
        first = self.stage.start if self.stage is not None else 0
        return {f"model.layers.{first + i}.self_attn": spec for i in self._planned_layers()}

    def _planned_layers(self) -> tuple[int, ...]:
        """The K/V layers vLLM's block budget counts (every one: the paged path keeps each in blocks)."""
        return tuple(range(self.loaded.num_layers))

    def _fixed_bytes_per_request(self) -> int:
        """What a request holds whatever its length: a hybrid's recurrent state."""
        return self.loaded.state_bytes if self.loaded is not None else 0

    @property
    def kv_fraction(self) -> float:
        """The share of device memory this path's KV budget starts from: vLLM's `gpu_memory_utilization`."""
        return self.cache_config.gpu_memory_utilization

    def kv_budget(self, device_bytes: int, activation_bytes: int) -> int:
        """KV bytes vLLM may plan with.

        The caches grow on demand, so what matters is that the scheduler never admits more tokens than memory
        holds: `kv_fraction` of the device, less weights and `activation_bytes` (the worker's: the largest
        step's activation peak and the freed memory MLX may keep for reuse), and never more than
        `max_num_seqs` full-length sequences (in whole blocks, plus the null block vLLM's pool keeps aside).
        """
        # A hybrid's recurrent state (and, on the MLX-managed path, a sliding window) is a fixed size per
        # request, whatever its length: set aside for the most requests the scheduler may run at once.
        state = self.max_num_reqs * self._fixed_bytes_per_request()
        budget = self._target_share(int(device_bytes * self.kv_fraction) - self.weights_bytes - activation_bytes
                                    - state)
        bs = self.cache_config.block_size
        blocks = self.max_num_reqs * -(-self.max_model_len // bs) + 1
        return max(0, min(budget, blocks * bs * self.kv_bytes_per_token()))

    def _target_share(self, budget: int) -> int:
        """The model's own part of a KV `budget`: a draft model (draft_model.py) holds every token again in
        caches of its own, in proportion to its bytes per token."""
        draft = getattr(self.drafter, "kv_bytes_per_token", 0)
        return budget * self.kv_bytes_per_token() // (self.kv_bytes_per_token() + draft)

    def initialize_kv(self, kv_cache_config: Any) -> None:
        """Allocate what vLLM's block budget asks for; caches that grow per request need nothing."""

    def step_counts(self) -> dict[str, int]:
        counts = dict(self.counts)
        if self.launches.threaded:  # "thread_launches": the decode-ahead's launches the launch thread encoded
            counts["thread_launches"] = self.launches.done
        return counts

    # ------------------------------------------------------------ state sync
    def _drop_kv(self, req_id: str) -> None:
        """Forget a request's KV (finished, aborted, preempted or resumed from scratch)."""

    def _update_states(self, so: Any) -> None:
        ib = self.input_batch
        self._forget(so)
        scheduled = so.num_scheduled_tokens.keys()
        resumed = so.scheduled_cached_reqs.resumed_req_ids
        for req_id in ib.req_id_to_index.keys() - (scheduled - resumed):
            ib.remove_request(req_id)
        for state in self._add_new(so.scheduled_new_reqs) + self._update_cached(so.scheduled_cached_reqs):
            ib.add_request(state)
        self.peak_requests = max(self.peak_requests, len(self.requests))
        ib.condense()
        ib.refresh_metadata()

    def _forget(self, so: Any) -> None:
        for req_id in so.finished_req_ids:
            self._drop_kv(req_id)
            if self.drafter is not None:
                self.drafter.forget(req_id)
            self.requests.pop(req_id, None)
            self.torch_reqs.discard(req_id)
            self.prompt_logprobs.discard(req_id)
            self.input_batch.remove_request(req_id)
        for req_id in so.preempted_req_ids or ():
            # vLLM freed its blocks; it will be resumed from scratch (recompute).
            self._drop_kv(req_id)
            self.counts["preempted"] += 1
        self._shrink_cache()

    def _shrink_cache(self) -> None:
        """Empty MLX's buffer cache once a batch is over (one request or none left of several). The cache keeps
        the freed buffers of the batch's widest steps, and a lone stream's steps ran slower while it held them:
        on this CPU at 0.57-0.83 of its speed before a 32-row batch, graph build and compute both longer, and at
        its old speed with the cache emptied (benchmarks/profile/prof_after_batch.py, benchmarks/RESULTS.md). The
        next batch allocates its buffers again, a cost of its first steps. Runs after the step's settle: a
        finished request is never the decode-ahead's step (`_settle_unless_ahead`)."""
        import mlx.core as mx

        held = len(self.requests)
        if held <= 1 < self.peak_requests:
            mx.clear_cache()
            self.counts["cache_cleared"] += 1
            self.peak_requests = held

    def _add_new(self, new_reqs: Any) -> list[Any]:
        """vLLM's per-request state for requests scheduled for the first time."""
        import torch
        from vllm.sampling_params import SamplingType
        from vllm.v1.worker.gpu_input_batch import CachedRequestState

        added = []
        for new in new_reqs:
            params = new.sampling_params
            generator = None
            if params is not None and params.sampling_type == SamplingType.RANDOM_SEED:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(params.seed)
            state = CachedRequestState(
                req_id=new.req_id, prompt_token_ids=new.prompt_token_ids, prompt_embeds=None, mm_features=[],
                sampling_params=params, pooling_params=new.pooling_params, generator=generator,
                block_ids=tuple(list(ids) for ids in new.block_ids),
                num_computed_tokens=new.num_computed_tokens, output_token_ids=[], lora_request=None,
            )
            self.requests[new.req_id] = state
            if needs_torch_sampler(params):
                self.torch_reqs.add(new.req_id)
            if params is not None:
                self.prompt_logprobs.want(new.req_id, params.prompt_logprobs)
            added.append(state)
        return added

    def _update_cached(self, cached: Any) -> list[Any]:
        """Bring running and resumed requests up to date; those the input batch does not hold yet."""
        ib = self.input_batch
        missing = []
        for i, req_id in enumerate(cached.req_ids):
            state = self.requests[req_id]
            state.num_computed_tokens = cached.num_computed_tokens[i]
            num_output = cached.num_output_tokens[i]
            if num_output < len(state.output_token_ids):
                del state.output_token_ids[num_output:]
            if self.stage is not None and cached.new_token_ids:
                self._take_tokens(state, cached.new_token_ids[i])
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                self._drop_kv(req_id)
                if new_blocks is not None:
                    state.block_ids = tuple(list(ids) for ids in new_blocks)
            elif new_blocks is not None:
                for ids, more in zip(state.block_ids, new_blocks):
                    ids.extend(more)
            index = ib.req_id_to_index.get(req_id)
            if index is None:
                missing.append(state)
            else:
                ib.num_computed_tokens_cpu[index] = state.num_computed_tokens
                ib.num_tokens_no_spec[index] = state.num_tokens
        return missing

    @staticmethod
    def _take_tokens(state: Any, tokens: list[int]) -> None:
        """A pipeline stage's copy of the tokens vLLM schedules from `num_computed_tokens` on (with pipeline
        parallel the scheduler sends them: only the last stage sampled them)."""
        n = len(state.prompt_token_ids)
        out = state.output_token_ids
        for position, token in enumerate(tokens, state.num_computed_tokens):
            i = position - n
            if i == len(out):
                out.append(token)
            elif 0 <= i < len(out):
                out[i] = token

    @staticmethod
    def _tokens(state: Any, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without copying the whole sequence every step."""
        prompt = state.prompt_token_ids
        n = len(prompt)
        if end <= n:
            return list(prompt[start:end])
        return list(prompt[start:n]) + state.output_token_ids[max(0, start - n) : end - n]

    @classmethod
    def _tokens_and_drafts(cls, state: Any, start: int, n: int, proposed: list[int]) -> list[int]:
        """What a speculating request's `n` scheduled positions from `start` feed: its tokens, then the drafts
        `proposed` for the last ones. vLLM may schedule -1 placeholders (a draft it found invalid, or slots held
        for drafts not proposed yet): token 0 is fed at each, and verification rejects it there."""
        return cls._tokens(state, start, start + n - len(proposed)) + [max(t, 0) for t in proposed]

    def _settle_unless_ahead(self, so: Any) -> None:
        """At the start of step `so`: settle the launches (launches.py) unless `so` is the queued decode-ahead's
        step, as far as its rows tell, the only kind of step whose start may overlap a launch."""
        if not self.launches.threaded:
            return
        pending = self.ahead.pending
        if not (pending is not None and not so.finished_req_ids and not so.scheduled_new_reqs
                and not so.scheduled_spec_decode_tokens and so.total_num_scheduled_tokens == len(pending.order)
                and so.num_scheduled_tokens.keys() == set(pending.order)):
            self.launches.settle()

    def _next_token(self, req_id: str) -> int:
        """The token a decode step of `req_id` feeds: the one after those computed."""
        state = self.requests[req_id]
        return state.get_token_id(state.num_computed_tokens)

    # ---------------------------------------------------------------- steps
    def execute_model(self, so: Any) -> Any:
        raise NotImplementedError

    def _stack(self, rows: list[Any]) -> Any:
        import mlx.core as mx

        return mx.stack(rows)

    def _ahead_forward(self, order: tuple[str, ...], tokens: Any) -> Any:
        """[B, V] logits (lazy) of the decode step after this one, rows `order` fed `tokens`; None when it
        cannot be built ahead."""
        return None

    def _on_sampled(self, req_id: str, state: Any, num_scheduled: int, got_token: bool) -> None:
        """A request's step is done (`got_token`: it sampled one; else its prompt chunk was partial)."""

    def _after_step(self) -> None:
        """End of `sample_tokens`, after the decode-ahead (if any) was queued."""

    def sample_tokens(self, grammar_output: Any = None) -> Any:
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

        if self._pending is None:
            return EMPTY_MODEL_RUNNER_OUTPUT
        step, self._pending = self._pending, None
        ib = self.input_batch
        req_ids = list(ib.req_ids)
        if self.stage is not None and not self.stage.last:
            # Its forwards sent their hidden states on as they were built; vLLM reads the last stage's output.
            for req_id in req_ids:
                self._on_sampled(req_id, self.requests[req_id], step.so.num_scheduled_tokens[req_id],
                                 req_id not in step.partial)
            self._after_step()
            return EMPTY_MODEL_RUNNER_OUTPUT
        if self._only_greedy_verification(step, req_ids, grammar_output):
            # Every row's tokens come from its verification: a sampler's argmax would be one more wait on MLX.
            tokens, logprobs = [], None
        else:
            tokens, logprobs, _ = self._sample(step, req_ids, grammar_output)
        verified = self._verify(step.drafts) if step.drafts else {}
        self.verifying = (step.drafts or {}).keys()
        sampled: list[list[int]] = []
        for i, req_id in enumerate(req_ids):
            state = self.requests[req_id]
            got_token = req_id not in step.partial
            if got_token:
                new = verified.get(req_id) or [int(tokens[i])]
                start = state.num_tokens
                state.output_token_ids.extend(new)
                ib.token_ids_cpu[i, start:start + len(new)] = new
                ib.num_tokens_no_spec[i] = state.num_tokens
                sampled.append(new)
            else:
                sampled.append([])
            self._on_sampled(req_id, state, step.so.num_scheduled_tokens[req_id], got_token)
        if self.drafter is not None:
            self.drafter.last = (req_ids, sampled)
        if self.prompt_logprobs.wanted:
            self.launches.settle()
        prompt_logprobs = self.prompt_logprobs.collect(self.requests, self.sampler, step.prompt_logits,
                                                       step.so.num_scheduled_tokens)
        self._after_step()
        return ModelRunnerOutput(req_ids=req_ids, req_id_to_index=dict(ib.req_id_to_index),
                                 sampled_token_ids=sampled, logprobs=logprobs, prompt_logprobs_dict=prompt_logprobs)

    def _only_greedy_verification(self, step: StepLogits, req_ids: list[str], grammar_output: Any) -> bool:
        """Whether every row of the step verifies drafts greedily (so no row needs the sampler's token)."""
        from vmetal.engine.runner.speculative import verifiable

        return (grammar_output is None and bool(step.drafts) and not step.partial and len(step.drafts) == len(req_ids)
                and all(verifiable(self.requests[r].sampling_params) == "greedy" for r in req_ids))

    def _verify(self, drafts: dict[str, tuple[list[int], Any]]) -> dict[str, list[int]]:
        """Each speculating request's tokens of this step: its accepted drafts and one token of its own."""
        from vmetal.engine.runner.speculative import (
            accepted_tokens,
            greedy_targets,
            rejection_sample,
            target_probs,
            verifiable,
        )

        self.launches.settle()
        greedy = [r for r in drafts if verifiable(self.requests[r].sampling_params) == "greedy"]
        targets = dict(zip(greedy, greedy_targets([drafts[r][1] for r in greedy], self.sampler.wait)))
        verified = {}
        for req_id, (tokens, logits) in drafts.items():
            # A request that may not speculate can still be scheduled with vLLM's -1 placeholders (slots for
            # drafts it never got): its token is the sampler's, as in any step.
            state = self.requests[req_id]
            how = verifiable(state.sampling_params)
            if how == "greedy":
                verified[req_id] = accepted_tokens(tokens, targets[req_id])
            elif how == "sampled":
                verified[req_id] = rejection_sample(tokens, target_probs(logits, state.sampling_params),
                                                    state.generator)
            if how is not None:
                self.counts["spec_draft_tokens"] += sum(t >= 0 for t in tokens)
                self.counts["spec_accepted_tokens"] += len(verified[req_id]) - 1
        return verified

    def may_speculate(self, req_id: str) -> bool:
        """Whether a request may get draft tokens: greedy or plain sampling, no grammar (speculative.py)."""
        from vmetal.engine.runner.speculative import verifiable

        return verifiable(self.requests[req_id].sampling_params) is not None

    def take_draft_token_ids(self) -> Any:
        """vLLM's DraftTokenIds for the step just sampled (the engine asks after each step), or None."""
        return None if self.drafter is None else self.drafter.propose(self.input_batch, self.may_speculate)

    def _sample(self, step: StepLogits, req_ids: list[str], grammar_output: Any) -> tuple[list[int], Any, bool]:
        """(a token per row of `req_ids`, vLLM's logprobs or None, whether vLLM's sampler ran)."""
        grammar = None
        if grammar_output is not None:
            # Structured output: vLLM's grammar bitmask, applied by vLLM's own function to the CPU torch
            # logits right before its sampler.
            def grammar(torch_logits: Any) -> None:
                import copy

                from vllm.v1.structured_output.utils import apply_grammar_bitmask

                so = step.so
                if so.scheduled_spec_decode_tokens:
                    # vLLM lays a speculating request's verify positions out as rows of their own; here each
                    # request has one row, and only requests without a grammar speculate (may_speculate).
                    so = copy.copy(so)
                    so.scheduled_spec_decode_tokens = {}
                apply_grammar_bitmask(so, grammar_output, self.input_batch, torch_logits)
        use_torch = grammar is not None or any(r in self.torch_reqs for r in req_ids)
        if step.decode_only is not None and not use_torch and self.decode_ahead_enabled:
            order, batch_logits, ahead = step.decode_only
            return self.ahead.argmax_feeding_next(order, batch_logits, ahead, self._ahead_forward, req_ids), \
                None, False
        self.launches.settle()
        # The sampler draws for a partial prompt chunk's row too; a seeded request gets its generator back
        # as it was, so it samples the same with or without chunked prefill.
        seeded = {r: self.requests[r].generator for r in step.partial if self.requests[r].generator is not None}
        saved = {r: g.get_state() for r, g in seeded.items()} if use_torch else {}
        tokens, logprobs = self.sampler.sample(self._stack([step.logits[r] for r in req_ids]), self.input_batch,
                                               use_torch, grammar)
        for r, state in saved.items():
            seeded[r].set_state(state)
        if self.group is not None and use_torch:  # argmax agrees on every rank already
            from vmetal.engine.distributed import agree_on_tokens

            tokens, logprobs = agree_on_tokens(tokens, logprobs)
        return tokens, logprobs, use_torch
