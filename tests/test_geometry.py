"""The one per-sample geometry (dali_pipes/geometry.py) against independent computations: OpenCV's own
resize, a 3x3 matrix inverse, and the matrix of an image resized beforehand."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from dali_pipes.geometry import affine_matrices, affine_matrix, grid_sample_thetas, shrunk_matrices, to_opencv


def _smooth(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = [127 + 120 * np.sin(xx / (4 + c) + yy / (6 + c)) for c in range(3)]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("height, width, size", [(10, 14, 37), (21, 9, 40), (8, 12, 33)])
def test_opencv_form_of_a_plain_resize_is_cv2_resize(height: int, width: int, size: int) -> None:
    # Upscaling only: cv2.resize's bilinear filter is then a plain interpolation with the
    # same half-pixel centres as a warp, so the two must agree to rounding.
    image = _smooth(height, width)
    matrix = to_opencv(affine_matrix(height, width, size, False, 0.0))
    warped = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    assert np.abs(warped.astype(int) - resized).max() <= 1
    # A half-pixel mistake in the conversion shows: the matrix without it is off by whole levels.
    naive = cv2.warpAffine(image, affine_matrix(height, width, size, False, 0.0), (size, size), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
    assert np.abs(naive.astype(int) - resized).max() > 2


def test_grid_sample_thetas_are_the_normalized_inverse() -> None:
    rng = np.random.default_rng(0)
    n, size, canvas = 20, 29, (70, 90)
    heights, widths = rng.integers(10, 70, n), rng.integers(10, 90, n)
    matrices = affine_matrices(heights, widths, size, rng.random(n) < 0.5, rng.uniform(-40, 40, n))
    thetas = grid_sample_thetas(matrices, size, canvas)
    # Written out independently: source normalized = N_src @ inverse(M) @ N_out^-1 (align_corners=False).
    to_unit = np.array([[2.0 / canvas[1], 0, -1], [0, 2.0 / canvas[0], -1], [0, 0, 1]])
    from_unit = np.array([[size / 2.0, 0, size / 2.0], [0, size / 2.0, size / 2.0], [0, 0, 1]])
    for matrix, theta in zip(matrices, thetas):
        expected = to_unit @ np.linalg.inv(np.vstack([matrix, [0, 0, 1]])) @ from_unit
        np.testing.assert_allclose(theta, expected[:2], atol=1e-12)


def test_a_shrunk_source_keeps_the_output() -> None:
    # The matrix of an image shrunk by whole factors beforehand equals the matrix computed for the
    # shrunk image directly.
    rng = np.random.default_rng(1)
    n, size = 12, 32
    fy, fx = rng.integers(1, 5, n), rng.integers(1, 5, n)
    new_heights, new_widths = rng.integers(30, 120, n), rng.integers(30, 120, n)
    heights, widths = new_heights * fy, new_widths * fx
    flips, angles = rng.random(n) < 0.5, rng.uniform(-30, 30, n)
    original = affine_matrices(heights, widths, size, flips, angles)
    moved = shrunk_matrices(original, fy, fx)
    np.testing.assert_allclose(moved, affine_matrices(new_heights, new_widths, size, flips, angles), atol=1e-12)
    one = shrunk_matrices(original[0], fy[0], fx[0])
    np.testing.assert_allclose(one, moved[0], atol=1e-12)
