"""TensorBoard logging for `trainer run --tensorboard`: scalars and one picture in OUT/tb/, written by rank 0.

Tags: `step/loss` and `step/lr` at the loop's syncs: every `--log-every` steps counted
across epochs, and the first step of each epoch (x: global step, from 0); `epoch/<key>`
for every number of a metrics.jsonl record (x: epoch, counted from 1), and
`train/batch`, the training batch of the run's first step with normalization undone.
Step values arrive through the loop's `on_log` hook, at the host sync the progress line
already makes, so logging adds no sync of its own.
"""
from __future__ import annotations

import math
import weakref
from pathlib import Path
from typing import Any

import torch

from dali_pipes import PipelineSpec
from trainer.extras import require

IMAGES_SHOWN = 16


class TensorBoardLogger:
    """A `SummaryWriter` on `log_dir` plus what it needs to place steps and undo normalization."""

    def __init__(self, log_dir: Path, spec: PipelineSpec, steps_per_epoch: int) -> None:
        require("tensorboard", "tb", "--tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        # Closed (and flushed) when the logger is dropped or the interpreter exits, whichever
        # comes first: a run that stops on a signal or an error keeps its last steps.
        weakref.finalize(self, self.writer.close)
        self.spec = spec
        self.steps_per_epoch = steps_per_epoch
        self.batch_written = False

    def on_log(self, global_step: int, values: dict[str, float], images: torch.Tensor) -> None:
        """The loop's hook (`StepConfig.on_log`): step scalars, and the picture of the first logged batch of epoch 1
        (the run's first step, which the loop always syncs)."""
        for key, value in values.items():
            self.writer.add_scalar(f"step/{key}", value, global_step)
        if global_step < self.steps_per_epoch and not self.batch_written:
            shown = unnormalize(images[:IMAGES_SHOWN], self.spec)
            self.writer.add_images("train/batch", shown, global_step, dataformats="NCHW")
            self.batch_written = True

    def log_epoch(self, number: int, record: dict[str, Any]) -> None:
        """Every number of an epoch record (the metrics.jsonl line) as `epoch/<key>` at x = `number`; then flush."""
        for key, value in record.items():
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if key != "epoch" and is_number and math.isfinite(value):
                self.writer.add_scalar(f"epoch/{key}", value, number)
        self.writer.flush()


def unnormalize(images: torch.Tensor, spec: PipelineSpec) -> torch.Tensor:
    """Model inputs (normalized by `spec`) back to [0, 1] RGB on the CPU, N x 3 x S x S."""
    mean = torch.tensor(spec.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp_(0.0, 1.0).contiguous().cpu()


def open_tensorboard(enabled: bool, log_dir: Path, spec: PipelineSpec,
                     steps_per_epoch: int) -> TensorBoardLogger | None:
    """A logger when `enabled` (--tensorboard on rank 0), else None."""
    return TensorBoardLogger(log_dir, spec, steps_per_epoch) if enabled else None
