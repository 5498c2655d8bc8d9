"""Random-resized-crop boxes as torchvision's `RandomResizedCrop.get_params` defines them, for a whole batch.

torchvision draws, up to `TRIES` times, an area fraction uniform in `scale` and an aspect
ratio log-uniform in `ratio`, rounds the box's sides to whole pixels and keeps the first
box that fits; its position is then uniform over the places it fits. When no try fits,
it falls back to the largest central box whose aspect ratio is clamped into `ratio`.
Here every try of every sample is computed at once from uniforms drawn beforehand
(from (seed, epoch, index), see `dali_pipes.draws`), so a box depends on nothing else.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

TRIES = 10
# Per sample: TRIES area uniforms, TRIES aspect-ratio uniforms, then the box's row and column.
DRAWS = 2 * TRIES + 2


def box_sides(areas: np.ndarray, scale: Sequence[float], ratio: Sequence[float], u_area: np.ndarray,
              u_ratio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rounded sides (sqrt(a r), sqrt(a / r)) of each try's box: a = area x U(scale), r = exp(U(log ratio)).

    `areas` (N x 1) is each image's area; `u_area`, `u_ratio` (N x tries) are the tries'
    uniforms in [0, 1). Rounding is half to even, as Python's `round`.
    """
    target = areas * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u_ratio)
    return np.rint(np.sqrt(target * aspect)), np.rint(np.sqrt(target / aspect))


def first_fit(fits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of the N x tries boolean `fits`: the index of the first True (0 if none), and whether any."""
    return fits.argmax(axis=1), fits.any(axis=1)


def place(u: np.ndarray, extent: np.ndarray, side: np.ndarray) -> np.ndarray:
    """`torch.randint(0, extent - side + 1)` from a uniform u in [0, 1): floor(u (extent - side + 1))."""
    return np.floor(u * (extent - side + 1.0))


def crop_boxes(heights: Sequence[int] | np.ndarray, widths: Sequence[int] | np.ndarray, scale: Sequence[float],
               ratio: Sequence[float], draws: np.ndarray) -> np.ndarray:
    """N x 4 float64 boxes (top, left, height, width), whole pixels, one per image of size heights x widths.

    `draws` is N x `DRAWS` uniforms in [0, 1): columns [0, TRIES) the area fractions,
    [TRIES, 2 TRIES) the aspect ratios, then the row and the column of the box. `scale`
    is the (min, max) fraction of the image's area, `ratio` the (min, max) width/height.
    """
    heights = np.asarray(heights, dtype=np.float64)
    widths = np.asarray(widths, dtype=np.float64)
    draws = np.asarray(draws, dtype=np.float64)
    if draws.shape != (len(heights), DRAWS):
        raise ValueError(f"crop_boxes needs {len(heights)} x {DRAWS} draws, got {draws.shape}")
    w, h = box_sides((heights * widths)[:, None], scale, ratio, draws[:, :TRIES], draws[:, TRIES:2 * TRIES])
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    chosen, found = first_fit(fits)
    rows = np.arange(len(heights))
    h, w = h[rows, chosen], w[rows, chosen]
    top = place(draws[:, 2 * TRIES], heights, h)
    left = place(draws[:, 2 * TRIES + 1], widths, w)
    fb_top, fb_left, fb_h, fb_w = central_boxes(heights, widths, ratio)
    return np.stack([np.where(found, top, fb_top), np.where(found, left, fb_left),
                     np.where(found, h, fb_h), np.where(found, w, fb_w)], axis=1)


def central_boxes(heights: np.ndarray, widths: np.ndarray, ratio: Sequence[float]) -> tuple[np.ndarray, ...]:
    """torchvision's fallback: the whole image, cut to the nearest allowed aspect ratio, centred."""
    in_ratio = widths / heights
    lo, hi = min(ratio), max(ratio)
    w = np.where(in_ratio < lo, widths, np.where(in_ratio > hi, np.rint(heights * hi), widths))
    h = np.where(in_ratio < lo, np.rint(widths / lo), heights)
    return np.floor((heights - h) / 2), np.floor((widths - w) / 2), h, w


def largest_zoom(scale: Sequence[float] | None, ratio: Sequence[float]) -> float:
    """How many times larger than an image's short side a random-resized crop can be drawn: its largest
    magnification, which a decoded cache must hold to lose nothing (1 without a crop).

    A box of area s A and aspect r is sqrt(s A / r) high and sqrt(s A r) wide; against the
    short side of any image of area A that is at least sqrt(s / max(r, 1 / r)), so the
    output's side S needs a short side of at most S sqrt(max(r_max, 1 / r_min) / s_min).
    """
    if scale is None:
        return 1.0
    return float(np.sqrt(max(ratio[1], 1.0 / ratio[0]) / scale[0]))
