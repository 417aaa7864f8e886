"""The engine: what runs inside vLLM's own processes (its API server checks the platform; its EngineCore
runs the worker and a model runner).

vLLM reaches this package only through the `vllm.platform_plugins` entry point (`vmetal.register`), never
through the CLI. It is the one place where mlx, torch and vllm may be imported at module level. It may use
`vmetal.envs`, `vmetal.errors` and `vmetal.preflight.checkpoint` (what a config.json says); nothing in it
imports the CLI, the hub or the server bridge.

- `platform.py`: `MetalPlatform`, vLLM's view of the device; settles vLLM's config once per process.
- `worker.py`: `MetalWorker`, vLLM's worker interface over the runner of the chosen KV path.
- `models.py`: loading a checkpoint with mlx-lm.
- `request_checks.py`: requests the engine refuses with HTTP 400.
- `runner/`: one model runner per KV path, its caches (`runner/kv/`) and attention (`runner/attention/`).
"""
