"""Mixup and CutMix on the device, as timm's `Mixup` in batch mode, with soft targets.

One draw per batch: with probability `prob` the batch is mixed with itself reversed
(sample j with sample N-1-j), by mixup (x lam + x_reversed (1 - lam)) or, when both are
on, by CutMix with probability `switch_prob` (a box of the reversed batch pasted in),
lam ~ Beta(alpha, alpha). CutMix's box is timm's: sides sqrt(1 - lam) of the image's,
centred on a uniform pixel and cut by the borders, and lam becomes the share of the
image left outside the box. Targets are one-hot with label smoothing folded in (off
value smoothing / classes, on value 1 - smoothing + off), mixed with the same lam.

The draw is made on the host from `np.random.default_rng((seed, epoch, step, _STREAM))`,
so it depends on nothing but the step (an interrupted run mixes the same way after
resume) and is the same on every rank. lam and the box are host numbers: the device
work is a scalar blend or a slice copy, with no host sync.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# A fourth entropy word that no per-sample stream (seed, epoch, index) has, so these draws stay independent of them.
_STREAM = 0x6D6978


@dataclass(frozen=True)
class MixConfig:
    """`--mixup ALPHA`, `--cutmix ALPHA`, `--mix-prob P`, and how often CutMix is picked when both are on."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError("mixup and cutmix alphas must be >= 0")
        if not (0.0 <= self.prob <= 1.0 and 0.0 <= self.switch_prob <= 1.0):
            raise ValueError("mix probabilities must be in [0, 1]")

    @property
    def enabled(self) -> bool:
        """Whether any mixing is asked for."""
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0


@dataclass(frozen=True)
class MixDraw:
    """One batch's mixing: the weight `lam` of the batch itself, and CutMix's box (top, bottom, left, right) or None."""

    lam: float = 1.0
    box: tuple[int, int, int, int] | None = None


def draw_mix(config: MixConfig, seed: int, epoch: int, step: int, height: int, width: int) -> MixDraw:
    """The mixing of step `step` of epoch `epoch` for height x width images, drawn as timm draws it."""
    if not config.enabled:
        return MixDraw()
    rng = np.random.default_rng((seed, epoch, step, _STREAM))
    if rng.random() >= config.prob:
        return MixDraw()
    cutmix = config.cutmix_alpha > 0 and (config.mixup_alpha <= 0 or rng.random() < config.switch_prob)
    alpha = config.cutmix_alpha if cutmix else config.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    return cutmix_box(lam, height, width, rng.random(), rng.random()) if cutmix else MixDraw(lam)


def cutmix_box(lam: float, height: int, width: int, u_row: float, u_col: float) -> MixDraw:
    """timm's CutMix box for `lam`, centred on the pixel the uniforms pick, and lam corrected to its true area."""
    cut = math.sqrt(1.0 - lam)
    half_h, half_w = int(height * cut) // 2, int(width * cut) // 2
    row, col = int(u_row * height), int(u_col * width)
    top, bottom = max(row - half_h, 0), min(row + half_h, height)
    left, right = max(col - half_w, 0), min(col + half_w, width)
    return MixDraw(1.0 - (bottom - top) * (right - left) / (height * width), (top, bottom, left, right))


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """N x num_classes float targets: smoothing / num_classes everywhere, 1 - smoothing + that at the label."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def mix_batch(images: torch.Tensor, labels: torch.Tensor, num_classes: int, draw: MixDraw,
              smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mixed images, soft targets, top-1 labels) for one batch; `images` is left untouched.

    The top-1 labels are each sample's larger component (weight >= 0.5), what train
    top-1 is counted against.
    """
    targets = smoothed_one_hot(labels, num_classes, smoothing)
    if draw.lam == 1.0:
        return images, targets, labels
    if draw.box is not None:
        top, bottom, left, right = draw.box
        mixed = images.clone()
        mixed[:, :, top:bottom, left:right] = images[:, :, top:bottom, left:right].flip(0)
    else:
        mixed = images * draw.lam + images.flip(0) * (1.0 - draw.lam)
    targets = targets * draw.lam + targets.flip(0) * (1.0 - draw.lam)
    return mixed, targets, labels if draw.lam >= 0.5 else labels.flip(0)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k targets_k log softmax(logits)_k."""
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
