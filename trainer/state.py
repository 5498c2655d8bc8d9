"""The training state: everything that changes while a run trains and goes into its checkpoints.

`build_state` makes it from a `RunConfig` (model with its head, optimizer, scaler, early
stopping, plateau tracker, the averaged weights with `--ema`); `TrainingState.payload`
turns it into a checkpoint's contents (a sharded head's rows gathered whole, `sharded_state`).
Restoring it from a checkpoint is `trainer.resume`'s.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dali_pipes import PipelineSpec
from trainer.checkpoint import make_payload
from trainer.checks import check_freeze, check_sharded_head, check_sync_bn
from trainer.config import RunConfig
from trainer.ema import ModelEma
from trainer.loop import resolve_amp
from trainer.models import HeadConfig, build_model, freeze_blocks, sharded_rate
from trainer.monitor import EarlyStopping, monitor_mode
from trainer.optim import Plateau, build_optimizer
from trainer.partial_fc import sharded
from trainer.sharded_state import gather_state


@dataclass
class TrainingState:
    """Everything that changes during training and goes into a checkpoint."""

    model: nn.Module
    head: HeadConfig
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    early: EarlyStopping
    plateau: Plateau
    frozen: list[nn.Module]
    schedule_epochs: int  # the length the learning-rate schedule was planned for (see `trainer.resume.schedule`)
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl: "epoch" counts from 1
    next_epoch: int = 0  # 0-based index of the next epoch to train
    ema: ModelEma | None = None  # the averaged weights (--ema), updated after every optimizer step

    @property
    def sharded(self) -> bool:
        """Whether the model's head is sharded over the ranks: then `payload` is a collective, every rank calls it."""
        return bool(sharded(self.model))

    def payload(self, cfg: RunConfig, classes: list[str], spec: PipelineSpec, epoch: int,
                position: dict[str, Any] | None = None, trained_classes: list[str] | None = None,
                weights: str = "raw") -> dict[str, Any]:
        """The checkpoint after epoch index `epoch` completed, and `position` into the next (a mid-epoch stop).

        `trained_classes`: those of `classes` with training images (None: all). Its `model` is
        the trained weights, or with `weights` "ema" the averaged ones (a best.pt). A sharded
        head's centres and their optimizer state are gathered whole into rank 0's payload
        (copies); every other tensor is the live one `state_dict()` returns, so write the
        payload before the next step.
        """
        scheduler = {"name": cfg.scheduler, "plateau": self.plateau.state_dict(), "epochs": self.schedule_epochs}
        ema = None if self.ema is None else self.ema.state_dict()
        model = self.ema.module if weights == "ema" and self.ema is not None else self.model
        payload = make_payload(model=model, optimizer=self.optimizer, scaler=self.scaler, scheduler=scheduler,
                               early_stopping=self.early.state_dict(), epoch=epoch, config=cfg.to_dict(),
                               head=self.head.to_dict(), classes=classes, spec=spec.to_dict(),
                               metrics=self.records[-1] if self.records else {}, position=position,
                               trained_classes=trained_classes, ema=ema,
                               model_weights="ema" if model is not self.model else "raw")
        payload["model"], payload["optimizer"] = gather_state(self.model, self.optimizer, payload["model"],
                                                              payload["optimizer"])
        return payload


def build_state(cfg: RunConfig, num_classes: int, device: torch.device, distributed: bool = False,
                amp_dtype: torch.dtype | None | str = "auto") -> TrainingState:
    """Model (with head, weights, frozen blocks), optimizer, scaler and stopping state.

    `amp_dtype` is the run's resolved autocast dtype ("auto": resolve `cfg.amp` here).
    """
    torch.manual_seed(cfg.seed)
    head = HeadConfig.from_run(cfg)
    check_sharded_head(cfg, distributed)
    model = build_model(cfg.arch, num_classes, weights=cfg.weights, head=head,
                        sample_rate=sharded_rate(head, cfg.sample_rate, distributed))
    if cfg.sync_bn and distributed:
        check_sync_bn(cfg.sync_bn, device.type)
        # Same parameters and state-dict keys; converted before freezing so frozen blocks hold the new modules.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    frozen = freeze_blocks(model, cfg.freeze)
    check_freeze(cfg, frozen)
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, device)
    if isinstance(amp_dtype, str):
        amp_dtype = resolve_amp(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    early = EarlyStopping(cfg.monitor, cfg.patience, cfg.min_delta)
    plateau = Plateau(monitor_mode(cfg.monitor), cfg.step_size, cfg.gamma)
    ema = ModelEma(model, cfg.ema) if cfg.ema > 0 else None
    return TrainingState(model, head, optimizer, scaler, early, plateau, frozen, schedule_epochs=cfg.epochs, ema=ema)
