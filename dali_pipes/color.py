"""Colour jitter on a batch, on its device: torchvision's `ColorJitter` brightness, contrast and saturation.

Each of the three is a blend `f x + (1 - f) ref`, clamped to [0, bound], with a factor f
per sample uniform in [max(0, 1 - strength), 1 + strength], as torchvision's
`adjust_brightness/contrast/saturation` define them: ref is black for brightness, the
mean of the image's luma for contrast, and each pixel's luma for saturation (ITU-R 601
weights 0.2989, 0.587, 0.114).

The order of the three is drawn per sample, as `ColorJitter` draws a permutation per
call: the clamps make the operations non-commuting, so a fixed order would be a
different augmentation than torchvision's. Writing each stage as one blend whose
reference is picked per sample (black, mean luma or luma) makes the random order cost
one luma per stage, no per-sample branches. A strength of 0 gives f = 1, the identity.
Hue is not offered.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# Per sample: the brightness, contrast and saturation factors' uniforms, then three that order the operations.
DRAWS = 6
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2
LUMA = (0.2989, 0.587, 0.114)


def jitter_parameters(strengths: Sequence[float], draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample factors (N x 3 float32: brightness, contrast, saturation) and order (N x 3 int64).

    `strengths` is (B, C, S) as `--color-jitter B,C,S`; `draws` N x `DRAWS` uniforms.
    Row j of the order lists the operations (`BRIGHTNESS`, ...) sample j applies, first
    to last: the argsort of three uniforms, a uniformly random permutation.
    """
    strengths = np.asarray(strengths, dtype=np.float64)
    if strengths.shape != (3,) or (strengths < 0).any():
        raise ValueError(f"colour jitter needs three non-negative strengths B,C,S, got {strengths.tolist()}")
    draws = np.asarray(draws, dtype=np.float64)
    low, high = np.maximum(0.0, 1.0 - strengths), 1.0 + strengths
    factors = low + (high - low) * draws[:, :3]
    return factors.astype(np.float32), np.argsort(draws[:, 3:6], axis=1)


def luma(images: torch.Tensor) -> torch.Tensor:
    """N x 1 x H x W grey values of N x 3 x H x W RGB images (torchvision's `rgb_to_grayscale`, unrounded)."""
    r, g, b = images.unbind(dim=1)
    return (r * LUMA[0] + g * LUMA[1] + b * LUMA[2]).unsqueeze(1)


def color_jitter(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, bound: float = 1.0) -> torch.Tensor:
    """`images` (float N x 3 x H x W in [0, bound], any device) jittered per sample; a new tensor.

    `factors` and `order` are `jitter_parameters`' arrays as tensors on the images' device
    (copied there without blocking, e.g. `device.host_to_device`), so nothing here waits
    for the device. `bound` is 1 for [0, 1] images, 255 for pixel values.
    """
    factors = factors.to(images.dtype)
    for stage in range(3):
        op = order[:, stage].view(-1, 1, 1, 1)
        factor = factors.gather(1, order[:, stage:stage + 1]).view(-1, 1, 1, 1)
        grey = luma(images)
        reference = torch.where(op == SATURATION, grey, grey.mean(dim=(2, 3), keepdim=True) * (op == CONTRAST))
        images = (images * factor + reference * (1.0 - factor)).clamp_(0.0, bound)
    return images
