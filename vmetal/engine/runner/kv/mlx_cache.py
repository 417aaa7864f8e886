"""The MLX-managed KV path: per-request caches for prefill, one batched cache for decode.

A request's prompt (or a chunk of it) runs alone on its own mlx-lm caches (what the
model makes: `KVCache`, or a sliding-window `RotatingKVCache` per layer), so a long
prompt never pads the decode batch. Once its prompt is done the request's caches are
merged into the decode batch (mlx-lm's left-padded batch caches), and from then on
every decoding request advances in one forward per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


class DecodeBatch:
    """The decoding requests, one row each, in one left-padded cache per layer.

    A lone row keeps its own per-request cache instead: then a decode step is
    exactly mlx-lm's `generate_step` (integer offsets, no mask), where the
    left-padded cache adds a mask and per-row offset arrays to every step, and
    on MLX's CUDA backend a masked attention that is not its fused decode kernel.
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.req_ids: list[str] = []
        self._caches: list[Any] | None = None
        self._batched = False  # _caches are BatchKVCaches (else one request's own caches)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self.req_ids

    def __len__(self) -> int:
        return len(self.req_ids)

    @property
    def caches(self) -> list[Any]:
        assert self._caches is not None
        return self._caches

    def add(self, req_id: str, request_cache: list[Any]) -> None:
        if self._caches is None:
            self._caches, self._batched = request_cache, False
            self.req_ids.append(req_id)
            return
        # Each layer's cache type batches itself (mlx-lm's `merge`): a KVCache into a BatchKVCache, a
        # sliding-window RotatingKVCache into a BatchRotatingKVCache, whose rows may have wrapped.
        if not self._batched:
            self._caches = [type(c).merge([c]) for c in self._caches]
            self._batched = True
        for batch, row in zip(self._caches, request_cache):
            batch.extend(type(row).merge([row]))
        self.req_ids.append(req_id)

    def remove(self, req_ids: set[str]) -> None:
        keep = [i for i, r in enumerate(self.req_ids) if r not in req_ids]
        if len(keep) == len(self.req_ids):
            return
        self.req_ids = [self.req_ids[i] for i in keep]
        if not keep:
            self._caches = None
            return
        if len(keep) == 1:
            # Back to a lone row's own cache (see the class docstring).
            self._caches = [c.extract(keep[0]) for c in self.caches]
            self._batched = False
            return
        for c in self.caches:
            c.filter(keep)

    def extract(self, req_id: str) -> list[Any]:
        """Take one row out as a per-request cache (for a request paused by the scheduler)."""
        if not self._batched:
            assert self.req_ids == [req_id]
            request_cache, self._caches, self.req_ids = self.caches, None, []
            return request_cache
        idx = self.req_ids.index(req_id)
        request_cache = [c.extract(idx) for c in self.caches]
        self.remove({req_id})
        return request_cache

    def forward(self, model: Any, tokens: Any) -> Any:
        """One decode step for every row; `tokens[i]` is row i's last token (ints or an
        int32 MLX array, possibly not evaluated yet). Returns [B, V]."""
        import mlx.core as mx

        inputs = (tokens if isinstance(tokens, mx.array) else mx.array(tokens, dtype=mx.int32))[:, None]
        return model(inputs, cache=self.caches)[:, -1, :]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._caches or [])


@contextlib.contextmanager
def launched_in_parts(cache: list[Any], parts: int, launch: Callable[..., Any]) -> Iterator[None]:
    """While a forward on `cache` is built, hand its first layers to `launch` (a launch thread's) as soon as they
    are built: the K/V that layers L/parts, 2L/parts, .. store, which cover every layer before them, so the thread
    encodes a forward's first part while this thread builds the rest.

    A speculating step waits for its verify forward's tokens before it can draft again (what is kept decides what
    the draft sees next), so building the forward and launching it add up there, where a plain decode step queued
    ahead overlaps the two across steps (decode_ahead.py). Launched in parts, the launch of one part overlaps the
    build of the next. mlx-lm's forwards give no hook between layers; the cache's `update_and_fetch` is the one
    call every layer makes with what it has built, so it is wrapped on those layers' caches for the build only.
    """
    every = -(-len(cache) // max(parts, 1))
    # A layer whose cache keeps no K/V it fetches (none, or a state of another kind) is left as it is.
    marked = [c for i, c in enumerate(cache) if i and i % every == 0 and callable(getattr(c, "update_and_fetch", None))]
    for layer in marked:
        fetch = layer.update_and_fetch

        def update_and_fetch(keys: Any, values: Any, fetch: Callable[..., Any] = fetch) -> Any:
            out = fetch(keys, values)
            launch(out)
            return out

        layer.update_and_fetch = update_and_fetch  # shadows the class's method on this instance only
    try:
        yield
    finally:
        for layer in marked:
            del layer.update_and_fetch


def new_request_cache(model: Any) -> list[Any]:
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


def prefill(model: Any, cache: list[Any], tokens: list[int], all_logits: bool = False,
            head_on_rows: bool = True, last: int = 0) -> Any:
    """Run `tokens` through `model` on a per-request cache; returns the last position's logits [V] (with
    `last`, the last `last` positions' [last, V]: a speculative step's verified positions).

    Only the last position goes through the model's output head (`models.logits_at`: the family's own head
    and post-processing, handed the last hidden state only): on a 150k-word vocabulary the head over a whole
    prompt would cost more than the rest of the prefill. With `all_logits` (prompt logprobs asked for) every
    position's [n, V] instead. `head_on_rows`: `LoadedModel.head_on_rows`.
    """
    import mlx.core as mx

    from vmetal.engine.models import last_position, logits_at

    if not all_logits and not last and len(tokens) > 1:
        # mlx-lm's own prefill: all but the last token only fill the cache (the call's output is never
        # evaluated), so the last layer's attention output and MLP run for the last position alone, as
        # nothing needs them for the others: a layer's worth of compute less (25 % of a 4-layer model's
        # prefill here, 1/28 of Qwen3-0.6B's).
        model(mx.array(tokens[:-1], dtype=mx.int32)[None], cache=cache)
        tokens = tokens[-1:]
    inputs = mx.array(tokens, dtype=mx.int32)[None]
    if all_logits:
        return model(inputs, cache=cache)[0]
    select = (lambda hidden: hidden[:, -last:]) if last else last_position
    logits = logits_at(model, inputs, cache, select, head_on_rows)[0]
    return logits if last else logits[-1]
