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
                           int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise TrainerError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") from None


def resolve_device(choice: str, ctx: DistContext) -> torch.device:
    """`--device`: auto is this rank's GPU when CUDA is available, else the CPU."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(choice)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainerError(f"--device {choice}: CUDA is not available on this machine; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", ctx.local_rank % torch.cuda.device_count())
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
