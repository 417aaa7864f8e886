"""The MLX-managed KV path (the default): each prompt prefills on its own cache, every decoding request
advances in one batched forward per step.

A request's prompt (or a chunk of it) runs alone on its own mlx-lm cache (`kv/mlx_cache.py`), so a long prompt
never pads the decode batch; once its prompt is done the cache joins the `DecodeBatch`. The caches grow on
demand, so the KV budget reported to vLLM only has to keep the scheduler from admitting more than memory
holds (`ModelRunnerBase.kv_budget`). `VLLM_METAL_PREFIX_CACHE` adds this path's own prefix cache.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from vmetal.engine.runner.base import ModelRunnerBase, RowLogits, StepLogits
from vmetal.engine.runner.decode_ahead import VerifyAhead
from vmetal.engine.runner.kv import mlx_cache

logger = logging.getLogger("vllm.vmetal")  # under "vllm": its handlers and level apply


class MlxModelRunner(ModelRunnerBase):
    # A verify forward queued ahead goes to the launch thread in this many parts (mlx_cache.launched_in_parts).
    verify_launch_parts = 4

    def __init__(self, vllm_config: Any, device: Any, metal_config: Any, group: Any = None):
        super().__init__(vllm_config, device, metal_config, group)
        # Per-request caches: requests in prefill, or decoders the scheduler paused.
        self.request_caches: dict[str, Any] = {}
        # Tokens held in each request's KV cache (per-request or decode row).
        self.cache_len: dict[str, int] = {}
        self.decode: Any = None  # the decode batch (mlx_cache.DecodeBatch; the torch path's own)
        self.prefix_cache = None  # vmetal.engine.runner.kv.prefix_cache.PrefixCache when enabled
        # req_id -> its verify forward queued at the end of the step before (decode_ahead.VerifyAhead)
        self.verify_ahead: dict[str, VerifyAhead] = {}

    # ---------------------------------------------------------------- set-up
    def load_model(self) -> None:
        super().load_model()
        self.decode = mlx_cache.DecodeBatch(self.loaded.num_layers)
        if not self.loaded.trimmable:
            # The decode-ahead step is rolled back by trimming one position, which a sliding-window cache that
            # has wrapped cannot give back: such models decode one step at a time.
            self.decode_ahead_enabled = False
        if self.vllm_config.speculative_config is not None:
            # The platform's pre-flight refuses this for a local folder; a Hub id is only known here.
            from vmetal.preflight.cache_types import check_speculation

            check_speculation(self.loaded.state)
            self.drafter = self._new_drafter()
        if self.metal_config.prefix_cache:
            # The platform's pre-flight refuses this for a local folder; a Hub id is only known here.
            from vmetal.preflight.cache_types import check_prefix_cache

            check_prefix_cache(self.loaded.state)
        if self.metal_config.prefix_cache:
            from vmetal.engine.device import device_memory_bytes

            budget = int(device_memory_bytes(self.metal_config.mlx_device or "cpu")
                         * self.metal_config.prefix_cache_fraction)
            self.enable_prefix_cache(budget)

    # ------------------------------------------------------------ KV budget
    # A sliding-window layer's cache stops growing at its window (mlx-lm's RotatingKVCache): vLLM's blocks count
    # only the layers that keep every token, and each request's windows are set aside like a recurrent state.
    # A Gemma 3 (five layers in six sliding) then fits six times the context vLLM would otherwise admit.
    def kv_bytes_per_token(self) -> int:
        return self.loaded.growing_kv_bytes_per_token

    def _planned_layers(self) -> tuple[int, ...]:
        return self.loaded.growing_layers()

    def _fixed_bytes_per_request(self) -> int:
        return super()._fixed_bytes_per_request() + self.loaded.window_bytes

    def enable_prefix_cache(self, budget_bytes: int) -> None:
        from vmetal.engine.runner.kv.prefix_cache import PrefixCache

        self.prefix_cache = PrefixCache(budget_bytes, self.cache_config.block_size)
        logger.info("vmetal: MLX-path prefix cache on, %.1f MiB", budget_bytes / 2**20)

    def warm_up(self, tokens: int | None = None) -> None:
        import mlx.core as mx

        cache = mlx_cache.new_request_cache(self.model)
        logits = mlx_cache.prefill(self.model, cache, [0] * (tokens or 4))
        batch = mlx_cache.DecodeBatch(self.loaded.num_layers)
        batch.add("warm-up", cache)
        mx.eval(logits, batch.forward(self.model, [int(mx.argmax(logits).item())]))

    # Compute hooks: the one place the MLX path and the PyTorch baseline (torch_runner.py) differ; request
    # bookkeeping, caching policy and sampling are shared.
    def _new_request_cache(self) -> Any:
        return mlx_cache.new_request_cache(self.model)

    def _trim_request_cache(self, cache: Any, drop: int) -> None:
        if not all(layer.is_trimmable() for layer in cache):
            raise RuntimeError(f"cannot roll back {drop} positions: a sliding-window cache has wrapped")
        for layer in cache:
            layer.trim(drop)

    def _prefill(self, cache: Any, tokens: list[int], start: int, all_logits: bool = False) -> Any:
        return mlx_cache.prefill(self.model, cache, tokens, all_logits, self.loaded.head_on_rows)

    def _compute(self) -> Any:
        """Context for a step's forwards (torch: inference mode)."""
        import contextlib

        return contextlib.nullcontext()

    # ------------------------------------------------------------ KV per request
    def _drop_kv(self, req_id: str) -> None:
        self.verify_ahead.pop(req_id, None)
        self.decode.remove({req_id})
        self.request_caches.pop(req_id, None)
        self.cache_len.pop(req_id, None)

    def _cache_for_prefill(self, req_id: str, start: int) -> Any:
        """The request's own cache, holding exactly `start` tokens."""
        if req_id in self.decode:
            self.request_caches[req_id] = self.decode.extract(req_id)
        cache = self.request_caches.get(req_id)
        held = self.cache_len.get(req_id, 0)
        if cache is None or held < start:
            if start > 0 and held < start:
                # Only reachable if vLLM claimed cached tokens we never computed (prefix caching is switched
                # off on this path for that reason).
                raise RuntimeError(f"request {req_id}: scheduler says {start} tokens are computed, "
                                   f"the MLX cache holds {held}")
            cache = self._new_request_cache()
            held = 0
        if held > start and start == 0:
            cache = self._new_request_cache()  # all of it recomputed (a preempted request): no trim needed
        elif held > start:
            self._trim_request_cache(cache, held - start)
        self.request_caches[req_id] = cache
        self.cache_len[req_id] = start
        return cache

    def _reuse_prefix(self, req_id: str, state: Any, cache: Any, limit: int) -> int:
        """Seed a fresh request cache from the prefix cache; returns the tokens now held."""
        hit = self.prefix_cache.lookup(list(state.prompt_token_ids), limit)
        if hit is None:
            return 0
        keys, values, n = hit
        for layer, k, v in zip(cache, keys, values):
            layer.state = (k, v, n)
        self.cache_len[req_id] = n
        return n

    # ---------------------------------------------------------------- steps
    def execute_model(self, so: Any) -> Any:
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

        self._settle_unless_ahead(so)
        self._update_states(so)
        self._pending = None
        if so.total_num_scheduled_tokens == 0:
            return EMPTY_MODEL_RUNNER_OUTPUT
        decoding, prefilling = self._classify(so)
        ahead = self._take_ahead(decoding)
        # Decode rows the scheduler skipped this step keep their KV aside.
        for req_id in [r for r in self.decode.req_ids if r not in decoding]:
            if req_id in self.requests and req_id not in prefilling:
                self.request_caches[req_id] = self.decode.extract(req_id)

        logits: dict[str, Any] = {}
        prompt_logits: dict[str, Any] = {}
        drafts: dict[str, Any] = {}
        with self._compute():
            partial = self._prefill_all(so, prefilling, logits, prompt_logits, drafts)
            decode_only = self._decode_all(ahead) if decoding else None
        rows: Mapping[str, Any] = logits
        if decode_only is not None:
            order, batch_logits, _ = decode_only
            rows = RowLogits(batch_logits, order)  # sliced per row only if something samples them
        if prefilling:  # one mapping for the sampler: the prefills' rows and the decode batch's
            rows, decode_only = {**logits, **rows}, None
        self._pending = StepLogits(rows, partial, so, prompt_logits, decode_only, drafts)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("vmetal step: %d decoding in one batch, %d prefilling (%d partial)",
                         len(decoding), len(prefilling), len(partial))
        return None

    def _classify(self, so: Any) -> tuple[list[str], list[str]]:
        """(decode rows: one token each, on a decode-batch row that holds all it has computed; the rest)."""
        decoding, prefilling = [], []
        for req_id, n in so.num_scheduled_tokens.items():
            is_decode = (n == 1 and req_id in self.decode
                         and self.cache_len.get(req_id) == self.requests[req_id].num_computed_tokens)
            (decoding if is_decode else prefilling).append(req_id)
        return decoding, prefilling

    def _take_ahead(self, decoding: list[str]) -> Any:
        """The decode-ahead step if this step is exactly it, else None with its KV position rolled back."""
        ahead = self.ahead.take()
        if ahead is None:
            return None
        rows = tuple(self.decode.req_ids)
        if set(decoding) == set(rows) and ahead.matches(rows, self._next_token):
            return ahead
        if len(self.decode):
            # Every row still in the batch holds the decode-ahead position; drop it.
            for layer in self.decode.caches:
                layer.trim(1)
        return None

    def _prefill_all(self, so: Any, prefilling: list[str], logits: dict[str, Any],
                     prompt_logits: dict[str, Any], drafts: dict[str, Any]) -> set[str]:
        """Each prefilling request's chunk on its own cache; the requests whose chunk ends before the prompt.
        A speculating request's step runs here too: its last token and its drafts in one forward, whose
        [drafts + 1, V] logits go to `drafts`."""
        partial: set[str] = set()
        for req_id in prefilling:
            state = self.requests[req_id]
            start, n = state.num_computed_tokens, so.num_scheduled_tokens[req_id]
            proposed = list(so.scheduled_spec_decode_tokens.get(req_id, ()))
            fed = self._tokens_and_drafts(state, start, n, proposed) if proposed else None
            ahead = self.verify_ahead.pop(req_id, None)
            used = fed is not None and ahead is not None and ahead.matches(start, fed)
            if ahead is not None:
                self.counts["spec_ahead_used" if used else "spec_ahead_dropped"] += 1
            if proposed:
                if used:
                    out = ahead.logits  # queued at the end of the last step; the cache holds its positions
                else:
                    # The cache holds what vLLM counts as computed once the last step's rejected drafts (or an
                    # unused verify-ahead's positions) are trimmed.
                    cache = self._cache_for_prefill(req_id, start)
                    with self.step_times.build():
                        out = mlx_cache.prefill(self.model, cache, fed, head_on_rows=self.loaded.head_on_rows,
                                                last=len(proposed) + 1)
                drafts[req_id] = (proposed, out)
                logits[req_id] = out[0]
                continue
            cache = self._cache_for_prefill(req_id, start)
            begin = start
            want_prompt = req_id in self.prompt_logprobs
            if start == 0 and self.prefix_cache is not None and not want_prompt:
                # At least the chunk's last token is computed: its logits are needed.
                begin = self._reuse_prefix(req_id, state, cache, limit=n - 1)
            with self.step_times.build():
                out = self._prefill(cache, self._tokens(state, begin, start + n), begin, all_logits=want_prompt)
            if want_prompt:
                prompt_logits[req_id], out = out, out[-1]
            logits[req_id] = out
            if start + n < state.num_tokens:
                partial.add(req_id)
        return partial

    def _decode_all(self, ahead: Any) -> tuple[Any, ...]:
        """One batched forward for every decode row (or the decode-ahead's); (row order, [B, V], the ahead)."""
        order = tuple(self.decode.req_ids)
        if ahead is not None:
            return order, ahead.logits, ahead
        return order, self._decode_forward([self._next_token(r) for r in order]), None

    def _ahead_forward(self, order: tuple[str, ...], tokens: Any) -> Any:
        # The decode batch's rows are `order`.
        return self._decode_forward(tokens)

    def _decode_forward(self, tokens: Any) -> Any:
        with self.step_times.build():
            return self.decode.forward(self.model, tokens)

    def _on_sampled(self, req_id: str, state: Any, num_scheduled: int, got_token: bool) -> None:
        self.cache_len[req_id] = state.num_computed_tokens + num_scheduled
        # A request that verified drafts keeps its own cache, which the next step trims to what was accepted:
        # joining the decode batch would copy its KV in and out every step it speculates.
        if got_token and req_id in self.request_caches and req_id not in self.verifying:
            # Its prompt is done: the request joins the decode batch.
            cache = self.request_caches.pop(req_id)
            if self.prefix_cache is not None:
                self.prefix_cache.insert(list(state.prompt_token_ids), cache)
            self.decode.add(req_id, cache)

    def _after_step(self) -> None:
        if self.ahead.pending is None:
            self._start_next_decode()
        if self.drafter is not None and self.drafter.queue_ahead and self.decode_ahead_enabled:
            self._start_next_verify()

    def _start_next_verify(self) -> None:
        """Queue the drafter's forwards for the step just sampled and, behind them, the verify forward of each
        request that verified drafts in it (decode_ahead.VerifyAhead); the next step uses those it matches."""
        import mlx.core as mx

        self.launches.settle()
        for req_id, drafts in self.drafter.start(self.input_batch, self.may_speculate).items():
            cache = self.request_caches.get(req_id)
            if req_id not in self.verifying or cache is None:
                continue  # not on a cache of its own yet (it joined the decode batch): this step verifies as usual
            state = self.requests[req_id]
            # What vLLM will count as computed: every token but the one just sampled, which is fed next.
            start = state.num_tokens - 1
            self._trim_request_cache(cache, self.cache_len[req_id] - start)
            parts = self.verify_launch_parts if self.launches.threaded else 1
            with self.step_times.build(), mlx_cache.launched_in_parts(cache, parts, self.launches.launch):
                fed = mx.concatenate([mx.array([state.output_token_ids[-1]], dtype=mx.int32),
                                      mx.array(drafts, dtype=mx.int32)])
                logits = mlx_cache.prefill(self.model, cache, fed, head_on_rows=self.loaded.head_on_rows,
                                           last=fed.shape[0])
            with self.step_times.launch():
                self.launches.launch(logits)
            self.cache_len[req_id] = start + fed.shape[0]
            self.verify_ahead[req_id] = VerifyAhead(start, state.output_token_ids[-1], drafts, logits)

    def _start_next_decode(self) -> None:
        """Queue the next decode step of the decode batch, once this step's tokens are known."""
        if not self.decode_ahead_enabled or not len(self.decode):
            return
        order = tuple(self.decode.req_ids)
        tokens = []
        for req_id in order:
            state = self.requests.get(req_id)
            if state is None or self.cache_len.get(req_id) != state.num_tokens - 1:
                return
            tokens.append(state.output_token_ids[-1])
        self.ahead.queue(order, tokens, self._decode_forward(tokens))
