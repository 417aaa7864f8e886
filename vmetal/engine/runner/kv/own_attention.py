"""Paged attention for families whose mlx-lm attention computes its scores in its own code.

Most mlx-lm families call their module's `scaled_dot_product_attention`, which `install_attention_hook` routes
to the paged pools. Gemma 2 does not: it multiplies queries and keys itself, to cap the scores with `tanh`
before the softmax (`attn_logit_softcapping`). Its attention class gets a `__call__` that, handed a
`PagedLayerCache`, projects and rotates as mlx-lm's does, writes K/V to the pools and attends through them with
the same softcap (`reference.grouped_attention`); any other cache takes mlx-lm's own `__call__` unchanged.
Without this a published Gemma 2 (grouped-query attention, which mlx-lm's Gemma 2 cannot decode in a batch)
would be served by no vmetal KV path. The pre-flight lists the classes handled here
(`cache_types.PAGED_OWN_ATTENTION`); a family added there needs its `__call__` here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vmetal.preflight.cache_types import PAGED_OWN_ATTENTION, qualified_name


def _gemma2(original: Callable[..., Any], paged: type) -> Callable[..., Any]:
    def __call__(self: Any, x: Any, mask: Any = None, cache: Any = None) -> Any:
        if not isinstance(cache, paged):
            return original(self, x, mask, cache)
        batch, length, _ = x.shape

        def heads(t: Any, n: int) -> Any:  # [B, L, n * D] -> [B, n, L, D]
            return t.reshape(batch, length, n, -1).transpose(0, 2, 1, 3)

        queries = self.rope(heads(self.q_proj(x), self.n_heads), offset=cache.offset)
        keys = self.rope(heads(self.k_proj(x), self.n_kv_heads), offset=cache.offset)
        keys, values = cache.update_and_fetch(keys, heads(self.v_proj(x), self.n_kv_heads))
        out = cache.attention(queries, self.scale, softcap=self.attn_logit_softcapping)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))

    return __call__


IMPLEMENTATIONS: dict[str, Callable[[Callable[..., Any], type], Callable[..., Any]]] = {
    "mlx_lm.models.gemma2.Attention": _gemma2,
}
_HOOKED: set[str] = set()


def softcap_of(model: Any) -> float | None:
    """The attention-logit softcap of the model's own-code attention layers (Gemma 2's), None without one: the
    Metal kernel's self-check runs it with the model's value."""
    for module in model.modules():
        if qualified_name(type(module)) in PAGED_OWN_ATTENTION and getattr(module, "attn_logit_softcapping", None):
            return float(module.attn_logit_softcapping)
    return None


def install(model: Any, paged: type) -> None:
    """Give each attention class of `model` that the pre-flight lists its paged `__call__` (once a process):
    one that attends through the pools when handed a cache of type `paged` (`PagedLayerCache`)."""
    for module in model.modules():
        cls = type(module)
        name = qualified_name(cls)
        if name in PAGED_OWN_ATTENTION and name not in _HOOKED:
            cls.__call__ = IMPLEMENTATIONS[name](cls.__call__, paged)
            _HOOKED.add(name)
