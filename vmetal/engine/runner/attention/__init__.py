"""Paged attention, side by side: `reference.py` is the pure-MLX version that runs on every MLX backend and
is tested against dense attention here; `metal.py` wraps the Metal kernels of `kernels/` with the same
signatures, and runs them only where MLX computes on Metal."""
