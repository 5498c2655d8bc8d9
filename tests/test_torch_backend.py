"""The torch backend against independent computations: PIL resizes, torchvision rotations,
hand-written normalization, and the pack's own labels."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from dali_pipes import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDecodeError,
    PackReader,
    PipelineSpec,
    build_loader,
    plan_epoch,
    sample_augmentation,
)
from dali_pipes.geometry import affine_matrices, affine_matrix, train_matrices
from dali_pipes.torch_cpu import decode_image, render_batch_cpu, warp_cpu
from dali_pipes.torch_gpu import transform_images

SIZE = 40


def loader(pack: Path, split: str = "val", *, train: bool = False, size: int = SIZE, batch_size: int = 4,
           workers: int = 0, dtype: torch.dtype = torch.float32, spec: PipelineSpec | None = None,
           device: str = "cpu", **kw):
    return build_loader(pack, split, backend="torch", batch_size=batch_size, train=train, image_size=size,
                        device=device, dtype=dtype, num_workers=workers, spec=spec, **kw)


def collect(batches) -> tuple[np.ndarray, np.ndarray]:
    images, labels = zip(*batches)
    return torch.cat(images).float().numpy(), torch.cat(labels).numpy()


def pil_rgb(reader: PackReader, index: int) -> Image.Image:
    return Image.open(io.BytesIO(reader.image_bytes(index).tobytes())).convert("RGB")


def pil_eval(reader: PackReader, index: int, size: int = SIZE) -> np.ndarray:
    """The reference eval rendering: PIL bilinear (antialiased) resize, H x W x 3 uint8."""
    return np.asarray(pil_rgb(reader, index).resize((size, size), Image.Resampling.BILINEAR))


def normalize(pixels: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """N x H x W x 3 uint8 -> N x 3 x H x W float, written out by hand."""
    x = pixels.astype(np.float64) / 255.0
    x = (x - np.array(mean)) / np.array(std)
    return x.transpose(0, 3, 1, 2)


def max_levels(out: np.ndarray, ref: np.ndarray) -> float:
    """Largest difference in uint8 levels between two normalized batches."""
    return float((np.abs(out - ref) * np.array(IMAGENET_STD).reshape(1, 3, 1, 1) * 255.0).max())


# ---------------------------------------------------------------------------- eval

def test_eval_matches_pil_resize_and_hand_normalization(demo_pack: Path) -> None:
    reader = PackReader(demo_pack)
    indices = reader.split_indices("val")
    out, labels = collect(loader(demo_pack))
    pixels = np.stack([pil_eval(reader, int(i)) for i in indices])
    assert max_levels(out, normalize(pixels)) <= 1.0 + 1e-3
    np.testing.assert_array_equal(labels, reader.labels[indices])
    # The tolerance is tight enough to catch each of these mistakes.
    wrong = {
        "mean/std swapped": normalize(pixels, mean=IMAGENET_STD, std=IMAGENET_MEAN),
        "BGR": normalize(pixels[..., ::-1]),
        "one-pixel shift": normalize(np.roll(pixels, 1, axis=2)),
        "flipped": normalize(pixels[:, :, ::-1]),
        "no antialias": normalize(np.stack([np.asarray(pil_rgb(reader, int(i)).resize((SIZE, SIZE),
                                                                                      Image.Resampling.NEAREST))
                                            for i in indices])),
    }
    for name, ref in wrong.items():
        assert max_levels(out, ref) > 3.0, name


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_layout_and_values(demo_pack: Path, dtype: torch.dtype) -> None:
    reader = PackReader(demo_pack)
    indices = reader.split_indices("val")[:4]
    images, labels = next(iter(loader(demo_pack, dtype=dtype)))
    assert images.dtype == dtype and labels.dtype == torch.int64
    assert images.shape == (4, 3, SIZE, SIZE)
    assert images.is_contiguous(memory_format=torch.channels_last)
    pixels = np.stack([pil_eval(reader, int(i)) for i in indices])
    if dtype == torch.uint8:
        assert np.abs(images.numpy().astype(int) - pixels.transpose(0, 3, 1, 2)).max() <= 1
    else:
        # float16 keeps ~3 decimal digits, bfloat16 ~2, on values within +-2.7.
        tolerance = {torch.float32: 1.01, torch.float16: 1.5, torch.bfloat16: 5.0}[dtype]
        assert max_levels(images.float().numpy(), normalize(pixels)) <= tolerance


# ---------------------------------------------------------------------------- train geometry

def _asymmetric_image(size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 2] = (xx * 255 // size).astype(np.uint8)
    image[4 : size - 8, 6:12] = (255, 40, 0)  # an "L": a vertical bar ...
    image[size - 14 : size - 8, 6 : size // 2] = (20, 200, 90)  # ... and its foot, on the left
    image[..., 1] += (yy * 2).astype(np.uint8)
    return image


@pytest.mark.parametrize("renderer", ["opencv", "torch"])
def test_positive_angle_rotates_like_torchvision(renderer: str) -> None:
    size = 48
    image = _asymmetric_image(size)
    spec = PipelineSpec(image_size=size)
    if renderer == "opencv":
        out = np.empty((size, size, 4), np.uint8)
        warp_cpu(cv2.cvtColor(image, cv2.COLOR_RGB2RGBA), spec, affine_matrix(size, size, size, False, 20.0), out)
        out = out[..., :3]
    else:
        chw = torch.from_numpy(image).permute(2, 0, 1)
        out = transform_images([chw], spec, affine_matrices([size], [size], size, [False], [20.0]))[0].numpy()

    def rotated(angle: float) -> np.ndarray:
        chw = torch.from_numpy(image).permute(2, 0, 1)
        return TF.rotate(chw, angle, interpolation=TF.InterpolationMode.BILINEAR, fill=0).permute(1, 2, 0).numpy()

    # torchvision fills partly-outside border pixels by a 0.5 mask threshold, OpenCV blends them:
    # compare away from the rotated border, where both are plain bilinear.
    inside = cv2.erode(_rotated_support(size, 20.0), np.ones((5, 5), np.uint8))
    same = np.abs(out.astype(int) - rotated(20.0))[inside > 0]
    opposite = np.abs(out.astype(int) - rotated(-20.0)).mean()
    assert same.max() <= 2 and opposite > 10


def _rotated_support(size: int, angle: float) -> np.ndarray:
    ones = torch.ones(1, size, size)
    return (TF.rotate(ones, angle, interpolation=TF.InterpolationMode.NEAREST, fill=0)[0].numpy() > 0).astype(np.uint8)


def test_flip_mirrors_columns() -> None:
    size = 32
    image = _asymmetric_image(size)
    out = np.empty((size, size, 4), np.uint8)
    warp_cpu(cv2.cvtColor(image, cv2.COLOR_RGB2RGBA), PipelineSpec(image_size=size),
             affine_matrix(size, size, size, True, 0.0), out)
    np.testing.assert_array_equal(out[..., :3], image[:, ::-1])


def _plan_indices(reader: PackReader, epoch: int, batch_size: int, seed: int = 0) -> np.ndarray:
    plan = plan_epoch(reader.split_indices("train"), train=True, seed=seed, epoch=epoch, batch_size=batch_size)
    return plan.indices[: plan.num_samples]


def test_train_flips_follow_sample_augmentation(demo_pack: Path) -> None:
    reader = PackReader(demo_pack)
    spec = PipelineSpec(image_size=SIZE, rotation_degrees=0.0)
    train = loader(demo_pack, "train", train=True, spec=spec, batch_size=4, dtype=torch.uint8, seed=3)
    detected, drawn = [], []
    for epoch in range(3):
        train.set_epoch(epoch)
        out, labels = collect(train)
        indices = _plan_indices(reader, epoch, 4, seed=3)
        np.testing.assert_array_equal(labels, reader.labels[indices])
        for image, index in zip(out, indices):
            plain = pil_eval(reader, int(index)).transpose(2, 0, 1).astype(np.float32)
            # Train resizes without antialiasing, so compare by distance, not equality.
            detected.append(np.abs(image - plain[:, :, ::-1]).mean() < np.abs(image - plain).mean())
        drawn.extend(sample_augmentation(spec, 3, epoch, indices)[0])
    assert detected == drawn
    assert 0.3 < np.mean(detected) < 0.7


def test_train_angles_within_range_and_as_drawn(demo_pack: Path) -> None:
    reader = PackReader(demo_pack)
    size = 56
    spec = PipelineSpec(image_size=size, flip_prob=0.0, rotation_degrees=10.0)
    train = loader(demo_pack, "train", train=True, spec=spec, size=size, batch_size=8, dtype=torch.uint8, seed=5)
    out, _ = collect(train)
    indices = _plan_indices(reader, 0, 8, seed=5)
    _, angles = sample_augmentation(spec, 5, 0, indices)
    # Independent rendering: PIL decode, torchvision resize (no antialias, as train), torchvision rotate.
    bases = torch.stack([TF.resize(torch.from_numpy(np.asarray(pil_rgb(reader, int(i))).copy()).permute(2, 0, 1),
                                   [size, size], antialias=False) for i in indices])
    candidates = np.arange(-14.0, 14.01, 0.5)
    errors = np.stack([np.abs(TF.rotate(bases, float(a), interpolation=TF.InterpolationMode.BILINEAR).numpy()
                              .astype(np.float32) - out)[:, :, 8:-8, 8:-8].mean(axis=(1, 2, 3)) for a in candidates])
    estimated = candidates[errors.argmin(axis=0)]
    assert np.abs(estimated).max() <= 10.5
    assert np.abs(estimated - angles).max() <= 1.5
    assert estimated.min() < -3 and estimated.max() > 3  # both directions occur
    # Black corners grow with the angle: the most rotated image has more black than the least.
    black = (out.max(axis=1) == 0).mean(axis=(1, 2))
    assert black[np.argmax(np.abs(angles))] > black[np.argmin(np.abs(angles))]


def test_torch_geometry_matches_opencv_geometry(demo_pack: Path) -> None:
    """The GPU path's geometry (run here on the CPU) agrees with the CPU path's."""
    reader = PackReader(demo_pack)
    spec = PipelineSpec(image_size=SIZE)
    indices = reader.split_indices("train")[:16]
    matrices = train_matrices(spec, 0, 0, indices, reader.heights[indices], reader.widths[indices])
    decoded = [torch.from_numpy(np.asarray(pil_rgb(reader, int(i))).copy()).permute(2, 0, 1) for i in indices]
    for train in (True, False):
        cpu, skipped = render_batch_cpu(reader, indices, spec, matrices if train else None)
        assert skipped == []
        cpu = cpu.numpy().astype(int)
        gpu_path = transform_images(decoded, spec, matrices if train else None).numpy().astype(int)
        diff = np.abs(cpu - gpu_path)
        assert diff.max() <= 2 and diff.mean() < 0.2, (train, diff.max(), diff.mean())


# ---------------------------------------------------------------------------- loader behaviour

@pytest.mark.slow
def test_deterministic_across_loaders_and_worker_counts(demo_pack: Path) -> None:
    first = collect(loader(demo_pack, "train", train=True, batch_size=8, dtype=torch.uint8, seed=11))
    second = collect(loader(demo_pack, "train", train=True, batch_size=8, dtype=torch.uint8, seed=11))
    workers = collect(loader(demo_pack, "train", train=True, batch_size=8, dtype=torch.uint8, seed=11, workers=2))
    other_seed = collect(loader(demo_pack, "train", train=True, batch_size=8, dtype=torch.uint8, seed=12))
    for run in (second, workers):
        np.testing.assert_array_equal(run[0], first[0])
        np.testing.assert_array_equal(run[1], first[1])
    assert not np.array_equal(other_seed[0], first[0])


def test_set_epoch_reorders_and_start_batch_skips(demo_pack: Path) -> None:
    train = loader(demo_pack, "train", train=True, batch_size=8, dtype=torch.uint8)
    epoch0 = list(train)
    train.set_epoch(1)
    epoch1 = list(train)
    assert len(epoch0) == len(epoch1) == len(train) == 44 // 8
    assert not torch.equal(torch.cat([x for x, _ in epoch0]), torch.cat([x for x, _ in epoch1]))
    train.set_epoch(1, start_batch=2)
    resumed = list(train)
    assert len(train) == 44 // 8  # len() is the epoch's, not what is left
    assert len(resumed) == len(epoch1) - 2
    for (x, y), (x1, y1) in zip(resumed, epoch1[2:]):
        assert torch.equal(x, x1) and torch.equal(y, y1)


@pytest.mark.parametrize("train,drop_last,batch_size",
                         [(True, True, 8), (True, False, 8), (False, False, 5), (False, True, 5)])
def test_len_is_exact(demo_pack: Path, train: bool, drop_last: bool, batch_size: int) -> None:
    split = "train" if train else "val"
    n = len(PackReader(demo_pack).split_indices(split))
    batches = loader(demo_pack, split, train=train, batch_size=batch_size, dtype=torch.uint8, drop_last=drop_last)
    sizes = [len(y) for _, y in batches]
    expected = n // batch_size if drop_last else -(-n // batch_size)
    assert len(batches) == len(sizes) == expected
    assert batches.num_samples == sum(sizes)


def _corrupt_copy(pack: Path, tmp_path: Path, index: int) -> Path:
    copy = tmp_path / "corrupt.h5"
    shutil.copy(pack, copy)
    offsets = PackReader(copy).offsets
    with h5py.File(copy, "r+") as f:
        f["images"][offsets[index] + 2 : offsets[index + 1]] = 0  # keep the JPEG start marker, lose the rest
    return copy


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_jpeg_names_index_and_path(demo_pack: Path, tmp_path: Path, workers: int) -> None:
    # The loader skips it (tests/test_corrupt_images.py checks that fully); the decoder names it.
    reader = PackReader(demo_pack)
    bad = int(reader.split_indices("val")[2])
    corrupt = _corrupt_copy(demo_pack, tmp_path, bad)
    batches = loader(corrupt, "val", workers=workers)
    labels = torch.cat([y for _, y in batches])
    assert len(labels) == len(reader.split_indices("val")) - 1
    assert [(s.index, s.path) for s in batches.skipped] == [(bad, reader.paths[bad])]
    with pytest.raises(ImageDecodeError, match="cannot be decoded") as info:
        decode_image(PackReader(corrupt), bad, 3)
    assert f"image {bad} " in str(info.value) and reader.paths[bad] in str(info.value)


# ---------------------------------------------------------------------------- GPU path

@pytest.mark.cuda
@pytest.mark.parametrize("train", [True, False])
def test_cuda_path_matches_cpu_path(demo_pack: Path, train: bool) -> None:
    split = "train" if train else "val"
    gpu = loader(demo_pack, split, train=train, batch_size=8, dtype=torch.uint8, device="cuda")
    cpu = loader(demo_pack, split, train=train, batch_size=8, dtype=torch.uint8)
    assert gpu.gpu_decode, "torchvision could not decode on this GPU"
    for (xg, yg), (xc, yc) in zip(gpu, cpu):
        assert xg.device.type == "cuda" and yg.device.type == "cuda"
        assert xg.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(yg.cpu(), yc)
        diff = (xg.cpu().int() - xc.int()).abs()
        # nvJPEG's IDCT may differ from libjpeg-turbo's by a level or two before geometry.
        assert diff.float().mean() < 1.0 and (diff > 4).float().mean() < 0.01


@pytest.mark.cuda
def test_cuda_float_output(demo_pack: Path) -> None:
    images, labels = next(iter(loader(demo_pack, dtype=torch.float16, device="cuda")))
    assert images.device.type == "cuda" and images.dtype == torch.float16 and labels.device.type == "cuda"
    assert images.is_contiguous(memory_format=torch.channels_last)
