"""Gradient accumulation: which micro-steps update the weights, how each loss is scaled, DDP's `no_sync`.

An epoch of B batches with `accum_steps` N is cut into groups of N consecutive batches
(the last group may be shorter); gradients add up over a group and the optimizer steps
at its last batch. Each batch's loss is divided by its group's length, so a group of N
equal batches of size b gives the gradient of one batch of N b. Under DDP the
gradients are all-reduced only at a group's last batch: the others run inside the
wrapper's `no_sync()`.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

from torch import nn


def group_length(step: int, accum_steps: int, batches: int) -> int:
    """How many batches the accumulation group of batch `step` (0-based, of `batches` in the epoch) holds."""
    start = step - step % accum_steps
    return min(start + accum_steps, batches) - start


def is_update_step(step: int, accum_steps: int, batches: int) -> bool:
    """Whether the optimizer steps after batch `step`: the last of its group."""
    return (step + 1) % accum_steps == 0 or step + 1 == batches


def optimizer_steps(batches: int, accum_steps: int) -> int:
    """Optimizer steps in an epoch of `batches` batches: what schedules and logs count."""
    return -(-batches // accum_steps)


def gradient_sync(model: nn.Module, sync: bool) -> ContextManager[object]:
    """`no_sync()` of the DDP wrapper inside `model` (under torch.compile too) unless `sync`; else a no-op."""
    while not sync:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None:
            break
        model = inner
    return nullcontext()
