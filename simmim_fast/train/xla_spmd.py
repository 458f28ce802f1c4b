"""Training on XLA devices (TPUs; the CPU device stands in for tests): SPMD data parallelism over every
device, and what the XLA path needs beside the shared engine.

One process per host drives all of that host's devices (``xr.use_spmd()``): the step is written for one
device, the batch dimension of the inputs is sharded over a 1-D mesh axis ``'data'`` spanning every device
of every host, and XLA's partitioner inserts the gradient all-reduces into the compiled step. Parameters and
optimizer state stay replicated, so a checkpoint is process 0's copy.

The inputs of an optimizer step travel as one item of torch_xla's ``ParallelLoader``: a host thread stacks
the step's micro-batches (uint8 pixels, ``(batch, accumulation, 3, S, S)``) and masks and copies them with
the 'data' sharding while the devices run the previous step. Several hosts (a pod slice): each process loads
its share (``EpochSampler`` splits by process), the ShardingSpec's ``minibatch`` mode assembles the global
batch from the per-host pieces.

Nothing here reads a device value during a step: the finite flag of the run (no NaN/inf loss or gradient
norm so far) is computed inside the step's graph and read once, with the state, when a checkpoint is saved.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.utils._pytree as pytree

DATA_AXIS = "data"
MATMUL_PRECISIONS = ("default", "high", "highest")


def start(local_rank: int):
    """The XLA runtime in SPMD mode: one process per host, every device of the slice in one mesh."""
    import torch_xla
    import torch_xla.runtime as xr

    from .distributed import Runtime

    xr.use_spmd()  # before any device tensor: from now on torch_xla.device() is the virtual SPMD device
    return Runtime(torch_xla.device(), rank=xr.process_index(), world_size=xr.process_count(),
                   local_rank=local_rank, devices_per_process=xr.addressable_runtime_device_count(), spmd=True)


def on_tpu() -> bool:
    import torch_xla.runtime as xr

    return xr.device_type() == "TPU"


def default_amp() -> Optional[torch.dtype]:
    """--amp auto on XLA: bf16 on TPUs (their native type), full precision on other XLA devices (the CPU
    stand-in, where bf16 is only slower and less exact)."""
    return torch.bfloat16 if on_tpu() else None


def set_matmul_precision(precision: Optional[str]) -> None:
    """fp32 matmuls and convolutions: 'default' = one bf16 pass on TPUs, 'high' = 3 passes, 'highest' =
    full fp32 (for parity checks against a GPU or the CPU)."""
    if precision is None:
        return
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"--xla-matmul-precision must be one of {', '.join(MATMUL_PRECISIONS)}, got {precision!r}")
    import torch_xla.backends

    torch_xla.backends.set_mat_mul_precision(precision)


def seed(value: int) -> None:
    """XLA's generator (drop path, dropout on the device), which ``torch.manual_seed`` does not reach. Under
    SPMD one program spans every process, so every process seeds it alike (the run's seed)."""
    import torch_xla.core.xla_model as xm

    xm.set_rng_state(value)


def rng_state() -> int:
    """XLA's generator state (a host integer after a sync: reading it moves nothing off the device)."""
    import torch_xla.core.xla_model as xm

    return int(xm.get_rng_state())


def restore_rng(state: int) -> None:
    seed(state)


def check_options(options) -> None:
    """Refuse what the XLA path does not do, in one line."""
    if options.compile:
        raise ValueError("--compile uses Inductor, which does not take XLA tensors; on XLA the whole step is "
                         "already one compiled XLA graph: drop --compile")
    if options.fsdp:
        raise ValueError("--fsdp is for torchrun on CUDA/CPU; on XLA the batch is sharded over every device "
                         "(SPMD data parallelism): drop --fsdp")


def batched_to_cpu(tree: Any) -> Any:
    """``tree`` with every XLA tensor copied to the CPU in one batched transfer (instead of one per tensor)."""
    import torch_xla

    leaves, spec = pytree.tree_flatten(tree)
    on_device = [index for index, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)
                 and leaf.device.type == "xla"]
    copies = torch_xla._XLAC._xla_get_cpu_tensors([leaves[index].detach() for index in on_device])
    for index, copy in zip(on_device, copies):
        leaves[index] = copy
    return pytree.tree_unflatten(leaves, spec)


@dataclass
class HostStep:
    """What the loop needs of a step besides its device tensors: the epoch its samples belong to and the
    indices of unreadable files met while loading it."""

    epoch: int
    unreadable: List[int]


def host_steps(run, keys: Tuple[str, ...], extra: Callable[[int, int], Dict[str, torch.Tensor]] = lambda *_: {}):
    """The source of XLA's parallel loader for the loop ``run`` (a ``TrainingSteps``), from its saved position
    on: per optimizer step, the CPU tensors ``keys`` of its micro-batches stacked on dimension 1 (batch,
    accumulation, ...) plus ``extra(epoch, step in epoch)``, and the step's ``HostStep``."""
    epoch, samples = run.epoch, run.samples_into_epoch
    micro_batches = run._epoch_batches()
    while True:
        step = [next(micro_batches) for _ in range(run.accumulation)]  # an epoch holds whole steps
        if step[0][0] != epoch:
            epoch, samples = step[0][0], 0
        batches = [batch for _, batch in step]
        tensors = {key: torch.stack([batch[key] for batch in batches], 1) for key in keys}
        tensors.update(extra(epoch, samples // run.images_per_step))
        unreadable = [index for batch in batches if "unreadable" in batch
                      for index in batch["unreadable"][batch["unreadable"] >= 0].tolist()]
        yield tensors, HostStep(epoch, unreadable)
        samples += run.images_per_step


class XlaTraining:
    """The SPMD mesh, the sharded input stream and the run's finite flag for a loop on ``runtime``."""

    def __init__(self, runtime, options):
        import torch_xla.distributed.spmd as xs
        import torch_xla.runtime as xr

        set_matmul_precision(getattr(options, "xla_matmul_precision", None))
        self.runtime = runtime
        devices = xr.global_runtime_device_count()
        self.mesh = xs.Mesh(np.arange(devices), (devices,), (DATA_AXIS,))
        self.devices = devices
        # True until a step's loss or gradient norm is NaN/inf; stays on the device (part of each step's graph).
        self.finite = torch.ones((), dtype=torch.bool, device=runtime.device)
        self.loader = None

    def sharding(self, rank: int):
        """Batch dimension 0 on 'data', the rest whole; per-host pieces when there are several hosts."""
        import torch_xla.distributed.spmd as xs

        return xs.ShardingSpec(self.mesh, (DATA_AXIS,) + (None,) * (rank - 1),
                               minibatch=self.runtime.world_size > 1)

    def shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mark a device tensor's batch dimension as split over 'data' (inputs not from the parallel loader)."""
        import torch_xla.distributed.spmd as xs

        xs.mark_sharding(tensor, self.mesh, (DATA_AXIS,) + (None,) * (tensor.dim() - 1))
        return tensor

    def steps(self, host_steps: Iterable[Tuple[Dict[str, torch.Tensor], HostStep]],
              ranks: Dict[str, int]) -> Iterator[Tuple[Dict[str, torch.Tensor], HostStep]]:
        """(device tensors, HostStep) per optimizer step. ``host_steps`` yields each step's CPU tensors (their
        dimension counts in ``ranks``, batch first); torch_xla's ParallelLoader copies them, sharded, in a
        background thread a couple of steps ahead of the device."""
        import torch_xla.distributed.parallel_loader as pl

        pending: collections.deque = collections.deque()
        failure: List[BaseException] = []

        def tensors():
            try:
                for step_tensors, host in host_steps:
                    pending.append(host)  # before the tensors enter the loader's queue: the order is kept
                    yield step_tensors
            except Exception as error:  # the loader's thread would only print it and end the stream
                failure.append(error)

        self.loader = pl.ParallelLoader(tensors(), [self.runtime.device], loader_prefetch_size=2,
                                        device_prefetch_size=2,
                                        input_sharding={key: self.sharding(rank) for key, rank in ranks.items()})
        for step_tensors in self.loader.per_device_loader(self.runtime.device):
            yield step_tensors, pending.popleft()
        if failure:
            raise failure[0]
        raise RuntimeError("the input stream ended")  # it runs epoch after epoch: this is a bug

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()

    def note_step(self, result: Dict[str, Any]) -> None:
        """Fold this step's loss and gradient norm into the finite flag (device ops, no transfer)."""
        self.finite = self.finite & torch.isfinite(result["loss"]) & torch.isfinite(result["grad_norm"])

    def state_to_cpu(self, tree: Any) -> Any:
        """``tree`` on the CPU in one transfer that also carries the finite flag; raises for a state that may
        hold a NaN/inf, so no checkpoint ever does."""
        copied, finite = batched_to_cpu((tree, self.finite))
        if not bool(finite):
            from .engine import NonFiniteLossError

            raise NonFiniteLossError("a step since the start had a non-finite loss or gradient norm: the weights "
                                     "may hold NaN/inf, no checkpoint written; lower the LR or check the data")
        return copied
