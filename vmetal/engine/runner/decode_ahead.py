"""Decode ahead: the next decode forward queued before control returns to vLLM (MetalModelRunner's mixin).

It works on the runner's state (`decode`, `requests`, `cache_len`, `model`, `_next_decode`) and is a module of
its own only to keep one concern per file.
"""

from __future__ import annotations

from typing import Any


class DecodeAhead:
    # MLX computes on its own thread; vLLM's per-step Python (output handling,
    # scheduling) would otherwise run while that thread idles. So once a step's
    # tokens are known, the next decode forward of the same rows is queued with
    # `mx.async_eval` before control returns to vLLM, as mlx-lm's generate loop
    # does. The next step uses it when vLLM schedules exactly those rows for one
    # token each (the steady state); otherwise the extra KV position is trimmed
    # off again and the step runs as usual.
    def _start_next_decode(self) -> None:
        import mlx.core as mx

        if not self.decode_ahead or self.decode is None or not len(self.decode):
            return
        order = tuple(self.decode.req_ids)
        tokens = []
        for req_id in order:
            state = self.requests.get(req_id)
            if state is None or self.cache_len.get(req_id) != state.num_tokens - 1:
                return
            tokens.append(state.output_token_ids[-1])
        logits = self.decode.forward(self.model, tokens)
        greedy = _argmax(logits)
        mx.async_eval(logits, greedy)
        self._next_decode = (order, tuple(tokens), logits, greedy)

    def _argmax_feeding_next_decode(self, order: tuple[str, ...], batch_logits: Any, greedy: Any,
                                    req_ids: list[str]) -> tuple[list[int], Any]:
        """Greedy tokens of an all-decode step, with the next decode step already queued.

        mlx-lm's loop: the next forward is built on the still-lazy argmax and
        queued before the host waits for the tokens, so MLX computes while
        Python builds graphs and vLLM does its per-step work. Building the graph
        after `.tolist()` (`_start_next_decode`) leaves the device idle for the
        whole graph build each step (about 3 ms for a 28-layer model).
        The tokens must come from an `async_eval` of their own, issued before the
        next step's: on MLX's GPU backends `.tolist()` of an array evaluated as an
        intermediate of a later `async_eval` waits for that whole later graph.
        Returns the tokens in `req_ids` order and the `_next_decode` entry.
        """
        import mlx.core as mx

        if greedy is None:
            greedy = _argmax(batch_logits)
            mx.async_eval(greedy)
        logits = self._ahead_forward(order, greedy)
        if logits is not None:
            next_greedy = _argmax(logits)
            mx.async_eval(logits, next_greedy)
        values = greedy.tolist()
        by_req = dict(zip(order, values))
        ahead = None if logits is None else (order, tuple(values), logits, next_greedy)
        return [by_req[r] for r in req_ids], ahead

    def _ahead_forward(self, order: tuple[str, ...], tokens: Any) -> Any:
        """[B, V] logits of the decode step after this one for rows `order` fed `tokens` (lazy), or None when
        it cannot be built ahead. The MLX-managed KV path: the decode batch's rows are `order`."""
        return self.decode.forward(self.model, tokens)

    def _take_next_decode(self, decoding: list[str]) -> tuple[Any, Any]:
        """The decode-ahead (logits, their argmax) if this step is exactly that step,
        else (None, None) with the KV rolled back."""
        if self._next_decode is None:
            return None, None
        order, tokens, logits, greedy = self._next_decode
        self._next_decode = None
        rows = tuple(self.decode.req_ids)
        usable = rows == order and set(decoding) == set(rows) and all(
            self.requests[r].get_token_id(self.requests[r].num_computed_tokens) == t
            for r, t in zip(rows, tokens)
        )
        if usable:
            return logits, greedy
        if len(self.decode):
            # Every row still in the batch holds the decode-ahead position; drop it.
            for layer in self.decode.caches:
                layer.trim(1)
        return None, None


def _argmax(logits: Any) -> Any:
    """Greedy tokens of [B, V] logits, lazily, as the int32 ids a decode step takes."""
    import mlx.core as mx

    return mx.argmax(logits, axis=-1).astype(mx.int32)
