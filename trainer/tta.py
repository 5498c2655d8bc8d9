"""Test-time augmentation (`--tta`): each image seen as it is and mirrored, the two answers fused.

Logits are averaged (FFCV's and timm's flip TTA). Embeddings are fused as insightface
fuses an image and its flip: the sum of the two L2-normalized embeddings (the caller
normalizes the sum again). "none" leaves the model as it is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import TTA_MODES
from trainer.errors import TrainerError
from trainer.models import embed


def _check(tta: str) -> None:
    if tta not in TTA_MODES:
        raise TrainerError(f"unknown test-time augmentation {tta!r}; use one of {', '.join(TTA_MODES)}")


def mirrored(images: torch.Tensor) -> torch.Tensor:
    """N x C x H x W images flipped left to right, in the batch's memory format."""
    return images.flip(-1).contiguous(memory_format=torch.channels_last if images.is_contiguous(
        memory_format=torch.channels_last) else torch.contiguous_format)


class FlipAverage(nn.Module):
    """`model` whose logits are the mean of its logits for each image and for its mirror."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.model(images) + self.model(mirrored(images))) / 2


def with_tta(model: nn.Module, tta: str) -> nn.Module:
    """The model that `tta` makes of `model` for logits: itself ("none") or a `FlipAverage` ("flip")."""
    _check(tta)
    return FlipAverage(model) if tta == "flip" else model


def tta_embed(model: nn.Module, images: torch.Tensor, tta: str) -> torch.Tensor:
    """Embeddings of `images` (not normalized): `models.embed`'s, or with "flip" the sum of the image's and its
    mirror's L2-normalized embeddings."""
    _check(tta)
    if tta == "none":
        return embed(model, images)
    return F.normalize(embed(model, images).float(), dim=1) + F.normalize(embed(model, mirrored(images)).float(), dim=1)
