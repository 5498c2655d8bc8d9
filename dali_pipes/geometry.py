"""The one per-sample geometry of training images: one affine matrix per sample, one convention.

The convention: coordinates are continuous, x to the right and y down, pixel centres
at integer + 0.5 (the top-left pixel covers [0, 1) x [0, 1)); a matrix is 2 x 3 and
maps source coordinates to output coordinates. Every backend consumes that matrix:

* DALI's `warp_affine(inverse_map=False)` takes it as it is (its own convention);
* `cv2.warpAffine` takes `to_opencv(matrix)` (OpenCV puts pixel centres at integers);
* `F.affine_grid` + `grid_sample` take `grid_sample_thetas(matrices, ...)`, the
  inverse in normalized coordinates, derived from the same matrices.

A sample's matrix is a product of factors, applied right to left::

    rotate(angle) @ flip @ box_to_output(source box -> S x S)

with the flip and the angle drawn from (seed, epoch, index) alone (`sample_augmentation`),
and the source box the whole image or, with the spec's `crop_scale`, a random-resized
crop box (`crop.crop_boxes`, from the sample's own further draws, `draws.CROP`, which
leave the flip and the angle as they are). More geometry is more factors of the same
product, built in `train_matrices`, so no backend changes for it: an integer pre-shrink
with area averaging is a factor on the right, as `on_resized_source` applies for the
`train_antialias` pre-shrink (`prefilter_size`), and its factor belongs here too.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from . import draws
from .crop import crop_boxes
from .spec import PipelineSpec

ArrayLike = Sequence[float] | np.ndarray
_FLIP_ANGLE = slice(draws.FLIP, draws.ANGLE + 1)  # a sample's first two uniforms: u_flip, u_angle


def sample_augmentation(spec: PipelineSpec, seed: int, epoch: int,
                        indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip flags and rotation angles for `indices` (pack indices), from (seed, epoch, index) alone.

    Every backend draws through this (most via `train_matrices`), so a sample's augmentation does not
    depend on worker scheduling, batch composition, rank or resumption. Sample `index`
    gets the first two draws u_flip, u_angle of `np.random.default_rng((seed, epoch,
    index))` (`draws.FLIP`, `draws.ANGLE`): flip when u_flip < flip_prob, angle
    (2 u_angle - 1) * rotation_degrees. The whole batch is drawn in one vectorized call
    (`seeded.uniforms`), same values.
    """
    (flip_and_angle,) = draws.sample_draws(seed, epoch, indices, _FLIP_ANGLE)
    return _flips_and_angles(spec, flip_and_angle)


def _flips_and_angles(spec: PipelineSpec, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip flags and angles from each sample's N x 2 uniforms (u_flip, u_angle)."""
    return u[:, 0] < spec.flip_prob, ((2.0 * u[:, 1] - 1.0) * spec.rotation_degrees).astype(np.float32)


def train_matrices(spec: PipelineSpec, seed: int, epoch: int, indices: np.ndarray, heights: ArrayLike,
                   widths: ArrayLike) -> np.ndarray:
    """N x 2 x 3: the training geometry of samples `indices` (stored `heights` x `widths`) in `epoch`.

    rotate @ flip @ (source box -> S x S): the box is the whole image, or with
    `spec.crop_scale` a random-resized crop box as torchvision draws it (`crop.crop_boxes`).
    One vectorized draw serves the flip, the angle and the box.
    """
    heights = np.asarray(heights, dtype=np.float64)
    widths = np.asarray(widths, dtype=np.float64)
    if spec.crop_scale is None:
        (flip_and_angle,) = draws.sample_draws(seed, epoch, indices, _FLIP_ANGLE)
        top, left, box_h, box_w = np.zeros_like(heights), np.zeros_like(widths), heights, widths
    else:
        flip_and_angle, crop = draws.sample_draws(seed, epoch, indices, _FLIP_ANGLE, draws.CROP)
        top, left, box_h, box_w = crop_boxes(heights, widths, spec.crop_scale, spec.crop_ratio, crop).T
    flips, angles = _flips_and_angles(spec, flip_and_angle)
    size = spec.image_size
    return _compose(_rotate(size, angles), _flip(size, flips), _box_to_output(left, top, box_w, box_h, size))


def affine_matrix(height: int, width: int, size: int, flip: bool, angle_degrees: float) -> np.ndarray:
    """2 x 3: `affine_matrices` of one image."""
    return affine_matrices([height], [width], size, [flip], [angle_degrees])[0]


def affine_matrices(heights: ArrayLike, widths: ArrayLike, size: int, flips: Sequence[bool] | np.ndarray,
                    angles_degrees: ArrayLike) -> np.ndarray:
    """N x 2 x 3 float64: each whole (height x width) image resized to size x size, flipped, rotated.

    In order: resize without keeping the aspect ratio, horizontal flip when asked,
    rotation by the angle counter-clockwise on screen about the output's centre (as
    torchvision's `RandomRotation` turns for positive angles).
    """
    widths = np.asarray(widths, dtype=np.float64)
    heights = np.asarray(heights, dtype=np.float64)
    zeros = np.zeros_like(widths)
    whole_image = _box_to_output(zeros, zeros, widths, heights, size)
    return _compose(_rotate(size, angles_degrees), _flip(size, flips), whole_image)


def _box_to_output(x: np.ndarray, y: np.ndarray, width: np.ndarray, height: np.ndarray, size: int) -> np.ndarray:
    """N x 2 x 3: the source box (x, y, width, height) of each image stretched onto the size x size output."""
    sx, sy = size / width, size / height
    zeros = np.zeros_like(sx)
    return _affine(sx, zeros, -x * sx, zeros, sy, -y * sy)


def _flip(size: int, flips: Sequence[bool] | np.ndarray) -> np.ndarray:
    """N x 2 x 3: x -> size - x where the flag is set, identity elsewhere."""
    flips = np.asarray(flips, dtype=bool)
    zeros, ones = np.zeros(len(flips)), np.ones(len(flips))
    return _affine(np.where(flips, -1.0, 1.0), zeros, np.where(flips, float(size), 0.0), zeros, ones, zeros)


def _rotate(size: int, angles_degrees: ArrayLike) -> np.ndarray:
    """N x 2 x 3: counter-clockwise on screen (y down) by each angle, about the output centre."""
    theta = np.radians(np.asarray(angles_degrees, dtype=np.float64))
    cos, sin = np.cos(theta), np.sin(theta)
    c = size / 2.0
    return _affine(cos, sin, c - cos * c - sin * c, -sin, cos, c + sin * c - cos * c)


def _affine(a: np.ndarray, b: np.ndarray, tx: np.ndarray, c: np.ndarray, d: np.ndarray, ty: np.ndarray) -> np.ndarray:
    """N x 2 x 3 matrices [[a, b, tx], [c, d, ty]] from their length-N entries."""
    out = np.empty((len(a), 2, 3), dtype=np.float64)
    out[:, 0, 0], out[:, 0, 1], out[:, 0, 2], out[:, 1, 0], out[:, 1, 1], out[:, 1, 2] = a, b, tx, c, d, ty
    return out


def _compose(*factors: np.ndarray) -> np.ndarray:
    """The product of N x 2 x 3 affine matrices, the leftmost applied last, written out per entry.

    Batched 3 x 3 products cost several times more than these few vector operations.
    """
    out = factors[-1]
    for left in reversed(factors[:-1]):
        (a, b, tx), (c, d, ty) = left[:, 0].T, left[:, 1].T
        (p, q, px), (r, s, py) = out[:, 0].T, out[:, 1].T
        out = _affine(a * p + b * r, a * q + b * s, a * px + b * py + tx,
                      c * p + d * r, c * q + d * s, c * px + d * py + ty)
    return out


def prefilter_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Where `train_antialias` first shrinks an image to, antialiased, before the warp: no side above `size`."""
    return min(height, size), min(width, size)


def on_resized_source(matrices: np.ndarray, heights: ArrayLike, widths: ArrayLike, new_heights: ArrayLike,
                      new_widths: ArrayLike) -> np.ndarray:
    """`matrices` of images stored at (heights, widths), for the same images resized to (new_heights, new_widths).

    A resize maps source x to x * new_width / width, so the warp of the resized image is
    M @ diag(width / new_width, height / new_height, 1): the same output pixels. Works on
    one 2 x 3 matrix with scalar sizes and on N x 2 x 3 with length-N sizes.
    """
    out = np.array(matrices, dtype=np.float64)
    scale_x = np.asarray(widths, dtype=np.float64) / np.asarray(new_widths, dtype=np.float64)
    scale_y = np.asarray(heights, dtype=np.float64) / np.asarray(new_heights, dtype=np.float64)
    out[..., 0] *= scale_x[..., None]
    out[..., 1] *= scale_y[..., None]
    return out


def to_opencv(matrix: np.ndarray) -> np.ndarray:
    """`matrix` (2 x 3, or N x 2 x 3) in OpenCV's convention, pixel centres at integers.

    That is T(-0.5) @ M @ T(+0.5), written out: the linear part stays, the translation
    gains A @ (0.5, 0.5) - 0.5 (a 3x3 product per image costs more than the warp's setup).
    """
    out = np.array(matrix, dtype=np.float64)
    out[..., 2] += 0.5 * (out[..., 0] + out[..., 1]) - 0.5
    return out


def grid_sample_thetas(matrices: np.ndarray, size: int, canvas: tuple[int, int]) -> np.ndarray:
    """N x 2 x 3 `F.affine_grid` matrices (output -> source, normalized) for N x 2 x 3 forward `matrices`.

    affine_grid with align_corners=False normalizes continuous coordinates (corners at 0
    and the side length) to [-1, 1], which is this module's convention up to that
    scaling. Every image lies in the top-left corner of a `canvas` (height, width) shared
    by the batch, so source coordinates are normalized by the canvas: the padding is
    folded into each matrix and one `grid_sample` serves the whole batch. The inverse is
    written in closed form (no 3x3 inverse per image).
    """
    a, b, c, d = matrices[:, 0, 0], matrices[:, 0, 1], matrices[:, 1, 0], matrices[:, 1, 1]
    det = a * d - b * c
    linear = np.stack([np.stack([d, -b], -1), np.stack([-c, a], -1)], 1) / det[:, None, None]  # N x 2 x 2
    translation = -np.einsum("nij,nj->ni", linear, matrices[:, :, 2])
    half = size / 2.0
    # output normalized u -> pixel (u + 1) * half -> source pixel -> source normalized 2 p / side - 1.
    scale = (2.0 / np.array([canvas[1], canvas[0]], np.float64))[None, :, None]
    theta = np.empty((len(matrices), 2, 3), dtype=np.float64)
    theta[:, :, :2] = scale * linear * half
    theta[:, :, 2] = scale[:, :, 0] * (linear.sum(-1) * half + translation) - 1.0
    return theta
