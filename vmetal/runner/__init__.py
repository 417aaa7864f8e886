"""The model runner: scheduler output in, one batched MLX forward, sampled tokens out."""
