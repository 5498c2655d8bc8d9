"""Optimizers and learning-rate schedules.

Schedules are pure functions of the (fractional) epoch, as nanoGPT's `get_lr(it)`, so a
resumed run needs no scheduler object to agree with an uninterrupted one; only
`plateau` depends on history, and its small state is checkpointed.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn

from trainer.models import parameter_groups
from trainer.monitor import Improvement

PLANNED_SCHEDULERS = ("cosine", "poly")  # the schedules that depend on the run's planned length
POLY_POWER = 2.0  # insightface arcface_torch's PolyScheduler


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float,
                    device: torch.device) -> torch.optim.Optimizer:
    """adam, adamw or sgd over the trainable parameters, weight decay only where p.ndim > 1."""
    groups = parameter_groups(model, weight_decay)
    if not groups:
        raise ValueError("no trainable parameters (is everything frozen?)")
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]
    kwargs: dict[str, Any] = {"lr": lr}
    if name == "sgd":
        kwargs.update(momentum=momentum, nesterov=momentum > 0)
    # Fused kernels on CUDA do the whole update in one launch; foreach elsewhere.
    if device.type == "cuda" and "fused" in inspect.signature(cls).parameters:
        kwargs["fused"] = True
    elif "foreach" in inspect.signature(cls).parameters:
        kwargs["foreach"] = True
    return cls(groups, **kwargs)


def lr_factor(scheduler: str, epoch: float, *, epochs: int, step_size: int, gamma: float, warmup_epochs: float,
              plateau_scale: float = 1.0) -> float:
    """Multiplier of the base learning rate at fractional `epoch` (0 = start of training).

    A linear warm-up from 0 over `warmup_epochs` multiplies every schedule. After it, cosine
    and poly run from 1 down to 0 at `epochs`: poly as (1 - t) ** 2 over the fraction t of the
    post-warm-up span, insightface's PolyScheduler for face recognition.
    """
    warm = min(1.0, (epoch + 1e-12) / warmup_epochs) if warmup_epochs > 0 else 1.0
    if scheduler in PLANNED_SCHEDULERS:
        span = max(epochs - warmup_epochs, 1e-12)
        t = min(max(epoch - warmup_epochs, 0.0) / span, 1.0)
        decay = 0.5 * (1.0 + math.cos(math.pi * t)) if scheduler == "cosine" else (1.0 - t) ** POLY_POWER
    elif scheduler == "step":
        decay = gamma ** math.floor(epoch / step_size)
    elif scheduler == "plateau":
        decay = plateau_scale
    elif scheduler == "none":
        decay = 1.0
    else:
        raise ValueError(f"unknown scheduler {scheduler!r}")
    return warm * decay


class Plateau:
    """Reduce-on-plateau: multiply the scale by `gamma` after `patience` epochs without improvement."""

    def __init__(self, mode: str = "min", patience: int = 10, gamma: float = 0.1) -> None:
        self.patience, self.gamma, self.scale = patience, gamma, 1.0
        self.tracker = Improvement(mode)

    def step(self, value: float) -> None:
        """Record one epoch's monitored value."""
        if not self.tracker.update(value) and self.tracker.bad_epochs >= self.patience:
            self.scale *= self.gamma
            self.tracker.bad_epochs = 0

    def state_dict(self) -> dict[str, Any]:
        """State for checkpoints: patience, gamma, scale and the tracker's mode, min_delta, best, bad_epochs."""
        return {"patience": self.patience, "gamma": self.gamma, "scale": self.scale, **self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict`."""
        self.patience, self.gamma, self.scale = state["patience"], state["gamma"], state["scale"]
        self.tracker.load_state_dict(state)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
