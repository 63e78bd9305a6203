"""Distributed helpers: init from the torchrun environment, rank helpers, sharded batches, SyncBN.

Every stage runs unchanged under ``torchrun --nproc-per-node N -m bissl.cli ...``: gloo on CPU,
nccl on GPU. Batch sizes in the config are *global*; each rank processes ``batch / world``.
Only rank 0 writes files; evaluation runs on rank 0 and its result is broadcast.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data.distributed import DistributedSampler

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Process placement: rank, world size and the device this process uses."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes files and prints)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def resolve_device(preference: Literal["auto", "cpu", "cuda"], local_rank: int = 0) -> torch.device:
    """Device for this process; "cuda" without a GPU raises :class:`bissl.config.ConfigError`."""
    if preference == "cuda" and not torch.cuda.is_available():
        from bissl.config import ConfigError

        raise ConfigError("device: 'cuda' requested but no CUDA device is visible. "
                          "Fix: --set device=cpu (or auto)")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(preference: Literal["auto", "cpu", "cuda"] = "auto") -> DistInfo:
    """Initialise torch.distributed from torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK) if set.

    Without those variables (plain ``python``/``bissl``) returns a single-process DistInfo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(preference, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if this module created one."""
    if info.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Synchronise all ranks (no-op when single-process)."""
    if info.distributed:
        dist.barrier()


def broadcast_object(info: DistInfo, obj: T) -> T:
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    if not info.distributed:
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(info: DistInfo, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and broadcast its result to all ranks."""
    result = fn() if info.is_main else None
    return broadcast_object(info, result)  # type: ignore[arg-type]


def epoch_batches(num_items: int, global_batch: int, *, epoch: int, seed: int, info: DistInfo,
                  shuffle: bool = True, drop_last: bool = True) -> list[list[int]]:
    """This rank's index batches for one epoch: deterministic in (seed, epoch), resumable.

    Uses :class:`DistributedSampler` for the per-epoch permutation and the rank sharding, then
    cuts the rank's indices into batches of ``global_batch // world_size``. Because the list is
    a pure function of (seed, epoch), a resumed run skips exactly the batches already done.

    Returns:
        List of index lists, each of length ``global_batch // world_size``.
    """
    local_batch = global_batch // info.world_size
    if local_batch < 1:
        raise ValueError(f"batch_size {global_batch} is smaller than the world size {info.world_size}")
    sampler = DistributedSampler(range(num_items), num_replicas=info.world_size, rank=info.rank,
                                 shuffle=shuffle, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    stop = len(indices) - len(indices) % local_batch if drop_last else len(indices)
    return [indices[i:i + local_batch] for i in range(0, stop, local_batch)]


def average_gradients(params: list[nn.Parameter], info: DistInfo) -> None:
    """Replace every ``p.grad`` by its mean over ranks (what DDP does, in one collective).

    Used where the forward is a functional call (:mod:`bissl.pretext_loss`) rather than a
    DDP-wrapped module. Parameters without a gradient are skipped.
    """
    if not info.distributed:
        return
    import hypergrad

    with_grad = {str(i): p for i, p in enumerate(params) if p.grad is not None}
    mean = hypergrad.all_reduce_mean({k: p.grad for k, p in with_grad.items()})  # type: ignore[misc]
    for k, p in with_grad.items():
        p.grad = mean[k]


def prepare_model(model: nn.Module, info: DistInfo, *, sync_bn: bool) -> tuple[nn.Module, nn.Module]:
    """Move to the device, convert BN to SyncBN (GPU only) and wrap in DDP when distributed.

    SyncBN has no CPU kernel in torch (it raises on CPU tensors), so on CPU each rank keeps
    its local BN statistics.

    Returns:
        (wrapped model used for training, the bare module whose state dict is saved).
    """
    model = model.to(info.device)
    if not info.distributed:
        return model, model
    if sync_bn and info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [info.device.index] if info.device.type == "cuda" else None
    wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return wrapped, model
