"""The batch-level training augmentations: colour jitter and random erasing, drawn on the host, applied on the device.

`batch_augmentation(spec, seed, epoch, indices)` reads each sample's own uniforms
(`draws.COLOR`, `draws.ERASE`), so a sample's parameters depend on (seed, epoch, index)
alone, as its geometry does, whichever backend, worker or rank made the batch. Every
backend draws them where it draws the warp matrices and hands them to
`loader.to_model_input`, which applies them to the warped batch on its device in
torchvision's order: colour jitter on the pixel values (before normalization, as
`ColorJitter` comes before `ToTensor`), then normalization, then random erasing with
value 0, the mean colour (after `Normalize`, as `RandomErasing`'s documentation places it).
The parameters are a few numbers per sample, shipped with `device.host_to_device`, so
nothing here waits for the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import draws
from .color import color_jitter, jitter_parameters
from .device import host_to_device
from .erasing import erase, erasing_boxes
from .spec import PipelineSpec


@dataclass(frozen=True)
class BatchAugmentation:
    """One batch's colour-jitter factors and order (N x 3 each) and erasing boxes (N x 4); None: not applied."""

    factors: torch.Tensor | None = None
    order: torch.Tensor | None = None
    boxes: torch.Tensor | None = None

    def to(self, device: torch.device) -> "BatchAugmentation":
        """The same parameters on `device`, copied without blocking the host."""
        return BatchAugmentation(*(None if t is None else host_to_device(t, device)
                                   for t in (self.factors, self.order, self.boxes)))

    def select(self, keep: np.ndarray) -> "BatchAugmentation":
        """The rows of the samples `keep` (a boolean mask) leaves in a batch that lost unreadable samples."""
        rows = torch.from_numpy(np.flatnonzero(keep))
        return BatchAugmentation(*(None if t is None else t[rows] for t in (self.factors, self.order, self.boxes)))

    def jitter(self, pixels: torch.Tensor) -> torch.Tensor:
        """Float N x 3 x H x W pixel values in [0, 255], colour-jittered (the same tensor when there is no jitter)."""
        if self.factors is None:
            return pixels
        return color_jitter(pixels, self.factors, self.order, bound=255.0)

    def erase(self, normalized: torch.Tensor) -> torch.Tensor:
        """A normalized batch with each sample's box set to 0 (the same tensor when nothing is erased)."""
        return normalized if self.boxes is None else erase(normalized, self.boxes, 0.0)


def batch_augmentation(spec: PipelineSpec, seed: int, epoch: int, indices: np.ndarray) -> BatchAugmentation | None:
    """The colour jitter and erasing of training samples `indices` (pack indices) in `epoch`, on the host.

    None when `spec` asks for neither. The erasing boxes are drawn for the
    `spec.image_size` x `spec.image_size` output.
    """
    if not spec.batch_augmented:
        return None
    u_color, u_erase = draws.sample_draws(seed, epoch, np.asarray(indices), draws.COLOR, draws.ERASE)
    factors = order = boxes = None
    if any(spec.color_jitter):
        factors_np, order_np = jitter_parameters(spec.color_jitter, u_color)
        factors, order = torch.from_numpy(factors_np), torch.from_numpy(order_np)
    if spec.random_erasing > 0:
        size = spec.image_size
        # float32 holds these whole pixel counts exactly, at half the bytes.
        boxes = torch.from_numpy(erasing_boxes(size, size, spec.random_erasing, u_erase).astype(np.float32))
    return BatchAugmentation(factors, order, boxes)
