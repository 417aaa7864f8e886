"""KV caches by kind: the MLX-managed caches (per request, then one decode batch), the paged block pools
that speak mlx-lm's cache protocol, and the MLX path's own prefix cache."""
