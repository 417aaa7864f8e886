"""One model over several worker processes: vLLM's process group for control, MLX's for the tensors.

With `--tensor-parallel-size N` vLLM's `mp` executor starts N `MetalWorker`s (on one Mac or, with `--nnodes`,
on several), sends every scheduler step to all of them and reads the answer from rank 0. The workers need two
groups:

- vLLM's own (torch.distributed over gloo, `init_worker_distributed_environment`, as vLLM's CPU worker sets it
  up): the executor and vLLM's parallel state expect it, and it carries the few Python objects the ranks trade
  (each rank's ring address at start; rank 0's sampled tokens each step).
- MLX's (`mx.distributed`, the ring backend over TCP): the all-reduces inside the sharded model. mlx-lm's
  `model.shard(group)` splits attention heads and MLP columns across it; each rank then holds 1/N of the
  weights and of the KV heads.

Every rank computes the same logits (the ring's all-reduce hands every rank the same sums, and the output
head is not split), so greedy tokens agree by construction; a sampled token is drawn on every rank from its
own generator and could differ, and a rank that fed a different token into the next step would corrupt the
all-reduced activations of all of them. So rank 0's tokens are broadcast (`agree_on_tokens`).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from typing import Any

# vLLM's executor starts the workers through its CPU OpenMP manager, which pins each to cores ("auto") and
# asserts on hosts whose core layout it does not know; MLX schedules its own threads.
OMP_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


def init_ranks(vllm_config: Any, rank: int, local_rank: int, init_method: str) -> Any:
    """Join vLLM's group and MLX's ring for this worker; None (and nothing done) for a single worker."""
    parallel = vllm_config.parallel_config
    if parallel.world_size == 1:
        return None
    from vllm.platforms import current_platform
    from vllm.v1.worker.gpu_worker import init_worker_distributed_environment

    # vLLM's CPU communicator names its shared-memory segments after this (vLLM's CPU worker sets it the
    # same way): the port of the init address, or the file name of a file:// one.
    os.environ["VLLM_DIST_IDENT"] = (os.path.basename(init_method.removeprefix("file://"))
                                     if init_method.startswith("file://") else init_method.split(":")[-1])
    init_worker_distributed_environment(vllm_config, rank, init_method, local_rank, current_platform.dist_backend)
    return _join_ring(rank, parallel.world_size, local_host=parallel.nnodes == 1)


def _join_ring(rank: int, world_size: int, local_host: bool) -> Any:
    """MLX's ring over TCP: each rank listens on a port of its own, the addresses are traded over vLLM's
    group, and MLX connects them from a hostfile (what `mlx.launch` would write)."""
    import mlx.core as mx
    import torch.distributed as dist
    from vllm.distributed.parallel_state import get_world_group

    if local_host:
        host = "127.0.0.1"
    else:
        from vllm.utils.network_utils import get_ip  # VLLM_HOST_IP, else the interface of the default route

        host = get_ip()
    # Bound and released, then bound again by MLX: another process could take it in between, which fails the
    # start with MLX's error rather than hanging. A fixed base port (set per Mac) would close that window.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    addresses: list[Any] = [None] * world_size
    dist.all_gather_object(addresses, f"{host}:{port}", group=get_world_group().cpu_group)
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="vmetal-ring-", delete=False) as f:
        json.dump([[a] for a in addresses], f)
    os.environ["MLX_RANK"], os.environ["MLX_HOSTFILE"] = str(rank), f.name
    try:
        group = mx.distributed.init(strict=True, backend="ring")
    finally:
        os.unlink(f.name)
    if (group.rank(), group.size()) != (rank, world_size):
        raise RuntimeError(f"MLX's ring made rank {group.rank()} of {group.size()}, vLLM's rank {rank} of "
                           f"{world_size}")
    return group


def agree_on_tokens(tokens: list[int], logprobs: Any) -> tuple[list[int], Any]:
    """Rank 0's sampled tokens (and logprobs) on every rank of the tensor-parallel group."""
    from vllm.distributed.parallel_state import get_tp_group

    return get_tp_group().broadcast_object((tokens, logprobs), src=0)
