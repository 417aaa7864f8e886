"""`vmetal bench`: serving and single-stream benchmarks, one job per module.

- `online`:  load a server over HTTP with vLLM's own load generator (`vllm bench serve`'s `main_async`),
             one run per concurrency, one server per backend when comparing.
- `offline`: single-stream prefill and decode tok/s and peak memory, vLLM's `LLM` with the plugin in a
             child process (this module is also that child's `__main__`).
- `dataset`: JSONL / ShareGPT files checked line by line and handed to vLLM's dataset classes.
- `report`:  the Rich tables, JSON, CSV and the optional matplotlib plot.

`vmetal.cli.bench` imports these inside its commands, and they import only the stdlib and light vmetal modules
at module level: vllm, mlx and matplotlib are imported inside the functions that need them.
"""
