"""The tensor-parallel process group of one engine.

The default torch.distributed group IS the tensor-parallel group (layers/linear.py reads
rank and size from it): every engine (a data-parallel replica included) lives in its own
process tree with its own group, so nothing needs a second level of groups.

Two groups per engine:
- the default group: NCCL on GPUs, gloo on CPU; carries the model's all-reduces and the
  LM head's all-gather (inside CUDA graphs on GPUs);
- a gloo "cpu group" (the default group itself when that is gloo): the control plane, i.e.
  each step's packed Batch broadcast and the KV-size agreement. Gloo because a CPU tensor
  cannot go through NCCL, because gloo notices a dead peer (a closed socket raises at once
  where NCCL would hang), and because it works across nodes where shared memory would not.
"""

from __future__ import annotations

import logging
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

# Workers wait in a broadcast for the next step however long the server sits idle; a
# collective timeout would kill an idle engine. Dead peers are noticed by gloo (closed
# socket) and by the parent-pipe watchdog, not by this timeout.
_CONTROL_TIMEOUT = timedelta(days=365)

logger = logging.getLogger("fastserve")

_cpu_group = None


def get_open_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_tensor_parallel(rank: int, world_size: int, init_method: str, device: torch.device) -> None:
    """Join the engine's group: rank 0 is the driver (the process with the scheduler)."""
    global _cpu_group
    if dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is already initialized in this process: a tensor-parallel engine owns "
            "the default process group; run it in a process of its own (or shut the other engine down)"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=_CONTROL_TIMEOUT if backend == "gloo" else None,
        **({"device_id": device} if backend == "nccl" else {}),
    )
    _cpu_group = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT)


def cpu_group():
    if _cpu_group is None:
        raise RuntimeError("tensor-parallel group is not initialized")
    return _cpu_group


def tp_rank_and_size() -> tuple[int, int]:
    """This process's rank and the tensor-parallel size: the whole default group is the
    tensor-parallel group (see the module docstring); (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_min(value: int) -> int:
    """The smallest `value` over the ranks (KV blocks must fit on the fullest GPU)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=cpu_group())
    return int(t.item())


def cpu_barrier() -> None:
    """A barrier that raises when a peer died (gloo), used before the first NCCL collective
    so that a rank that failed to load its shard is an error, not a hang."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(group=cpu_group())


def destroy_tensor_parallel() -> None:
    global _cpu_group
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - peers may be gone already; the group is dead either way
            logger.debug("destroy_process_group: %r", e)
    _cpu_group = None
