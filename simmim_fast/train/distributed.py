"""Devices and processes: torchrun detection, gloo/nccl, DDP or FSDP2 wrapping, collective helpers; XLA's
SPMD runtime (one process per host, ``xla_spmd``)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    devices_per_process: int = 1  # > 1 under XLA SPMD: the process feeds all its host's devices
    spmd: bool = False  # XLA SPMD: one program over every process; no process group, no DDP

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Processes that exchange values through torch.distributed (not XLA SPMD's, whose compiled
        program holds the collectives)."""
        return self.world_size > 1 and not self.spmd

    @property
    def is_xla(self) -> bool:
        return self.device.type == "xla"


def resolve_device(choice: str, local_rank: int) -> torch.device:
    if choice == "xla":
        try:
            import torch_xla  # noqa: F401  (an optional dependency: is it installed?)
        except ImportError as error:
            raise ValueError(f"--device xla needs torch_xla ({error}); use --device auto, cpu or cuda") from None

        return torch.device("xla")  # xla_spmd.start turns on SPMD before the runtime hands out its device
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but torch sees no CUDA device; use --device auto or cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if choice not in ("auto", "cpu"):
        raise ValueError(f"--device must be auto, cpu, cuda or xla, got {choice!r}")
    return torch.device("cpu")


def start(device_choice: str) -> Runtime:
    """One process, or one of torchrun's (WORLD_SIZE > 1): then the process group is started here."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_choice, local_rank)
    if device.type == "xla":
        from . import xla_spmd

        return xla_spmd.start(local_rank)
    if world_size == 1:
        return Runtime(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, rank=dist.get_rank(), world_size=world_size, local_rank=local_rank)


def stop(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, runtime: Runtime, fsdp: bool) -> nn.Module:
    """DDP (the default) or FSDP2 (``fully_shard`` per transformer block, then the whole model)."""
    if fsdp:
        if not runtime.distributed:
            raise ValueError("--fsdp needs several processes (torchrun --nproc_per_node=N ...)")
        from torch.distributed.fsdp import fully_shard

        from ..models.swin import SwinTransformerBlock
        from ..models.vit import Block

        for module in model.modules():
            if isinstance(module, (Block, SwinTransformerBlock)):
                fully_shard(module)
        fully_shard(model)
        return model
    if not runtime.distributed:
        return model
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def mean_across(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= runtime.world_size
    return value


def sum_across(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        value = value.clone()
        dist.all_reduce(value)
    return value


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()
