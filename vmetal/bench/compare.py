"""Ratios of each backend's numbers against an anchor backend, oriented so that above 1 is better.

Throughputs read theirs / the anchor's; latencies and memory read the anchor's / theirs. One orientation for
every ratio in a report (and in RESULTS.md) means a table of them needs no legend per column.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is zero."""
    if numerator is None or denominator is None or not denominator:
        return None
    return float(numerator) / float(denominator)


def _plain(row: dict[str, Any], key: str) -> Any:
    return row.get(key)


def against(rows: Iterable[dict[str, Any]], anchor: str, *, higher: Sequence[str] = (),
            lower: Sequence[str] = (), by: str | None = None,
            value: Callable[[dict[str, Any], str], Any] = _plain) -> list[dict[str, Any]]:
    """One row per row of another backend than `anchor`: {backend, baseline, [by], each key's ratio}.

    `higher` keys are better when larger (theirs / anchor's), `lower` keys when smaller (anchor's / theirs).
    With `by` (e.g. "concurrency") a row is compared with the anchor's row of the same `by` value, and skipped
    when the anchor has none. `value(row, key)` reads a number out of a row (default `row[key]`).
    """
    rows = list(rows)
    anchors = {r.get(by) if by else None: r for r in rows if r["backend"] == anchor}
    out = []
    for r in rows:
        base = anchors.get(r.get(by) if by else None)
        if r["backend"] == anchor or base is None:
            continue
        row: dict[str, Any] = {"backend": r["backend"], "baseline": anchor}
        if by:
            row[by] = r[by]
        for key in higher:
            row[key] = ratio(value(r, key), value(base, key))
        for key in lower:
            row[key] = ratio(value(base, key), value(r, key))
        out.append(row)
    return out
