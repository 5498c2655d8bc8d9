"""torch.distributed glue: who am I, which device is mine, sums across ranks, and stopping together.

Launch with `torchrun --nproc_per_node=N -m trainer run ...`; torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK. Without them everything here is a single-process no-op.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from trainer.errors import TrainerError
from trainer.signals import StopSignals


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes on this node

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and prints; the others stay quiet."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks (in place, returned); identity for one process."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, value: object) -> object:
        """Rank 0's `value` on every rank (for choices made once, such as the run folder)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def collective_device(self) -> torch.device:
        """The device collectives run on: the rank's GPU under NCCL, else the CPU."""
        if dist.is_initialized() and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Copy rank 0's buffers (batch-norm statistics) to every rank, so all ranks evaluate one model."""
        if self.enabled:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)


def data_parallel(model: torch.nn.Module, device: torch.device, *, sync_bn: bool) -> torch.nn.Module:
    """`model` under DDP as the trainer runs it.

    Gradients are views into DDP's all-reduce buckets (`gradient_as_bucket_view`): no
    second copy of every gradient, no copy between them per step. Buffers are broadcast
    from rank 0 before each forward unless SyncBatchNorm already keeps the running
    statistics the same on every rank (`sync_bn`), where that broadcast is wasted traffic.
    """
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True,
                                                     broadcast_buffers=not sync_bn)


def stop_check(ctx: DistContext, signals: StopSignals, every: int) -> Callable[[int], bool]:
    """`stop_requested(step)` for the training loop: whether a stop signal arrived, the same answer on every rank.

    Ranks must stop at the same step, so under DDP they agree every `every` steps (one tiny
    all-reduce); one process answers at once.
    """
    if not ctx.enabled:
        return lambda _step: signals.received is not None

    def agreed(step_index: int) -> bool:
        if (step_index + 1) % every:
            return False
        flag = torch.tensor([1.0 if signals.received is not None else 0.0])
        return bool(ctx.all_reduce(flag.to(ctx.collective_device)).item() > 0)

    return agreed


def env_context() -> DistContext:
    """Rank, world size and local rank from torchrun's environment (single process without it)."""
    try:
        return DistContext(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                           int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    except ValueError:
        raise TrainerError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers (set by torchrun)") \
            from None


def rank_device(choice: str, ctx: DistContext, gpus: int) -> torch.device:
    """The device `--device` `choice` means for this rank on a node with `gpus` CUDA devices (no CUDA call).

    auto: this rank's GPU when there is one, else the CPU; cuda: the GPU of this rank's
    LOCAL_RANK; cuda:N: GPU N, refused when several processes on this node would all take
    it (NCCL refuses ranks that share a GPU, at init, with a long traceback per rank).
    Every refusal is one line, raised before any process group exists.
    """
    if choice == "auto":
        choice = "cuda" if gpus else "cpu"
    device = torch.device(choice)
    if device.type != "cuda":
        return device
    if gpus == 0:
        raise TrainerError(f"--device {choice}: CUDA is not available on this machine; use --device cpu")
    processes = ctx.local_world_size
    if processes > gpus:
        raise TrainerError(f"--device {choice}: {processes} processes on this node but {gpus} GPU(s); "
                           f"run at most {gpus} (one per GPU)")
    if device.index is None:
        return torch.device("cuda", ctx.local_rank)
    if processes > 1:
        raise TrainerError(f"--device {choice} would put all {processes} processes of this node on GPU "
                           f"{device.index}; pass --device cuda (each process takes the GPU of its LOCAL_RANK)")
    if device.index >= gpus:
        raise TrainerError(f"--device {choice}: this machine has {gpus} GPU(s), numbered from 0")
    return device


def resolve_device(choice: str, ctx: DistContext) -> torch.device:
    """`--device` for this rank (`rank_device`), made the current CUDA device when it is one."""
    device = rank_device(choice, ctx, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def init_process_group(ctx: DistContext, device: torch.device, timeout_s: float = 600.0) -> None:
    """NCCL on CUDA, gloo on the CPU; a no-op for one process."""
    if ctx.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=ctx.rank, world_size=ctx.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)


def destroy_process_group() -> None:
    """Leave the process group, if one was made."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
