"""Model inputs from image files or arrays: the spec's eval geometry, outside any pack.

`preprocess` is what `trainer predict` runs on the user's files, and `resize_cpu` is
the same eval resize the torch backend's CPU path applies to every eval sample of a
pack, so a file predicted alone and the same image evaluated from a pack get the same
pixels (the packer stores a file as `pack_sources.load_rgb` reads it).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from .geometry import eval_shrinks, preshrink_numpy, resize_shrink_factors
from .loader import to_model_input
from .pack_sources import load_rgb
from .spec import PipelineSpec

ImageOrPath = Union[np.ndarray, str, os.PathLike]


def resize_cpu(image: np.ndarray, spec: PipelineSpec, out: torch.Tensor) -> None:
    """Eval geometry of one decoded H x W x 3 uint8 RGB image into `out` (S x S x 3 uint8 tensor).

    A photo more than `geometry.EVAL_MAX_DOWNSCALE` times the size is first shrunk by an
    integer factor (area average), as the torch backend's GPU path does.
    """
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    modes = {"linear": InterpolationMode.BILINEAR, "cubic": InterpolationMode.BICUBIC,
             "nearest": InterpolationMode.NEAREST}
    size = spec.image_size
    if eval_shrinks(spec):
        image = preshrink_numpy(image, *resize_shrink_factors(*image.shape[:2], size))
    # torchvision's uint8 kernel is PIL's filter (triangle widened by the scale), ~3x faster than PIL here.
    resized = resize(torch.from_numpy(image).permute(2, 0, 1), [size, size], interpolation=modes[spec.interpolation],
                     antialias=spec.eval_antialias)
    out.copy_(resized.permute(1, 2, 0))


def preprocess(images_or_paths: Sequence[ImageOrPath], spec: PipelineSpec, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Images (H x W x 3 uint8 RGB arrays, or image files) -> the model's N x 3 x S x S input on `device`.

    The spec's eval geometry (resize to S x S) on the host, then normalization on the
    device, channels_last, as every backend's eval batches. A file that cannot be read
    raises `ValueError` naming it.
    """
    if len(images_or_paths) == 0:
        raise ValueError("preprocess needs at least one image")
    size = spec.image_size
    pixels = torch.empty((len(images_or_paths), size, size, 3), dtype=torch.uint8)
    for row, item in enumerate(images_or_paths):
        image = item if isinstance(item, np.ndarray) else load_rgb(Path(item))
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image {row}: expected H x W x 3 uint8 RGB, got {image.dtype} {image.shape}")
        resize_cpu(image, spec, pixels[row])
    return to_model_input(pixels.to(device), spec, dtype)
