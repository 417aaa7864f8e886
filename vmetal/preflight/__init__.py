"""What can be known before an engine starts, cheaply: what a checkpoint's config.json says
(`checkpoint.py`), which KV path can hold the model's state (`cache_types.py`), whether a model folder's files
are sound (`model_files.py`), whether it fits in memory (`fit.py`), and the host facts those rest on (`host.py`).

`vmetal serve`'s pre-flight, `pull`, `convert` and `doctor` ask these modules; the engine uses `checkpoint.py`
and `cache_types.py` too, so a refusal reads the same wherever it happens. Nothing here imports mlx, torch or vllm at module level.
"""
