"""The one per-sample geometry of training images, and the integer pre-shrink, in one convention.

The convention: coordinates are continuous, x to the right and y down, pixel centres
at integer + 0.5 (the top-left pixel covers [0, 1) x [0, 1)); a matrix is 2 x 3 and
maps source coordinates to output coordinates. Every backend consumes that matrix:

* DALI's `warp_affine(inverse_map=False)` takes it as it is (its own convention);
* `cv2.warpAffine` takes `to_opencv(matrix)` (OpenCV puts pixel centres at integers);
* `F.affine_grid` + `grid_sample` take `grid_sample_thetas(matrices, ...)`, the
  inverse in normalized coordinates, derived from the same matrices.

A sample's matrix is a product of factors, applied right to left::

    rotate(angle) @ flip @ box_to_output(source box -> S x S) [@ diag(fx, fy, 1)]

with the flip and the angle drawn from (seed, epoch, index) alone (`sample_augmentation`),
and the source box the whole image or, with the spec's `crop_scale`, a random-resized
crop box (`crop.crop_boxes`, from the sample's own further draws, `draws.CROP`, which
leave the flip and the angle as they are). More geometry is more factors of the same
product, built in `train_matrices`, so no backend changes for it.

The integer pre-shrink (the last section) is the factor on the right: before a large
downscale the image is averaged over fy x fx blocks, and the matrix is re-expressed on
the shrunk image (`shrunk_matrices`). Its factors follow from the matrix itself (source
pixels per output pixel along each axis, `source_per_output`), so they fit any crop box.
"""
from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

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


def on_resized_source(matrices: np.ndarray, heights: ArrayLike, widths: ArrayLike, new_heights: ArrayLike,
                      new_widths: ArrayLike) -> np.ndarray:
    """`matrices` of images stored at (heights, widths), for the same images resized to (new_heights, new_widths).

    A resize maps source x to x * new_width / width, so the warp of the resized image is
    M @ diag(width / new_width, height / new_height, 1): the same output pixels (the decoded
    cache holds images at another size than the pack). Works on one 2 x 3 matrix with scalar
    sizes and on N x 2 x 3 with length-N sizes.
    """
    out = np.array(matrices, dtype=np.float64)
    out[..., 0] *= (np.asarray(widths, dtype=np.float64) / np.asarray(new_widths, dtype=np.float64))[..., None]
    out[..., 1] *= (np.asarray(heights, dtype=np.float64) / np.asarray(new_heights, dtype=np.float64))[..., None]
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


# ---------------------------------------------------------------------------- the integer pre-shrink
#
# A bilinear warp reads 2 x 2 source pixels per output pixel, so a downscale by d > 2 skips
# source pixels and aliases (a fine grating turns into moire). So before the warp, fy x fx
# blocks are averaged, where along each axis f is 1 when d < 2 and otherwise the largest even
# integer not above d (d: source pixels per output pixel). Since f <= d < f + 2, the warp is
# left a downscale d / f in [1, 2), where bilinear sampling still reads every source pixel.
# f is even because a box of even width cancels the highest frequency exactly: 1-pixel
# stripes average to flat grey at every factor, as PIL's antialiased resize makes them. With
# f = floor(d), an odd f leaves 1/f of their contrast, which the warp turns into moire
# (grating std 13 levels at d = 7.03 against PIL's 1.4); on white noise the even rule is at
# most 5.5 levels RMS further from PIL than floor(d), most where d is just above 3 (f = 2).
# An exact 8x downscale is an 8 x 8 box average and an identity warp.
#
# The eval resize is antialiased itself (PIL's filter), so it needs the shrink only to keep
# its CUDA kernel within a block's shared memory at large ratios (a 4000 px photo to 224):
# there f is the smallest integer that leaves at most `EVAL_MAX_DOWNSCALE`, and images up to
# that ratio are resized exactly as PIL does.
#
# Sizes that are not multiples of f: the shrunk image has ceil(H / f) x ceil(W / f) pixels,
# the last row (column) the mean of the < f source rows (columns) that are left. So it
# covers the whole source and the warp never reads the fill colour at an edge; the price is
# that the last row's centre sits up to (f - 1) / 2 source pixels (less than half an output
# pixel) from where the matrix puts it. `F.avg_pool2d(ceil_mode=True)` divides such edge
# blocks by their true pixel count, which is this rule.
#
# Shrunk pixel u covers source [f u, f (u + 1)), so in this module's convention a source
# coordinate is f times the shrunk one: the matrix from the shrunk image to the output is
# M diag(fx, fy, 1) (`shrunk_matrices`).

# Ratios within this of an integer count as that integer: 512 / 64 computed as 7.999... is still 8.
_ROUNDING_SLACK = 1e-6
# The largest downscale the eval resize is left after its pre-shrink (see above).
EVAL_MAX_DOWNSCALE = 4
# Pre-shrinking converts to float; at most this many source values are converted at once.
_FLOAT_CHUNK = 1 << 26


def shrink_factors(source: np.ndarray | float, output: np.ndarray | float = 1.0) -> np.ndarray:
    """The warp's pre-shrink factor(s) for `source` pixels becoming `output` pixels (or for the ratio
    `source` alone): the largest even integer not above source / output, or 1 below 2."""
    ratio = np.asarray(source, dtype=np.float64) / np.asarray(output, dtype=np.float64)
    return np.maximum(1, 2 * np.floor((ratio + _ROUNDING_SLACK) / 2)).astype(np.int64)


def source_per_output(matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dy, dx): source pixels per output pixel along each source axis of (N x) 2 x 3 `matrices`.

    One source pixel along x moves the output by the matrix's first column, so 1 / |column|
    source pixels make one output pixel; a flip or a rotation does not change it. A crop box
    of w x h source pixels stretched onto S x S gives (h / S, w / S).
    """
    m = np.asarray(matrices, dtype=np.float64)
    return 1.0 / np.hypot(m[..., 0, 1], m[..., 1, 1]), 1.0 / np.hypot(m[..., 0, 0], m[..., 1, 0])


def warp_shrink_factors(matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fy, fx) int64: the pre-shrink before warping with (N x) 2 x 3 `matrices` (`shrink_factors` per axis)."""
    dy, dx = source_per_output(matrices)
    return shrink_factors(dy), shrink_factors(dx)


def resize_shrink_factors(heights: ArrayLike | int, widths: ArrayLike | int,
                          size: int) -> tuple[np.ndarray, np.ndarray]:
    """(fy, fx) int64: the pre-shrink before the antialiased eval resize of heights x widths to size x size,
    the smallest integers that leave at most `EVAL_MAX_DOWNSCALE` (1 up to that ratio)."""
    def factor(side: ArrayLike | int) -> np.ndarray:
        ratio = np.asarray(side, dtype=np.float64) / (size * EVAL_MAX_DOWNSCALE)
        return np.maximum(1, np.ceil(ratio - _ROUNDING_SLACK)).astype(np.int64)

    return factor(heights), factor(widths)


def eval_shrinks(spec: PipelineSpec) -> bool:
    """Whether the spec's eval resize pre-shrinks: only an antialiased one (nearest never antialiases)."""
    return spec.eval_antialias and spec.interpolation != "nearest"


def shrunk_size(height: ArrayLike | int, width: ArrayLike | int, fy: ArrayLike | int,
                fx: ArrayLike | int) -> tuple[Any, Any]:
    """(height, width) of an image shrunk by (fy, fx): the ceiling of each quotient (ints, or arrays of them)."""
    return -(-height // fy), -(-width // fx)


def shrunk_matrices(matrices: np.ndarray, fy: np.ndarray | int, fx: np.ndarray | int) -> np.ndarray:
    """(N x) 2 x 3 source-to-output matrices re-expressed on the shrunk images: M diag(fx, fy, 1)."""
    out = np.array(matrices, dtype=np.float64)
    out[..., 0] *= np.asarray(fx, dtype=np.float64)[..., None]
    out[..., 1] *= np.asarray(fy, dtype=np.float64)[..., None]
    return out


def preshrink_numpy(image: np.ndarray, fy: int, fx: int) -> np.ndarray:
    """H x W (x C) uint8 image averaged over fy x fx blocks, rounded to uint8 (OpenCV's INTER_AREA).

    The part that is a whole number of blocks goes through `cv2.resize(INTER_AREA)` at an
    exact integer ratio (its fast block-mean path); the partial blocks at the bottom and
    right edges are averaged over the pixels they have. (1, 1) returns `image` itself.
    """
    fy, fx = int(fy), int(fx)
    if fy == 1 and fx == 1:
        return image
    height, width = image.shape[:2]
    full_h, full_w = height // fy * fy, width // fx * fx
    out = np.empty(shrunk_size(height, width, fy, fx) + image.shape[2:], dtype=np.uint8)
    rows, cols = full_h // fy, full_w // fx
    if rows and cols:
        out[:rows, :cols] = cv2.resize(image[:full_h, :full_w], (cols, rows), interpolation=cv2.INTER_AREA)
    if full_h < height:
        out[rows:, :cols] = _block_means(image[full_h:, :full_w], height - full_h, fx)
    if full_w < width:
        out[:rows, cols:] = _block_means(image[:full_h, full_w:], fy, width - full_w)
    if full_h < height and full_w < width:
        out[rows:, cols:] = _block_means(image[full_h:, full_w:], height - full_h, width - full_w)
    return out


def _block_means(part: np.ndarray, by: int, bx: int) -> np.ndarray:
    """Means of the by x bx blocks tiling `part` exactly, rounded to uint8."""
    h, w = part.shape[:2]
    blocks = part.reshape(h // by, by, w // bx, bx, *part.shape[2:]).astype(np.float32)
    return np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)


def preshrink_torch(images: torch.Tensor, fy: int, fx: int) -> torch.Tensor:
    """(N x) C x H x W images (any dtype, any device) averaged over fy x fx blocks: float32, not rounded.

    A batch is converted to float a few images at a time, so a batch of large photos never
    needs a float copy of itself. (1, 1) returns `images` as float.
    """
    fy, fx = int(fy), int(fx)
    if fy == 1 and fx == 1 or images.dim() == 3:
        pixels = images if images.is_floating_point() else images.float()
        return pixels if fy == 1 and fx == 1 else _average_blocks(pixels, fy, fx)
    n, c, h, w = images.shape
    out = torch.empty((n, c, *shrunk_size(h, w, fy, fx)), dtype=torch.float32, device=images.device)
    chunk = max(1, _FLOAT_CHUNK // max(1, c * h * w))
    for start in range(0, n, chunk):
        out[start : start + chunk] = _average_blocks(images[start : start + chunk].float(), fy, fx)
    return out


def _average_blocks(pixels: torch.Tensor, fy: int, fx: int) -> torch.Tensor:
    return F.avg_pool2d(pixels, (fy, fx), stride=(fy, fx), ceil_mode=True)
