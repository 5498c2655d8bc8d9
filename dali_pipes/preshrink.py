"""Antialiased downscaling for the one bilinear warp: shrink by an integer factor with area averaging first.

A bilinear warp reads 2 x 2 source pixels per output pixel, so a downscale by d > 2
skips source pixels and aliases (a fine grating turns into moire). The rule: before
the warp, average f x f blocks, where along each axis f is 1 when d < 2 and otherwise
the largest even integer not above d (d: source pixels per output pixel, a crop box's
side over the output size). Since f <= d < f + 2, the warp is left a downscale d / f in
[1, 2), where bilinear sampling still reads every source pixel. f is even because a box
of even width cancels the highest frequency exactly: 1-pixel stripes average to flat
grey at every factor, as PIL's antialiased resize makes them. With f = floor(d), an odd
f leaves 1/f of their contrast, which the warp turns into moire (grating std 13 levels
at d = 7.03 against PIL's 1.4); on white noise the even rule is at most 5.5 levels RMS
further from PIL than floor(d), most where d is just above 3 (f = 2). An exact 8x
downscale is an 8 x 8 box average and an identity warp.

Sizes that are not multiples of f: the shrunk image has ceil(H / f) x ceil(W / f)
pixels, the last row (column) the mean of the < f source rows (columns) that are left.
So it covers the whole source and the warp never reads the fill colour at an edge; the
price is that the last row's centre sits up to (f - 1) / 2 source pixels (less than
half an output pixel) from where the matrix puts it. `F.avg_pool2d(ceil_mode=True)`
divides such edge blocks by their true pixel count, which is this rule.

Shrunk pixel u covers source [f u, f (u + 1)), so in the spec's convention (pixel
centres at + 0.5) a source coordinate is f times the shrunk one: the matrix from the
shrunk image to the output is M diag(fx, fy, 1) (`shrunk_matrices`).
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

# Ratios within this of an integer count as that integer: 512 / 64 computed as 7.999... is still 8.
_ROUNDING_SLACK = 1e-6


def shrink_factors(source: np.ndarray | float, output: np.ndarray | float) -> np.ndarray:
    """Integer pre-shrink factor(s) for `source` pixels becoming `output` pixels: the largest even integer
    not above source / output, or 1 below 2."""
    ratio = np.asarray(source, dtype=np.float64) / np.asarray(output, dtype=np.float64)
    return np.maximum(1, 2 * np.floor((ratio + _ROUNDING_SLACK) / 2)).astype(np.int64)


def shrunk_size(height: int, width: int, fy: int, fx: int) -> tuple[int, int]:
    """(height, width) of an image shrunk by (fy, fx): the ceiling of each quotient."""
    return -(-height // fy), -(-width // fx)


def preshrink_numpy(image: np.ndarray, fy: int, fx: int) -> np.ndarray:
    """H x W (x C) uint8 image averaged over fy x fx blocks, rounded to uint8 (OpenCV's INTER_AREA).

    The part that is a whole number of blocks goes through `cv2.resize(INTER_AREA)` at an
    exact integer ratio (its fast block-mean path); the partial blocks at the bottom and
    right edges are averaged over the pixels they have.
    """
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
    """(N x) C x H x W images (any dtype, any device) averaged over fy x fx blocks, as float, not rounded."""
    pixels = images if images.is_floating_point() else images.float()
    if fy == 1 and fx == 1:
        return pixels
    return F.avg_pool2d(pixels, (fy, fx), stride=(fy, fx), ceil_mode=True)


def shrunk_matrices(matrices: np.ndarray, fy: np.ndarray | int, fx: np.ndarray | int) -> np.ndarray:
    """(N x) 2 x 3 source-to-output matrices re-expressed on the shrunk images: M diag(fx, fy, 1)."""
    out = np.array(matrices, dtype=np.float64)
    out[..., 0] *= np.asarray(fx, dtype=np.float64)[..., None]
    out[..., 1] *= np.asarray(fy, dtype=np.float64)[..., None]
    return out
