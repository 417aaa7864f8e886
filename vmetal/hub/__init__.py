"""Models from a hub onto disk.

- `pull.py`: `pull(model, ...) -> PullResult` and `ensure_local(model, ...) -> Path`, the one way the commands
  get a model folder; `remove(entries)`.
- `sources.py`: the `Hub` protocol and its two implementations, Hugging Face (`huggingface.py` listing and
  errors, `huggingface_store.py` download and snapshot store) and ModelScope (`modelscope.py`,
  `modelscope_store.py`), each through the hub's own client.
- `common.py`: what both share (errors, the file model, progress protocol, listing checks);
  `registry.py`: what vmetal pulled; `safe_paths.py`: no hub-given name reaches outside the cache.

Nothing here imports mlx, torch or vllm; hub clients are imported inside the functions that use them.
"""

from vmetal.hub.pull import PullResult, PullView, SilentView, ensure_local, pull, pulled_copy, remove
from vmetal.hub.sources import Hub, hub_for

__all__ = ["Hub", "PullResult", "PullView", "SilentView", "ensure_local", "hub_for", "pull", "pulled_copy", "remove"]
