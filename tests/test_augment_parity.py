"""The training augmentations through the real loaders: the same pixels in every backend, and torchvision's own.

One spec with a random-resized crop, colour jitter and random erasing; the same pack,
seed and epoch. Measured on the demo pack (48-160 px, S = 32, 44 training images):

* torch CPU path (OpenCV warp) against its GPU path run on CPU tensors (`grid_sample`):
  at most 1.4 levels of 255 apart anywhere; against DALI (CPU operators): at most 2.1
  levels, mean 0.0003 level (three seed/epoch pairs; the jitter's factors, up to 1.4 each,
  stretch the warps' one-level rounding differences). Chosen: 4 levels, mean 0.01 level.
  The same batch without the jitter is at least 4.1 levels away on average in every
  image, so the jitter is really there.
* The crop and flip against torchvision's `resized_crop` + `hflip` (no rotation), on the
  box and flip the loader drew: at most 1 level inside the image; the outermost ring
  differs where the box is not the image's edge (torchvision clamps to the box, the warp
  reads the real neighbours). Chosen: 2 levels inside.
* The colour jitter and erasing against torchvision's `adjust_*` and `erase`, sample by
  sample on the same warped pixels with the parameters the loader drew: float rounding
  only (< 1e-4). Chosen: 1e-4.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dali_pipes import IMAGENET_MEAN, IMAGENET_STD, PackReader, PipelineSpec, build_loader, draws
from dali_pipes.color import BRIGHTNESS, CONTRAST, SATURATION, jitter_parameters
from dali_pipes.crop import crop_boxes
from dali_pipes.erasing import erasing_boxes
from dali_pipes.geometry import sample_augmentation
from dali_pipes.loader import LoaderRequest
from dali_pipes.torch_backend import TorchLoader

LEVEL = 1.0 / (255.0 * max(IMAGENET_STD))  # one uint8 level in normalized units, at its largest
SEED, EPOCH, SIZE = 4, 3, 32
AUGMENTED = PipelineSpec(image_size=SIZE, crop_scale=(0.25, 1.0), color_jitter=(0.4, 0.4, 0.4), random_erasing=0.5)


def _batches(loader) -> tuple[np.ndarray, np.ndarray]:
    loader.set_epoch(EPOCH)
    images, labels = zip(*loader)
    return torch.cat(images).numpy().astype(np.float64), torch.cat(labels).numpy()


def train_batches(pack: Path, backend: str, spec: PipelineSpec, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    args = dict(batch_size=8, train=True, spec=spec, seed=SEED, num_workers=2 if backend == "dali" else 0)
    return _batches(build_loader(pack, "train", backend=backend, **{**args, **kwargs}))


def gpu_path_batches(pack: Path, spec: PipelineSpec) -> tuple[np.ndarray, np.ndarray]:
    """The torch backend's GPU path (device decode, one batched `grid_sample`), run on CPU tensors."""
    reader = PackReader(pack)
    request = LoaderRequest(reader.split_indices("train"), spec, True, 8, seed=SEED)
    return _batches(TorchLoader(reader, request, gpu_decode=True))


@pytest.fixture(scope="module")
def torch_cpu(demo_pack: Path) -> tuple[np.ndarray, np.ndarray]:
    return train_batches(demo_pack, "torch", AUGMENTED)


def visited(pack: Path) -> np.ndarray:
    """The pack indices the train batches hold, in order."""
    loader = build_loader(pack, "train", backend="synthetic", batch_size=8, train=True, seed=SEED)
    loader.set_epoch(EPOCH)
    return np.concatenate(list(loader._cursor.batches()))


def test_gpu_path_gives_the_cpu_paths_pixels(demo_pack: Path, torch_cpu) -> None:
    images, labels = gpu_path_batches(demo_pack, AUGMENTED)
    assert np.array_equal(labels, torch_cpu[1])
    assert np.abs(images - torch_cpu[0]).max() <= 4 * LEVEL
    plain = gpu_path_batches(demo_pack, PipelineSpec(image_size=SIZE, crop_scale=(0.25, 1.0)))[0]
    assert (np.abs(plain - torch_cpu[0]).mean(axis=(1, 2, 3)) > 2 * LEVEL).all()  # the jitter is there


@pytest.mark.dali
def test_dali_gives_the_torch_backends_pixels(demo_pack: Path, torch_cpu) -> None:
    images, labels = train_batches(demo_pack, "dali", AUGMENTED)
    assert np.array_equal(labels, torch_cpu[1])
    diff = np.abs(images - torch_cpu[0])
    # The torch CPU path rounds the pre-shrunk image to uint8 (as OpenCV's INTER_AREA does); DALI warps the block
    # means in float. That is up to half a level per pre-shrunk pixel: measured 0.10 level on average, 2.4 at most.
    assert diff.max() <= 4 * LEVEL and diff.mean() <= 0.25 * LEVEL, (diff.max() / LEVEL, diff.mean() / LEVEL)


def test_crop_and_flip_equal_torchvisions_on_the_drawn_box(demo_pack: Path) -> None:
    # The plain warp against torchvision's plain resize: the box and the flip are what is checked here (the
    # pre-shrink that antialiases large downscales has its own tests against INTER_AREA and PIL).
    spec = PipelineSpec(image_size=SIZE, crop_scale=(0.25, 1.0), rotation_degrees=0.0, train_antialias=False)
    ours = train_batches(demo_pack, "torch", spec, dtype=torch.uint8)[0].transpose(0, 2, 3, 1)
    reader, indices = PackReader(demo_pack), visited(demo_pack)
    (u,) = draws.sample_draws(SEED, EPOCH, indices, draws.CROP)
    boxes = crop_boxes(reader.heights[indices], reader.widths[indices], spec.crop_scale, spec.crop_ratio, u)
    flips, _ = sample_augmentation(spec, SEED, EPOCH, indices)
    assert 0 < flips.mean() < 1 and (boxes[:, 2] < reader.heights[indices]).any()  # flips and real crops both occur
    for j, index in enumerate(indices):
        image = decode_jpeg(torch.from_numpy(np.array(reader.image_bytes(int(index))))).float()
        top, left, height, width = (int(v) for v in boxes[j])
        theirs = TF.resized_crop(image, top, left, height, width, [SIZE, SIZE], InterpolationMode.BILINEAR,
                                 antialias=False)
        theirs = (TF.hflip(theirs) if flips[j] else theirs).round().permute(1, 2, 0).numpy()
        assert np.abs(ours[j] - theirs)[1:-1, 1:-1].max() <= 2, index


def test_jitter_and_erasing_equal_torchvisions_with_the_drawn_parameters(demo_pack: Path, torch_cpu) -> None:
    geometry_only = PipelineSpec(image_size=SIZE, crop_scale=(0.25, 1.0))
    pixels = torch.from_numpy(train_batches(demo_pack, "torch", geometry_only, dtype=torch.uint8)[0]) / 255.0
    indices = visited(demo_pack)
    u_color, u_erase = draws.sample_draws(SEED, EPOCH, indices, draws.COLOR, draws.ERASE)
    factors, order = jitter_parameters(AUGMENTED.color_jitter, u_color)
    boxes = erasing_boxes(SIZE, SIZE, AUGMENTED.random_erasing, u_erase)
    adjust = {BRIGHTNESS: TF.adjust_brightness, CONTRAST: TF.adjust_contrast, SATURATION: TF.adjust_saturation}
    expected = []
    for image, factor, ops, box in zip(pixels.float(), factors, order, boxes):
        for op in ops:
            image = adjust[int(op)](image, float(factor[op]))
        image = TF.normalize(image, list(IMAGENET_MEAN), list(IMAGENET_STD))
        if box[2] > 0:
            image = TF.erase(image, *(int(v) for v in box), v=torch.zeros(3, 1, 1))
        expected.append(image)
    np.testing.assert_allclose(torch_cpu[0], torch.stack(expected).numpy(), atol=1e-4, rtol=0)
    assert 0 < (boxes[:, 2] > 0).sum() < len(boxes)  # some samples erased, some not


@pytest.mark.dali
def test_a_new_image_size_reaches_every_backend(demo_pack: Path) -> None:
    for backend in ("torch", "dali", "synthetic"):
        loader = build_loader(demo_pack, "train", backend=backend, batch_size=8, train=True, spec=AUGMENTED, seed=SEED,
                              num_workers=1)
        for epoch, size in ((0, 32), (1, 48), (2, 32)):
            loader.set_epoch(epoch, image_size=size)
            images, _ = next(iter(loader))
            assert images.shape[-2:] == (size, size) and loader.spec.image_size == size, (backend, epoch)
