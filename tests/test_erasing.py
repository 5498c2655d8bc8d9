"""Batch random erasing against torchvision's documented `RandomErasing` and its own `erase`, sample by sample."""
from __future__ import annotations

import math

import numpy as np
import torch
from sync_audit import host_syncs_forbidden
from torchvision.transforms.v2 import functional as TF

from dali_pipes import draws
from dali_pipes.erasing import DRAWS, RATIO, SCALE, erase, erasing_boxes

TRIES = 10


def reference_params(height: int, width: int, p: float, u: np.ndarray, scale=SCALE, ratio=RATIO):
    """`RandomErasing`'s forward and `get_params`, written from their documentation, random numbers from `u`.

    None: the image is left alone (not chosen, or no try fitted).
    """
    if not u[0] < p:
        return None
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(TRIES):
        erase_area = area * (scale[0] + (scale[1] - scale[0]) * u[1 + attempt])
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1 + TRIES + attempt])
        h = int(round(math.sqrt(erase_area * aspect_ratio)))
        w = int(round(math.sqrt(erase_area / aspect_ratio)))
        if not (h < height and w < width):
            continue
        return int(u[1 + 2 * TRIES] * (height - h + 1)), int(u[2 + 2 * TRIES] * (width - w + 1)), h, w
    return None


def test_batch_erasing_equals_torchvision_per_sample() -> None:
    n, height, width = 200, 24, 20
    images = torch.randn(n, 3, height, width, generator=torch.Generator().manual_seed(0))
    (u,) = draws.sample_draws(11, 4, np.arange(n), draws.ERASE)
    boxes = erasing_boxes(height, width, 0.5, u)
    with host_syncs_forbidden():
        ours = erase(images.contiguous(memory_format=torch.channels_last), torch.from_numpy(boxes))
    expected = images.clone()
    erased = 0
    for j in range(n):
        params = reference_params(height, width, 0.5, u[j])
        if params is not None:
            expected[j] = TF.erase(images[j], *params, v=torch.zeros(3, 1, 1))
            erased += 1
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    assert 70 < erased < 130  # p = 0.5 of 200


def test_no_box_fits_and_p_zero_leave_images_alone() -> None:
    u = np.full((4, DRAWS), 0.5)
    u[:, 0] = 0.0
    # Area fraction 0.9 of a 4 x 4 image: every box is as large as the image, so no try fits.
    assert not erasing_boxes(4, 4, 1.0, u, scale=(0.9, 0.95)).any()
    assert not erasing_boxes(32, 32, 0.0, u).any()
    images = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(erase(images, torch.zeros(4, 4, dtype=torch.float64)), images, rtol=0, atol=0)


def test_erased_boxes_have_torchvisions_sizes() -> None:
    n = 4000
    (u,) = draws.sample_draws(0, 0, np.arange(n), draws.ERASE)
    top, left, h, w = erasing_boxes(64, 48, 1.0, u).T
    assert (top + h <= 64).all() and (left + w <= 48).all() and (h < 64).all() and (w < 48).all()
    # Rounded to whole pixels: half a pixel of slack on each side.
    fraction_low, fraction_high = (h - 0.5) * (w - 0.5) / (64 * 48), (h + 0.5) * (w + 0.5) / (64 * 48)
    assert ((fraction_high >= SCALE[0]) & (fraction_low <= SCALE[1])).all()
    assert (((h + 0.5) / (w - 0.5) >= RATIO[0]) & ((h - 0.5) / (w + 0.5) <= RATIO[1])).all()
    boxes = torch.tensor([[3, 5, 10, 7], [0, 0, 0, 0]], dtype=torch.float64)
    value = erase(torch.ones(2, 3, 64, 48), boxes, 0.0)
    assert value[0].eq(0).sum() == 3 * 70 and value[0, :, 3:13, 5:12].eq(0).all() and value[1].eq(1).all()
