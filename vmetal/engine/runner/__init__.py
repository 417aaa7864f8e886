"""Model runners: vLLM's `SchedulerOutput` in, MLX (or torch) forwards, `ModelRunnerOutput` out."""
