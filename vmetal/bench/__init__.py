"""`vmetal bench` and the benchmarks in `benchmarks/`: serving and single-stream measuring, one job per module.

- `online`:     load a server over HTTP with vLLM's own load generator (`vllm bench serve`'s `main_async`),
                one run per concurrency, one server per backend when comparing (`backend_server`).
- `offline`:    single-stream prefill and decode tok/s and peak memory, vLLM's `LLM` with the plugin in a
                child process (this module is also that child's `__main__`).
- `dataset`:    JSONL / ShareGPT files checked line by line and handed to vLLM's dataset classes.
- `report`:     the Rich tables, JSON, CSV and the optional matplotlib plot.
- `compare`:    ratios against an anchor backend, oriented so that above 1 is better.
- `machine`:    the machine and versions a report records, and the model's matmul speed on it.
- `contention`: other processes' CPU during a timed run (a shared box's noise, measured).
- `inprocess`:  the engine stepped by hand and mlx-lm's generate, timed token by token in this process.
- `shapes`:     the random-weight model shapes the benchmarks measure.
- `load`:       a plain HTTP client whose replies are checked (soak and fault runs), not timed.

`vmetal.cli.bench` imports these inside its commands, and `benchmarks/*.py` are thin scripts over them. They
import only the stdlib and light vmetal modules at module level: vllm, mlx, mlx_lm and matplotlib are imported
inside the functions that need them.
"""
