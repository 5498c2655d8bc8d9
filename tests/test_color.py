"""Batch colour jitter against torchvision's own `adjust_brightness/contrast/saturation`, sample by sample."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sync_audit import host_syncs_forbidden
from torchvision.transforms.v2 import functional as TF

from dali_pipes import draws
from dali_pipes.color import BRIGHTNESS, CONTRAST, SATURATION, color_jitter, jitter_parameters

ADJUST = {BRIGHTNESS: TF.adjust_brightness, CONTRAST: TF.adjust_contrast, SATURATION: TF.adjust_saturation}


def jittered_by_torchvision(images: torch.Tensor, factors: np.ndarray, order: np.ndarray) -> torch.Tensor:
    out = []
    for image, factor, ops in zip(images, factors, order):
        for op in ops:
            image = ADJUST[int(op)](image, float(factor[op]))
        out.append(image)
    return torch.stack(out)


def parameters(n: int, strengths=(0.4, 0.4, 0.4)) -> tuple[np.ndarray, np.ndarray]:
    (u,) = draws.sample_draws(0, 1, np.arange(n), draws.COLOR)
    return jitter_parameters(strengths, u)


def test_factors_and_order_follow_color_jitter() -> None:
    u = np.array([[0.0, 0.5, 0.999999, 0.3, 0.1, 0.2], [0.25, 0.75, 0.5, 0.9, 0.8, 0.7]])
    factors, order = jitter_parameters((0.4, 2.0, 0.0), u)
    # [max(0, 1 - x), 1 + x] each: [0.6, 1.4], [0, 3], [1, 1]
    np.testing.assert_allclose(factors, [[0.6, 1.5, 1.0], [0.8, 2.25, 1.0]], atol=1e-5)
    np.testing.assert_array_equal(order, [[1, 2, 0], [2, 1, 0]])
    _, orders = parameters(6000)
    seen = {tuple(row) for row in orders}
    assert len(seen) == 6 and all(sorted(row) == [0, 1, 2] for row in seen)  # every permutation occurs
    with pytest.raises(ValueError, match="three non-negative"):
        jitter_parameters((0.4, -0.1, 0.0), u)


def test_float_batch_equals_torchvision_per_sample() -> None:
    n = 24
    images = torch.from_numpy(np.random.default_rng(0).random((n, 3, 17, 23), dtype=np.float32))
    images[0] = 1.0  # clamped at the top by brightness > 1
    factors, order = parameters(n)
    expected = jittered_by_torchvision(images, factors, order)
    channels_last = images.contiguous(memory_format=torch.channels_last)  # the batch contract's layout
    with host_syncs_forbidden():
        ours = color_jitter(channels_last, torch.from_numpy(factors), torch.from_numpy(order))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_pixel_values_within_a_level_of_torchvisions_uint8_kernels() -> None:
    n = 32
    pixels = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (n, 3, 16, 12), dtype=np.uint8))
    factors, order = parameters(n)
    ours = color_jitter(pixels.float(), torch.from_numpy(factors), torch.from_numpy(order), bound=255.0)
    # On float pixels (how it runs, before normalization) it is torchvision's float path...
    torch.testing.assert_close(ours / 255, jittered_by_torchvision(pixels / 255.0, factors, order), atol=1e-5, rtol=0)
    for op in (BRIGHTNESS, CONTRAST, SATURATION):  # ...and each operation within a level of its uint8 kernel,
        alone = np.ones_like(factors)
        alone[:, op] = factors[:, op]
        one = color_jitter(pixels.float(), torch.from_numpy(alone), torch.from_numpy(order), bound=255.0)
        reference = torch.stack([ADJUST[op](p, float(f)) for p, f in zip(pixels, factors[:, op])]).float()
        assert (one.round() - reference).abs().max() <= 1, op
    # ...while chaining three uint8 kernels truncates after each (up to 4 levels measured): not compared.


def test_zero_strength_is_the_identity() -> None:
    images = torch.from_numpy(np.random.default_rng(2).random((5, 3, 8, 8), dtype=np.float32))
    factors, order = parameters(5, strengths=(0.0, 0.0, 0.0))
    torch.testing.assert_close(color_jitter(images, torch.from_numpy(factors), torch.from_numpy(order)), images)
