"""The one preprocessing spec every backend reads, and its constants.

Nothing else in the project writes a mean, a std, an image size or a rotation range:
backends, the trainer, checkpoints and `predict` all go through `PipelineSpec`. The
per-sample geometry derived from it lives in `geometry`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224

INTERPOLATIONS = ("linear", "cubic", "nearest")
LAYOUTS = ("NCHW_channels_last",)
CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default aspect ratios (width / height)
# Keys a stored spec may hold that `PipelineSpec` does not: accepted and ignored, so every checkpoint
# loads. "dtype" is the loader's `dtype` argument (the model's input type), not part of the pixels.
IGNORED_KEYS = frozenset({"dtype"})


@dataclass(frozen=True)
class PipelineSpec:
    """Everything that decides what a model sees, for training and evaluation.

    Geometry: images are resized to `image_size` x `image_size` without keeping the
    aspect ratio (as the original notebook's ``Resize((224, 224))``). Training adds a
    horizontal flip with probability `flip_prob` and a rotation uniform in
    +-`rotation_degrees`, the uncovered corners filled with `fill` (black). Evaluation
    resizes with antialiasing (`eval_antialias`), as PIL and torchvision do; training
    does resize, rotate and flip in one bilinear warp, and with `train_antialias` (the
    default) a downscale of 2x or more is first an integer area pre-shrink, so training
    images are antialiased too (`geometry`, "the integer pre-shrink"). A spec stored with
    `train_antialias` False (checkpoints written before the pre-shrink) keeps the plain
    warp, which aliases large downscales (see README, "Preprocessing").
    Normalization uses `mean` and `std` on [0, 1] pixel values, RGB order.

    Further training augmentations, each off by default: `crop_scale` (min, max) makes the
    whole-image resize a random-resized crop (torchvision's `RandomResizedCrop` with
    `crop_ratio`), one more factor of the same warp; `color_jitter` (brightness, contrast,
    saturation strengths, as torchvision's `ColorJitter`) and `random_erasing` (a
    probability, as torchvision's `RandomErasing`) act on the batch, on the device
    (`augment`). `image_size` is what the loader makes: a trainer evaluates with the spec
    its checkpoint stores and may train at other sizes (`dataclasses.replace`).
    """

    image_size: int = DEFAULT_IMAGE_SIZE
    flip_prob: float = 0.5
    rotation_degrees: float = 10.0
    fill: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "linear"
    eval_antialias: bool = True
    train_antialias: bool = True
    layout: str = "NCHW_channels_last"
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = CROP_RATIO
    color_jitter: tuple[float, float, float] = (0.0, 0.0, 0.0)
    random_erasing: float = 0.0

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
        if self.crop_scale is not None:
            object.__setattr__(self, "crop_scale", check_range("crop scale", self.crop_scale, 0.0, 1.0))
        object.__setattr__(self, "crop_ratio", check_range("crop ratio", self.crop_ratio, 0.0, float("inf")))
        if len(self.color_jitter) != 3 or min(self.color_jitter) < 0:
            raise ValueError(f"color_jitter needs three non-negative strengths, got {list(self.color_jitter)}")
        if not 0.0 <= self.random_erasing <= 1.0:
            raise ValueError(f"random_erasing must be a probability in [0, 1], got {self.random_erasing}")
        # Tuples, not lists, so the frozen spec stays hashable after a JSON round trip.
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "color_jitter", tuple(float(c) for c in self.color_jitter))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (lists for tuples), as stored in checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PipelineSpec":
        """Inverse of `to_dict`; unknown keys are an error so a newer spec never half-loads (`IGNORED_KEYS` aside)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - IGNORED_KEYS)
        if unknown:
            raise ValueError(f"unknown pipeline spec keys: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known})

    @property
    def batch_augmented(self) -> bool:
        """Whether training batches get colour jitter or random erasing on the device (see `augment`)."""
        return any(self.color_jitter) or self.random_erasing > 0

    @property
    def mean_255(self) -> tuple[float, float, float]:
        """Mean on the 0-255 pixel scale, for normalizing uint8 batches in one step."""
        return tuple(255.0 * m for m in self.mean)  # type: ignore[return-value]

    @property
    def std_255(self) -> tuple[float, float, float]:
        """Std on the 0-255 pixel scale."""
        return tuple(255.0 * s for s in self.std)  # type: ignore[return-value]


def check_range(name: str, bounds: Sequence[float], low: float, high: float) -> tuple[float, float]:
    """`bounds` as a (min, max) pair with low < min <= max <= high, or a one-line ValueError naming `name`."""
    if len(bounds) != 2:
        raise ValueError(f"{name} needs two values MIN,MAX, got {list(bounds)}")
    lo, hi = float(bounds[0]), float(bounds[1])
    if not low < lo <= hi <= high:
        raise ValueError(f"{name} must satisfy {low:g} < MIN <= MAX <= {high:g}, got {lo:g},{hi:g}")
    return lo, hi
