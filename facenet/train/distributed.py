"""torch.distributed set-up that is also correct for world size 1 (same code path)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


COLLECTIVE_TIMEOUT_ENV = "FACENET_COLLECTIVE_TIMEOUT"  # seconds a collective may wait for its peers


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> DistInfo:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; absent means a single process."""
    if "RANK" not in os.environ:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def init(info: DistInfo, backend: str, device: torch.device | None) -> None:
    if info.world_size > 1 and not dist.is_initialized():
        from datetime import timedelta

        from facenet.devices import row

        kwargs = {"device_id": device} if device is not None and row(device.type).backend_device_id else {}
        # A rank whose peer died (another node's worker killed) must not wait in a collective forever: it fails
        # after this, its launcher exits, and the supervisor stops the gang and queues the job again.
        timeout = timedelta(seconds=collective_timeout())
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)


def collective_timeout() -> int:
    """Seconds a collective may wait for its peers (FACENET_COLLECTIVE_TIMEOUT, default 600)."""
    return int(os.environ.get(COLLECTIVE_TIMEOUT_ENV, "600"))


def shutdown() -> None:
    """Destroy the process group while this interpreter is whole. Whatever still holds the group only through a
    reference cycle (a model inside DDP holds it through its reducer) is collected first, so the group's backend
    and its threads end here, not in the interpreter's teardown, where a rank once aborted in C++ ("terminate
    called without an active exception") after its training had succeeded."""
    if dist.is_initialized():
        import gc

        gc.collect()
        dist.destroy_process_group()


def all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """Sum (or max) a few scalars over all ranks; identity for world size 1."""
    if not dist.is_initialized():
        return list(values)
    from facenet.devices import row

    dtype = row(device.type).scalar_dtype  # float32 where the backend has no float64 (exact below 2**24)
    t = torch.tensor(values, dtype=dtype, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank `src`'s buffers of `module` (BatchNorm's running statistics), in place; nothing for world
    size 1. DDP broadcasts rank 0's buffers before each forward, then each rank updates them from its own batch, so
    after an epoch's last step the ranks hold W slightly different models (parameters are equal). One broadcast per
    buffer dtype, of the same tensors DDP's own buffer sync sends (torch/nn/parallel/distributed.py, _sync_buffers)."""
    if not dist.is_initialized():
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buf in module.buffers():
        by_dtype.setdefault(buf.dtype, []).append(buf)
    with torch.no_grad():
        for bufs in by_dtype.values():
            flat = torch.cat([b.reshape(-1) for b in bufs])
            dist.broadcast(flat, src)
            at = 0
            for b in bufs:
                b.copy_(flat[at:at + b.numel()].view(b.shape))
                at += b.numel()


def all_gather_object(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
