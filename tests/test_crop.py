"""Random-resized-crop boxes against torchvision's documented algorithm, and the per-sample draw layout."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from dali_pipes import draws
from dali_pipes.crop import DRAWS, TRIES, crop_boxes
from dali_pipes.geometry import sample_augmentation
from dali_pipes.spec import PipelineSpec, check_range


def reference_box(height: int, width: int, scale, ratio, u: np.ndarray) -> tuple[int, int, int, int]:
    """`RandomResizedCrop.get_params` written from its documentation, one sample, its random numbers from `u`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(TRIES):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[attempt])
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[TRIES + attempt])
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(u[2 * TRIES] * (height - h + 1))  # randint(0, height - h + 1)
            j = int(u[2 * TRIES + 1] * (width - w + 1))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("scale, ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.35, 1.0), (0.5, 2.0)),
                                          ((0.9, 1.0), (3.0, 4.0))])
def test_boxes_equal_torchvisions_loop_fed_the_same_uniforms(scale, ratio) -> None:
    rng = np.random.default_rng(1)
    heights, widths = rng.integers(5, 600, 400), rng.integers(5, 600, 400)
    (u,) = draws.sample_draws(7, 3, np.arange(400), draws.CROP)
    boxes = crop_boxes(heights, widths, scale, ratio, u)
    expected = [reference_box(int(h), int(w), scale, ratio, row) for h, w, row in zip(heights, widths, u)]
    assert boxes.dtype == np.float64
    np.testing.assert_array_equal(boxes, np.array(expected, dtype=np.float64))


def test_fallback_is_torchvisions_central_crop() -> None:
    # Whole-area boxes of aspect 0.5 fit none of these images, so every sample falls back.
    u = np.zeros((3, DRAWS))
    boxes = crop_boxes([300, 100, 100], [100, 300, 100], (1.0, 1.0), (0.5, 2.0), u)
    # tall 300 x 100: ratio 1/3 < 0.5 -> the full width, height 100 / 0.5 = 200, centred: top 50.
    # wide 100 x 300: ratio 3 > 2 -> the full height, width 200, centred: left 50.  square: the whole image.
    np.testing.assert_array_equal(boxes, [[50, 0, 200, 100], [0, 50, 100, 200], [0, 0, 100, 100]])


def test_boxes_have_the_asked_area_and_aspect_and_lie_inside() -> None:
    n, height, width = 5000, 480, 640
    (u,) = draws.sample_draws(0, 0, np.arange(n), draws.CROP)
    top, left, h, w = crop_boxes(np.full(n, height), np.full(n, width), (0.08, 1.0), (3 / 4, 4 / 3), u).T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    # Sides are rounded to whole pixels: allow half a pixel on each.
    area = height * width
    assert ((w + 0.5) * (h + 0.5) >= 0.08 * area).all() and ((w - 0.5) * (h - 0.5) <= area).all()
    assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all() and ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
    fractions = w * h / area
    assert fractions.min() < 0.1 and fractions.max() > 0.95  # the whole range is used


def test_box_statistics_match_torchvisions_own_get_params() -> None:
    # The same distribution as torchvision's transform itself (its own random numbers), not only the reference loop.
    n, image = 4000, torch.zeros(3, 200, 300)
    torch.manual_seed(0)
    theirs = np.array([RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)], float)
    (u,) = draws.sample_draws(0, 0, np.arange(n), draws.CROP)
    ours = crop_boxes(np.full(n, 200), np.full(n, 300), (0.08, 1.0), (3 / 4, 4 / 3), u)
    for boxes in (theirs, ours):
        boxes[:, :2] += boxes[:, 2:] / 2  # box centres
    # Means of centres, sides, area fraction and log aspect. The standard errors of these differences are
    # 0.4-1.0 px and 0.004 (measured differences: 0.1-1.5 px, 0.0001, 0.003); tolerances are 4-7 of them.
    for column, tolerance in ((0, 3.0), (1, 4.0), (2, 3.0), (3, 4.0)):
        assert ours[:, column].mean() == pytest.approx(theirs[:, column].mean(), abs=tolerance), column
    fraction = [b[:, 2] * b[:, 3] / 60000 for b in (ours, theirs)]
    assert fraction[0].mean() == pytest.approx(fraction[1].mean(), abs=0.02)
    aspect = [np.log(b[:, 3] / b[:, 2]) for b in (ours, theirs)]
    assert aspect[0].mean() == pytest.approx(aspect[1].mean(), abs=0.02)


def test_new_draw_blocks_leave_flip_and_angle_alone() -> None:
    spec = PipelineSpec(flip_prob=0.5, rotation_degrees=10.0)
    indices = np.array([0, 5, 17, 123456])
    flips, angles = sample_augmentation(spec, 3, 2, indices)
    flip, angle, crop, color, erase = draws.sample_draws(3, 2, indices, slice(draws.FLIP, draws.FLIP + 1),
                                                         slice(draws.ANGLE, draws.ANGLE + 1), draws.CROP, draws.COLOR,
                                                         draws.ERASE)
    np.testing.assert_array_equal(flip[:, 0] < 0.5, flips)
    np.testing.assert_allclose((2 * angle[:, 0] - 1) * 10.0, angles, rtol=1e-6)
    for k, index in enumerate(indices):  # each block is its own columns of numpy's own stream
        stream = np.random.default_rng((3, 2, index)).random(draws.ERASE.stop)
        for block, got in ((draws.CROP, crop), (draws.COLOR, color), (draws.ERASE, erase)):
            np.testing.assert_array_equal(got[k], stream[block])
    blocks = sorted([(draws.FLIP, draws.FLIP + 1), (draws.ANGLE, draws.ANGLE + 1)]
                    + [(b.start, b.stop) for b in (draws.CROP, draws.COLOR, draws.ERASE)])
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:])) and blocks[0][0] == 0  # no overlap, no gap


def test_ranges_are_checked_in_one_line() -> None:
    assert check_range("--crop-scale", [0.08, 1], 0.0, 1.0) == (0.08, 1.0)
    for bad in ([0.5, 0.2], [0.0, 1.0], [0.5, 1.5], [0.5]):
        with pytest.raises(ValueError, match="--crop-scale"):
            check_range("--crop-scale", bad, 0.0, 1.0)
