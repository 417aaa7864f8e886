"""One model over several worker processes: vLLM's process group for control, MLX's for the tensors.

With `--tensor-parallel-size N` vLLM's `mp` executor starts N `MetalWorker`s (on one Mac or, with `--nnodes`,
on several), sends every scheduler step to all of them and reads the answer from rank 0. The workers need two
groups:

- vLLM's own (torch.distributed over gloo, `init_worker_distributed_environment`, as vLLM's CPU worker sets it
  up): the executor and vLLM's parallel state expect it, and it carries the few Python objects the ranks trade
  (each rank's ring address at start; rank 0's sampled tokens each step).
- MLX's (`mx.distributed`, the ring backend over TCP): the all-reduces inside the sharded model. mlx-lm's
  `model.shard(group)` splits attention heads and MLP columns across it; each rank then holds 1/N of the
  weights and of the KV heads. With `--pipeline-parallel-size N` the same ring carries the hidden states
  from stage to stage instead (`vmetal.engine.pipeline`).

Every rank computes the same logits (the ring's all-reduce hands every rank the same sums, and the output
head is not split), so greedy tokens agree by construction; a sampled token is drawn on every rank from its
own generator and could differ, and a rank that fed a different token into the next step would corrupt the
all-reduced activations of all of them. So rank 0's tokens are broadcast (`agree_on_tokens`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("vllm.vmetal")  # under "vllm": its handlers and level apply

# vLLM's executor starts the workers through its CPU OpenMP manager, which pins each to cores ("auto") and
# asserts on hosts whose core layout it does not know; MLX schedules its own threads.
OMP_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


@dataclass(frozen=True)
class Ring:
    """This worker's place in MLX's ring."""

    group: Any  # mx.distributed.Group
    rank: int
    addresses: tuple[str, ...]  # every rank's host:port, by rank
    mode: str = "tensor-parallel"  # or "pipeline": what the ring carries, for the error that names this rank

    @contextlib.contextmanager
    def lost_peer_named(self) -> Iterator[None]:
        """MLX reports a peer gone (its process killed, its node down) as "[ring] connection to a peer was
        lost", naming no one; the error that stops the engine names this rank and the ring instead."""
        try:
            yield
        except RuntimeError as exc:
            if "[ring]" not in str(exc):
                raise
            raise RuntimeError(f"vmetal: {self.mode} rank {self.rank} lost MLX's ring ({exc}); one of the "
                               f"other ranks stopped or its node went away (ring: {' '.join(self.addresses)})") \
                from exc


def init_ranks(vllm_config: Any, rank: int, local_rank: int, init_method: str,
               ring_port: int | None = None) -> Ring | None:
    """Join vLLM's group and MLX's ring for this worker; None (and nothing done) for a single worker.
    `ring_port` (`VLLM_METAL_RING_PORT`): the port of this machine's first rank, the next ones count up."""
    parallel = vllm_config.parallel_config
    if parallel.world_size == 1:
        return None
    from vllm.platforms import current_platform
    from vllm.v1.worker.gpu_worker import init_worker_distributed_environment

    # vLLM's CPU communicator names its shared-memory segments after this (vLLM's CPU worker sets it the
    # same way): the port of the init address, or the file name of a file:// one. Across machines the name
    # also carries this node's address: ranks agreeing on one name would try shared memory between Macs.
    ident = (os.path.basename(init_method.removeprefix("file://")) if init_method.startswith("file://")
             else init_method.split(":")[-1])
    host = "127.0.0.1" if parallel.nnodes == 1 else _node_address()
    os.environ["VLLM_DIST_IDENT"] = ident if parallel.nnodes == 1 else f"{ident}-{host}"
    init_worker_distributed_environment(vllm_config, rank, init_method, local_rank, current_platform.dist_backend)
    ring = _join_ring(rank, parallel.world_size, host, None if ring_port is None else ring_port + local_rank)
    return ring if parallel.pipeline_parallel_size == 1 else dataclasses.replace(ring, mode="pipeline")


def _node_address() -> str:
    """This machine's address for the other nodes (vLLM's `get_ip`: VLLM_HOST_IP, else the interface of the
    default route). gloo, left alone, advertises whatever the hostname resolves to, often 127.0.0.1 or a
    Wi-Fi address; unless GLOO_SOCKET_IFNAME says otherwise it is pointed at the interface holding this one."""
    import psutil
    from vllm.utils.network_utils import get_ip

    address = get_ip()
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        for name, addrs in psutil.net_if_addrs().items():
            if any(a.family == socket.AF_INET and a.address == address for a in addrs):
                os.environ["GLOO_SOCKET_IFNAME"] = name
                break
    return address


def _join_ring(rank: int, world_size: int, host: str, port: int | None) -> Ring:
    """MLX's ring over TCP: each rank listens on a port of its own at `host` (`port`, or a free one), the
    addresses are traded over vLLM's group, and MLX connects them from a hostfile (what `mlx.launch` writes)."""
    import mlx.core as mx
    import torch.distributed as dist
    from vllm.distributed.parallel_state import get_world_group

    from vmetal import envs

    # Tried (or picked) and released, then bound again by MLX: another process could take it in between, which
    # fails the start with MLX's error rather than hanging.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port or 0))
        except OSError as exc:
            raise RuntimeError(f"{envs.RING_PORT}: rank {rank} cannot listen on {host}:{port} ({exc.strerror}); "
                               f"choose a free range or unset {envs.RING_PORT}") from exc
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
    logger.info("vmetal: rank %d of %d joined MLX's ring at %s (ring: %s)", rank, world_size, addresses[rank],
                " ".join(addresses))
    return Ring(group, rank, tuple(addresses))


def agree_on_tokens(tokens: list[int], logprobs: Any) -> tuple[list[int], Any]:
    """Rank 0's sampled tokens (and logprobs) on every rank of the tensor-parallel group."""
    from vllm.distributed.parallel_state import get_tp_group

    return get_tp_group().broadcast_object((tokens, logprobs), src=0)
