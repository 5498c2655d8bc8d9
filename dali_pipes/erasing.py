"""Random erasing on a normalized batch, on its device: torchvision's `RandomErasing`.

With probability p a sample gets a box of area fraction uniform in `scale` and aspect
ratio (height/width) log-uniform in `ratio`, up to `crop.TRIES` tries for one strictly
smaller than the image, placed uniformly; when no try fits the sample is left alone, as
torchvision does. The box is filled with `value` after normalization (0: the dataset's
mean colour, torchvision's default). Per-pixel random values (timm's 'pixel' mode) are
not offered: they would need a device random stream that is not keyed by (seed, epoch,
index), so a sample would no longer erase the same way in every backend and worker count.

The boxes come from per-sample uniforms on the host (a few numbers per sample), and the
device builds one boolean mask by broadcasting pixel coordinates against them: no
per-sample loop, no host sync.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .crop import TRIES, box_sides, first_fit, place

SCALE = (0.02, 0.33)
RATIO = (0.3, 3.3)
# Per sample: whether to erase, TRIES area and TRIES aspect-ratio uniforms, then the box's row and column.
DRAWS = 1 + 2 * TRIES + 2


def erasing_boxes(height: int, width: int, p: float, draws: np.ndarray, scale: Sequence[float] = SCALE,
                  ratio: Sequence[float] = RATIO) -> np.ndarray:
    """N x 4 float64 boxes (top, left, height, width) to erase in height x width images; 0 x 0 where none.

    `draws` is N x `DRAWS` uniforms: column 0 decides (erase when below p), then the
    tries' area and aspect-ratio uniforms, then the box's row and column.
    """
    draws = np.asarray(draws, dtype=np.float64)
    if draws.ndim != 2 or draws.shape[1] != DRAWS:
        raise ValueError(f"erasing_boxes needs N x {DRAWS} draws, got {draws.shape}")
    n = len(draws)
    # torchvision's erasing box is sqrt(a r) high and sqrt(a / r) wide (a crop box is the other way round).
    h, w = box_sides(np.full((n, 1), float(height * width)), scale, ratio, draws[:, 1:1 + TRIES],
                     draws[:, 1 + TRIES:1 + 2 * TRIES])
    chosen, found = first_fit((h < height) & (w < width))
    rows = np.arange(n)
    h, w = h[rows, chosen], w[rows, chosen]
    top = place(draws[:, 1 + 2 * TRIES], np.float64(height), h)
    left = place(draws[:, 2 + 2 * TRIES], np.float64(width), w)
    erase = found & (draws[:, 0] < p)
    return np.where(erase[:, None], np.stack([top, left, h, w], axis=1), 0.0)


def erase(images: torch.Tensor, boxes: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """`images` (N x C x H x W, any device) with each sample's box set to `value`; a new tensor.

    `boxes` is `erasing_boxes`' array as a tensor on the images' device.
    """
    height, width = images.shape[-2:]
    ys = torch.arange(height, device=images.device, dtype=boxes.dtype).view(1, -1, 1)
    xs = torch.arange(width, device=images.device, dtype=boxes.dtype).view(1, 1, -1)
    top, left, h, w = (column.view(-1, 1, 1) for column in boxes.unbind(dim=1))
    inside = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)
    return images.masked_fill(inside.unsqueeze(1), value)
