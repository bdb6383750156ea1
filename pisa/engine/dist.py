"""Process-group setup for one or many processes, from the environment that ``torchrun`` sets.

One code path serves both cases: with ``WORLD_SIZE`` unset or 1 nothing is initialised and every
collective below is the identity, so the trainer never branches on "distributed or not" except to
wrap the model in DDP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global ``rank`` of ``world_size``, ``local_rank`` on its node,
    the ``device`` it computes on and the process-group ``backend`` (None for one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer; "
                           "launch with torchrun, which sets it") from None


def pick_device(device: str | None, local_rank: int) -> torch.device:
    """``device`` "cpu", "cuda" or None (CUDA when available); CUDA uses GPU ``local_rank``."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was requested but CUDA is not available; use --device cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(device)


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (+ MASTER_ADDR / MASTER_PORT) and join the group.

    The backend is NCCL on CUDA and gloo on CPU. For one process this only picks the device.
    Calling it again after the group exists returns the same answer.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    torch_device = pick_device(device, local_rank)
    if world_size <= 1:
        return DistInfo(0, 1, 0, torch_device, None)
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; launch with torchrun")
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend, rank=rank, world_size=world_size,
                                 timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world_size, local_rank, torch_device, backend)


def get_rank() -> int:
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def get_world_size() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        tdist.barrier()


def all_reduce_mean(values: dict[str, float], device: torch.device | None = None) -> dict[str, float]:
    """Average a dict of floats over ranks (for logging only; one collective for all keys).

    Every rank must pass the same keys in the same order.
    """
    if get_world_size() == 1 or not values:
        return dict(values)
    keys = list(values)
    if device is None:  # NCCL reduces CUDA tensors only
        nccl = tdist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    tdist.all_reduce(packed, op=tdist.ReduceOp.SUM)
    packed /= get_world_size()
    return dict(zip(keys, packed.tolist()))


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise max over ranks, in place; returns ``tensor``."""
    if get_world_size() > 1:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Picklable ``obj`` from every rank, in rank order."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP-wrap ``model`` when ``info.world_size > 1``; otherwise return it unchanged."""
    if not info.distributed:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module inside DDP, so state dicts never carry DDP's ``module.`` prefix."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def cleanup() -> None:
    """Leave the process group (safe to call when none exists)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
