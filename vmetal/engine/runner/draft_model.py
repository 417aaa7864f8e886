"""Speculative decoding with a draft model: a smaller model of the same family proposes, the target verifies.

vLLM's `--speculative-config '{"model": DRAFT, "num_speculative_tokens": k}'` (method `draft_model`) is driven by
vLLM's engine exactly as n-gram lookup is (speculative.py): after each step the worker hands vLLM draft tokens,
the scheduler feeds them back the next step, and the runner's verification decides what is kept. Only the
proposer differs. vLLM's own `DraftModelProposer` runs a torch model in the GPU runner's buffers, so this one is
ours: the draft is loaded with mlx-lm beside the target and keeps a cache of its own per request.

- Each step, for every request that may speculate, the draft cache is cut back to the longest prefix it shares with
  the request's tokens (what it held past that were its own rejected drafts), fed the tokens it has not seen, and
  asked for k tokens greedily, each fed back as the next input, each forward starting on the device while the next
  is built. Without a launch thread that happens when vLLM asks for the drafts (`propose`), and the target verifies
  them in the step vLLM schedules them in; where a launch thread encodes them (launches.py: by default on a GPU) it
  happens at the end of the step before, the verify forward queued behind them (`queue_ahead`, as the runner does
  for n-gram drafts: decode_ahead.VerifyAhead), so the device runs both while vLLM handles that step's output. Which
  pays depends on the thread (one stream, Qwen3-0.6B's shape, a 4-layer draft, `prof_draft.py`, the engines stepped
  in turn): with it, queued ahead ran 1.049x as fast as not (5 trials on an H200, 2026-12-07; 1.082x with cuDNN's
  attention off, 1.052x drafting 2 tokens); without it 57.3 against 66.8 tok/s on an H100 (2026-12-06) and 20.4
  against 21.8 on 2 CPU cores: queued early on the engine's own thread, MLX blocked in the verify's `async_eval`
  about as long as it otherwise waits for its result. (On the CPU MLX computes inside the launch, so a thread gains
  nothing there: 0.977x queued with one forced on.)
- Greedy drafts are a deterministic function of the context, so verification is the same as for n-gram
  drafts: exact for greedy requests, rejection sampling for sampled ones (a draft proposed with certainty is
  kept with the target's probability of it), which keeps the output distribution exactly.
- Its weights count against the KV budget, and every token a request holds is held twice, once in each
  model's cache, so the target's share of the budget shrinks by the draft's share of the bytes per token (on
  the paged path the pools are sized to that share: the draft's caches grow outside them). The target is on
  either KV path: the drafter reads the request's tokens from vLLM's input batch, not from the target's cache.
- The draft's cache must trim to give rejected drafts back, and mlx-lm's rotating cache of a sliding-window
  layer cannot once it has wrapped: the drafter keeps those layers' caches whole instead (`draft_cache`),
  masked to the window by the family's own code, as it masks a prompt longer than the window. A draft holds a
  few layers of a small model, so its whole context costs little (the budget counts every layer's K/V per
  token for it already). A recurrent state (LFM2, Qwen3-Next) cannot roll back and is refused, as is another
  vocabulary than the target's; both are checked before the engine starts for a local folder
  (`MetalPlatform`), and again here.
"""

from __future__ import annotations

from typing import Any

from vmetal.engine.runner.launches import Launches
from vmetal.engine.runner.step_times import StepTimes


def draft_cache(model: Any) -> list[Any]:
    """A new request's caches for the draft `model`: what mlx-lm makes for it, with each sliding-window
    `RotatingKVCache` a whole `KVCache` (which trims at any length). The family's forward masks a layer to its
    window from the cache it is handed (mlx-lm's `create_attention_mask(..., window_size=)`), so its tokens are
    those of the rotating cache."""
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    from vmetal.engine.runner.kv import mlx_cache

    return [KVCache() if isinstance(c, RotatingKVCache) else c for c in mlx_cache.new_request_cache(model)]


def shared_prefix(held: list[int], tokens: list[int]) -> int:
    """How many leading tokens `held` and `tokens` have in common."""
    # Every step asks this of the whole context, and the two differ at most in the last few positions (the
    # drafts the target rejected): one comparison in C up to there, then a walk over what is left, not a
    # Python loop over thousands of tokens a step.
    n = max(0, min(len(held), len(tokens)) - 8)
    if held[:n] != tokens[:n]:
        n = 0
    for a, b in zip(held[n:], tokens[n:]):
        if a != b:
            break
        n += 1
    return n


class DraftModelDrafter:
    """Proposes `num_tokens` greedy tokens per request from the draft model; `last` is set by the runner after
    each step (row order, tokens sampled per row), as for `speculative.NgramDrafter`."""

    def __init__(self, vllm_config: Any, target_config: dict[str, Any], times: StepTimes | None = None,
                 launches: Launches | None = None):
        import mlx.core as mx

        from vmetal import envs
        from vmetal.engine import models
        from vmetal.preflight.features import check_draft

        spec = vllm_config.speculative_config
        self.num_tokens = spec.num_speculative_tokens
        self.max_model_len = vllm_config.model_config.max_model_len
        before = mx.get_active_memory()
        self.loaded = models.load(spec.model, revision=getattr(spec, "revision", None),
                                  packed=envs.get_config().packed_projections, kernels=envs.get_config().kernels)
        self.weights_bytes = mx.get_active_memory() - before
        check_draft(target_config, self.loaded.config, str(self.loaded.path / "config.json"), spec.model,
                    self.loaded.state)
        self.model = self.loaded.model
        # req_id -> (the draft's mlx-lm cache for it, the tokens that cache holds)
        self.caches: dict[str, tuple[list[Any], list[int]]] = {}
        self.last: tuple[list[str], list[list[int]]] | None = None
        self.queued: tuple[list[str], list[tuple[str, list[int], Any]], Any] | None = None  # what `start` built
        # The runner's step timer: the draft's forwards are part of a speculating step's graph build, launch
        # and wait (bench_draft.py and prof_draft.py read them).
        self.times = times or StepTimes()
        # The runner's launches (launches.py): with a launch thread, each draft forward is encoded there while
        # the engine's thread builds the next.
        self.launches = launches or Launches(threaded=False)
        # Whether the runner queues the drafts and their verify forward at the end of the step before: where a
        # thread launches them (module doc).
        self.queue_ahead = self.launches.threaded

    @property
    def kv_bytes_per_token(self) -> int:
        return self.loaded.kv_bytes_per_token

    def forget(self, req_id: str) -> None:
        self.caches.pop(req_id, None)

    def start(self, input_batch: Any, eligible: Any) -> dict[str, Any]:
        """Build and queue the drafts for the rows of the last step (`eligible(req_id)`: whether a row may get
        drafts): {req_id: its lazy int32 [k] drafts}; `propose` reads them. A runner that queues ahead
        (`queue_ahead`) calls this at the end of a step and feeds the lazy drafts to the verify forward it queues
        behind them (decode_ahead.VerifyAhead)."""
        import mlx.core as mx

        if self.last is None:
            return {}
        req_ids, sampled = self.last
        self.last = None
        rows: list[tuple[str, list[int], Any]] = []  # (req_id, its tokens, its lazy drafts)
        for i, (req_id, new) in enumerate(zip(req_ids, sampled)):
            n = int(input_batch.num_tokens_no_spec[i])
            # No drafts past the context limit: vLLM would not schedule them.
            k = min(self.num_tokens, self.max_model_len - n - 1)
            if not new or k <= 0 or not eligible(req_id):
                continue
            tokens = input_batch.token_ids_cpu[i, :n].tolist()
            rows.append((req_id, tokens, self._draft(req_id, tokens, k)))
        flat = mx.concatenate([d for _, _, d in rows]) if rows else None
        if flat is not None:
            # Queued on its own: reading it must not wait for the verify forward queued after it.
            with self.times.launch():
                self.launches.launch(flat)
        self.queued = (req_ids, rows, flat)
        return {req_id: drafts for req_id, _, drafts in rows}

    def propose(self, input_batch: Any, eligible: Any) -> Any:
        """vLLM's DraftTokenIds for the rows of the last step (built by `start` if the runner did not), or None
        when no step ran since the last call."""
        from vllm.v1.outputs import DraftTokenIds

        if self.queued is None:
            self.start(input_batch, eligible)
        if self.queued is None:
            return None
        (req_ids, rows, flat), self.queued = self.queued, None
        with self.times.wait():
            self.launches.settle()  # no launch may be encoding while the host reads (launches.py)
            values = flat.tolist() if flat is not None else []  # the one wait for the drafts
        drafts: dict[str, list[int]] = dict.fromkeys(req_ids, [])
        at = 0
        for req_id, tokens, lazy in rows:
            k = lazy.shape[0]
            got, at = values[at:at + k], at + k
            drafts[req_id] = got
            # The cache now holds the request's tokens and every draft but the last (each was fed to get the next).
            self.caches[req_id] = (self.caches[req_id][0], tokens + got[:k - 1])
        return DraftTokenIds(req_ids, [drafts[r] for r in req_ids])

    def _draft(self, req_id: str, tokens: list[int], k: int) -> Any:
        """k greedy draft tokens after `tokens` (lazy int32 [k]), on the request's draft cache."""
        import mlx.core as mx

        from vmetal.engine.runner.kv import mlx_cache

        cache, held = self.caches.get(req_id) or (draft_cache(self.model), [])
        # Keep what the cache shares with the tokens, and always feed at least the last token: its logits give
        # the first draft.
        keep = min(shared_prefix(held, tokens), len(tokens) - 1)
        if len(held) > keep:
            for layer in cache:
                layer.trim(len(held) - keep)
        self.caches[req_id] = (cache, held[:keep])
        feed = tokens[keep:]
        # A step feeds what the draft has not seen since its drafts: one token, or two once all were kept (the
        # last draft and the target's own). One forward takes those; prefill's prompt path (all but the last
        # token in a forward of their own, to skip the last layer's MLP for them) would launch every layer
        # twice for that, and pays only on a prompt.
        short = len(feed) <= self.num_tokens + 1
        with self.times.build():
            logits = mlx_cache.prefill(self.model, cache, feed, head_on_rows=self.loaded.head_on_rows,
                                       last=1 if short else 0)
            out = [mx.argmax(logits[-1] if short else logits, axis=-1).astype(mx.int32)]
        for _ in range(k - 1):
            # Each forward starts on the device while the next is built, as mlx-lm's draft loop does.
            with self.times.launch():
                self.launches.launch(out[-1])
            with self.times.build():
                logits = mlx_cache.prefill(self.model, cache, out[-1][None], head_on_rows=self.loaded.head_on_rows)
                out.append(mx.argmax(logits, axis=-1).astype(mx.int32))
        return mx.stack(out)
