"""The one preprocessing spec every backend reads, and the geometry derived from it.

Nothing else in the project writes a mean, a std, an image size or a rotation range:
backends, the trainer, checkpoints and `predict` all go through `PipelineSpec`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .seeded import uniforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224

INTERPOLATIONS = ("linear", "cubic", "nearest")
LAYOUTS = ("NCHW_channels_last",)


@dataclass(frozen=True)
class PipelineSpec:
    """Everything that decides what a model sees, for training and evaluation.

    Geometry: images are resized to `image_size` x `image_size` without keeping the
    aspect ratio (as the original notebook's ``Resize((224, 224))``). Training adds a
    horizontal flip with probability `flip_prob` and a rotation uniform in
    +-`rotation_degrees`, the uncovered corners filled with `fill` (black). Evaluation
    resizes with antialiasing (`eval_antialias`), as PIL and torchvision do; training
    does resize, rotate and flip in one bilinear warp without antialiasing
    (`train_antialias` False), which is the fast path (see README, "Preprocessing").
    Normalization uses `mean` and `std` on [0, 1] pixel values, RGB order.
    """

    image_size: int = DEFAULT_IMAGE_SIZE
    flip_prob: float = 0.5
    rotation_degrees: float = 10.0
    fill: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "linear"
    eval_antialias: bool = True
    train_antialias: bool = False
    dtype: str = "float32"
    layout: str = "NCHW_channels_last"

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {self.image_size}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        if not 0.0 <= self.rotation_degrees <= 180.0:
            raise ValueError(f"rotation_degrees must be in [0, 180], got {self.rotation_degrees}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, std positive")
        # Tuples, not lists, so the frozen spec stays hashable after a JSON round trip.
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (lists for tuples), as stored in checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PipelineSpec":
        """Inverse of `to_dict`; unknown keys are an error so a newer spec never half-loads."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown pipeline spec keys: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    @property
    def mean_255(self) -> tuple[float, float, float]:
        """Mean on the 0-255 pixel scale, for normalizing uint8 batches in one step."""
        return tuple(255.0 * m for m in self.mean)  # type: ignore[return-value]

    @property
    def std_255(self) -> tuple[float, float, float]:
        """Std on the 0-255 pixel scale."""
        return tuple(255.0 * s for s in self.std)  # type: ignore[return-value]


def sample_augmentation(spec: PipelineSpec, seed: int, epoch: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip flags and rotation angles for `indices` (pack indices), from (seed, epoch, index) alone.

    Every backend and every worker calls this, so a sample's augmentation does not
    depend on worker scheduling, batch composition, rank or resumption. Sample `index`
    gets the first two draws u_flip, u_angle of `np.random.default_rng((seed, epoch,
    index))`: flip when u_flip < flip_prob, angle (2 u_angle - 1) * rotation_degrees.
    The whole batch is drawn in one vectorized call (`seeded.uniforms`), same values.
    """
    draws = uniforms((seed, epoch), indices, 2)
    flips = draws[:, 0] < spec.flip_prob
    angles = ((2.0 * draws[:, 1] - 1.0) * spec.rotation_degrees).astype(np.float32)
    return flips, angles


def affine_matrix(height: int, width: int, size: int, flip: bool, angle_degrees: float) -> np.ndarray:
    """2x3 matrix mapping source pixel coordinates to output coordinates.

    Composes, in order: resize of the whole (height x width) image to (size x size),
    horizontal flip, rotation by `angle_degrees` counter-clockwise about the output
    centre. Coordinates are pixel centres at integer + 0.5 on both sides, the convention
    of OpenCV's `warpAffine` after its half-pixel shift and of DALI's `warp_affine`,
    so one matrix drives both backends.
    """
    return affine_matrices([height], [width], size, [flip], [angle_degrees])[0]


def affine_matrices(heights: Sequence[int] | np.ndarray, widths: Sequence[int] | np.ndarray, size: int,
                    flips: Sequence[bool] | np.ndarray, angles_degrees: Sequence[float] | np.ndarray) -> np.ndarray:
    """N x 2 x 3 float64: `affine_matrix` of each (height, width, flip, angle), written out for a whole batch.

    rotate @ flip @ resize multiplied by hand: [[a, b, tx], [c, d, ty]] with the resize
    scales on the columns, the flip negating the first column and moving x by `size`.
    """
    sx = size / np.asarray(widths, dtype=np.float64)
    sy = size / np.asarray(heights, dtype=np.float64)
    theta = np.radians(np.asarray(angles_degrees, dtype=np.float64))
    cos, sin = np.cos(theta), np.sin(theta)
    sign = np.where(np.asarray(flips, dtype=bool), -1.0, 1.0)
    shift = np.where(sign < 0, float(size), 0.0)  # the flip's x translation, before the rotation
    c = size / 2.0
    # Counter-clockwise on screen (y down) as torchvision's RandomRotation with positive angles.
    out = np.empty((len(sx), 2, 3), dtype=np.float64)
    out[:, 0, 0], out[:, 0, 1] = cos * sign * sx, sin * sy
    out[:, 1, 0], out[:, 1, 1] = -sin * sign * sx, cos * sy
    out[:, 0, 2] = cos * shift + c - cos * c - sin * c
    out[:, 1, 2] = -sin * shift + c + sin * c - cos * c
    return out
