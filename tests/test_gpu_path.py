"""The torch backend's GPU path run on CPU tensors: the vectorized augmentation draw, the
batched warp, decode -> warp -> normalize against the OpenCV path, the prefetcher's order,
the cached normalization constants, and the data-wait clock. Only nvJPEG and streams are
left to tests/test_cuda.py.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from dali_pipes import PackReader, PipelineSpec
from dali_pipes.geometry import affine_matrices, affine_matrix, sample_augmentation, train_matrices
from dali_pipes.loader import normalization_constants, to_model_input
from dali_pipes.prefetch import Prefetcher
from dali_pipes.seeded import uniforms
from dali_pipes.torch_cpu import render_batch_cpu, warp_cpu
from dali_pipes.torch_gpu import decode_on_device, transform_images
from trainer.data_wait import DataWaitClock
from trainer.loop import topk_credit

# ---------------------------------------------------------------------------- augmentation draw


def _per_sample(spec: PipelineSpec, seed: int, epoch: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The draw as it was written before vectorizing: one generator per sample."""
    flips, angles = [], []
    for index in indices:
        u_flip, u_angle = np.random.default_rng((seed, epoch, int(index))).random(2)
        flips.append(u_flip < spec.flip_prob)
        angles.append(np.float32((2.0 * u_angle - 1.0) * spec.rotation_degrees))
    return np.array(flips, dtype=bool), np.array(angles, dtype=np.float32)


@pytest.mark.parametrize("seed, epoch", [(0, 0), (3, 1), (12345, 17), (2**32 + 7, 2**33), (2**64 + 1, 5)])
def test_vectorized_draw_equals_one_generator_per_sample(seed: int, epoch: int) -> None:
    spec = PipelineSpec(flip_prob=0.3, rotation_degrees=25.0)
    indices = np.random.default_rng(seed % 1000).integers(0, 2**32, 200)
    indices[:3] = [0, 1, 2**32 - 1]
    flips, angles = sample_augmentation(spec, seed, epoch, indices)
    ref_flips, ref_angles = _per_sample(spec, seed, epoch, indices)
    np.testing.assert_array_equal(flips, ref_flips)
    np.testing.assert_array_equal(angles, ref_angles)  # bit for bit, not approximately
    assert flips.dtype == bool and angles.dtype == np.float32


def test_uniforms_are_default_rng_draws_and_reject_what_it_cannot_emulate() -> None:
    indices = np.array([5, 0, 77, 5])
    expected = np.stack([np.random.default_rng((9, 2, int(i))).random(3) for i in indices])
    np.testing.assert_array_equal(uniforms((9, 2), indices, 3), expected)
    assert uniforms((9, 2), np.zeros(0, np.int64), 2).shape == (0, 2)
    for key, bad in (((1, 2), [2**32]), ((1, 2), [-1]), ((-1, 2), [0])):
        with pytest.raises(ValueError):
            uniforms(key, np.array(bad), 2)


def test_affine_matrices_hand_values() -> None:
    # 20 wide x 10 high -> 8 x 8: x scales by 0.4, y by 0.8; flip: x -> 8 - x; 90 degrees
    # counter-clockwise about (4, 4) on screen: x -> y, y -> 8 - x.
    np.testing.assert_allclose(affine_matrix(10, 20, 8, True, 90.0), [[0.0, 0.8, 0.0], [0.4, 0.0, 0.0]], atol=1e-12)
    np.testing.assert_allclose(affine_matrix(10, 20, 8, False, 0.0), [[0.4, 0.0, 0.0], [0.0, 0.8, 0.0]], atol=1e-12)
    batch = affine_matrices([10, 10], [20, 20], 8, [True, False], [90.0, 0.0])
    np.testing.assert_allclose(batch[0], affine_matrix(10, 20, 8, True, 90.0))
    np.testing.assert_allclose(batch[1], affine_matrix(10, 20, 8, False, 0.0))


# ---------------------------------------------------------------------------- batched warp

def _textured(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth RGB image (bilinear resampling of it is well defined to a level or two)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    channels = [127 + 120 * np.sin(xx / (5 + c) + yy / (7 + 2 * c) + phase[c]) for c in range(3)]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("fill, interpolation", [(0, "linear"), (90, "linear"), (0, "nearest")])
def test_batched_warp_of_mixed_sizes_matches_opencv_per_image(fill: int, interpolation: str) -> None:
    size = 32
    spec = PipelineSpec(image_size=size, fill=fill, interpolation=interpolation, rotation_degrees=30.0)
    shapes = [(40, 56), (61, 33), (32, 32), (50, 90), (40, 56)]
    images = [_textured(h, w, j) for j, (h, w) in enumerate(shapes)]
    heights, widths = np.array(shapes).T
    matrices = train_matrices(spec, 4, 0, np.arange(len(images)), heights, widths)
    batch = transform_images([torch.from_numpy(im).permute(2, 0, 1) for im in images], spec, matrices)
    assert batch.shape == (len(images), size, size, 3) and batch.dtype == torch.uint8
    for j, image in enumerate(images):
        ref = np.empty((size, size, 4), np.uint8)
        warp_cpu(cv2.cvtColor(image, cv2.COLOR_RGB2RGBA), spec, matrices[j], ref)
        diff = np.abs(batch[j].numpy().astype(int) - ref[..., :3])
        # The canvas padding must be invisible: the border blends into `fill` as OpenCV's does.
        limit = 2 if interpolation == "linear" else 255
        assert diff[1:-1, 1:-1].max() <= limit and diff.mean() < 0.5, (j, diff.max(), diff.mean())


@pytest.mark.parametrize("flip", [False, True])
def test_train_antialias_shrinks_before_the_warp_on_both_paths(flip: bool) -> None:
    # Both sides above S: the shrink alone makes S x S, and the warp, its matrix moved onto the
    # shrunk image, only flips. So the output is the plain antialiased resize, mirrored or not.
    # Measured: 0 levels apart (OpenCV path vs INTER_AREA), 1 (torch path vs torchvision); mirrored: ~90 mean.
    size, height, width = 32, 96, 160
    spec = PipelineSpec(image_size=size, train_antialias=True)
    image = _textured(height, width, 3)
    matrix = affine_matrix(height, width, size, flip, 0.0)
    opencv = np.empty((size, size, 4), np.uint8)
    warp_cpu(cv2.cvtColor(image, cv2.COLOR_RGB2RGBA), spec, matrix, opencv)
    area = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    torch_path = transform_images([torch.from_numpy(image).permute(2, 0, 1)], spec, matrix[None])[0].numpy()
    antialiased = TF.resize(torch.from_numpy(image).permute(2, 0, 1), [size, size], antialias=True).permute(1, 2, 0)
    for out, reference in ((opencv[..., :3], area), (torch_path, antialiased.numpy())):
        reference = reference[:, ::-1] if flip else reference
        assert np.abs(out.astype(int) - reference).max() <= 1
        assert np.abs(out.astype(int) - reference[:, ::-1]).mean() > 10  # a lost (or extra) flip shows


def _encoded(reader: PackReader, indices: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(np.array(reader.image_bytes(int(i)))) for i in indices]


@pytest.mark.parametrize("train", [True, False])
def test_gpu_path_on_cpu_tensors_matches_opencv_path(demo_pack: Path, train: bool) -> None:
    """decode_on_device (torchvision's CPU decoder here) -> transform_images -> to_model_input vs the OpenCV path."""
    reader = PackReader(demo_pack)
    spec = PipelineSpec(image_size=40)
    indices = reader.split_indices("train" if train else "val")[:12]
    matrices = train_matrices(spec, 2, 1, indices, reader.heights[indices], reader.widths[indices]) if train else None
    decoded, skipped = decode_on_device(reader, indices, _encoded(reader, indices), torch.device("cpu"))
    assert skipped == []
    gpu_path = to_model_input(transform_images(decoded, spec, matrices), spec, torch.float32)
    cpu_pixels, _ = render_batch_cpu(reader, indices, spec, matrices)
    cpu_path = to_model_input(cpu_pixels, spec, torch.float32)
    assert gpu_path.shape == (12, 3, 40, 40) and gpu_path.is_contiguous(memory_format=torch.channels_last)
    levels = ((gpu_path - cpu_path).abs() * torch.tensor(spec.std_255).view(1, 3, 1, 1)).numpy()
    if train:
        assert levels[:, :, 1:-1, 1:-1].max() <= 2.0 + 1e-3, levels.max()
    else:
        assert levels.max() <= 2.0 + 1e-3 and levels.mean() < 0.2, (levels.max(), levels.mean())


def test_decode_on_cpu_collects_a_corrupt_image_and_keeps_order(demo_pack: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.h5"
    shutil.copy(demo_pack, corrupt)
    reader = PackReader(demo_pack)
    indices = reader.split_indices("val")[:4]
    with h5py.File(corrupt, "r+") as f:
        f["images"][reader.offsets[indices[1]] + 2 : reader.offsets[indices[1] + 1]] = 0
    bad = PackReader(corrupt)
    images, skipped = decode_on_device(bad, indices, _encoded(bad, indices), torch.device("cpu"))
    assert [sample.index for sample in skipped] == [int(indices[1])]
    assert skipped[0].path == reader.paths[indices[1]] and skipped[0].reason
    assert [tuple(im.shape[1:]) for im in images] == [(reader.heights[i], reader.widths[i]) for i in indices[[0, 2, 3]]]


# ---------------------------------------------------------------------------- prefetcher

def _traced(lookahead: bool | None, items: list[int]) -> tuple[list[int], list[str]]:
    trace: list[str] = []

    def prepare(item: int) -> tuple[torch.Tensor, ...] | None:
        trace.append(f"prepare {item}")
        return None if item < 0 else (torch.full((2,), item),)

    seen = []
    for (batch,) in Prefetcher(items, prepare, torch.device("cpu"), lookahead=lookahead):
        trace.append(f"use {int(batch[0])}")
        seen.append(int(batch[0]))
    return seen, trace


def test_prefetcher_prepares_the_next_batch_before_handing_over_the_current() -> None:
    seen, trace = _traced(True, [0, 1, -1, 2])
    assert seen == [0, 1, 2]  # in order, the unusable item (None) left out
    assert trace == ["prepare 0", "prepare 1", "use 0", "prepare -1", "prepare 2", "use 1", "use 2"]


def test_prefetcher_on_cpu_is_a_plain_loop_unless_asked() -> None:
    seen, trace = _traced(None, [0, -1, 1])
    assert seen == [0, 1]
    assert trace == ["prepare 0", "use 0", "prepare -1", "prepare 1", "use 1"]


def test_prefetcher_passes_errors_through() -> None:
    def prepare(item: int) -> tuple[torch.Tensor, ...]:
        if item == 1:
            raise ValueError("bad batch")
        return (torch.zeros(1),)

    with pytest.raises(ValueError, match="bad batch"):
        list(Prefetcher([0, 1, 2], prepare, torch.device("cpu"), lookahead=True))


# ---------------------------------------------------------------------------- constants, top-k, data wait

def test_normalization_constants_made_once_per_device() -> None:
    spec = PipelineSpec(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    mean, inv_std = normalization_constants(spec.mean_255, spec.std_255, torch.device("cpu"))
    assert normalization_constants(spec.mean_255, spec.std_255, torch.device("cpu"))[0] is mean
    assert mean.flatten().tolist() == pytest.approx([127.5, 63.75, 0.0])
    assert inv_std.flatten().tolist() == pytest.approx([1 / 127.5, 1 / 63.75, 1 / 255.0])
    pixels = torch.tensor([[[[255, 0, 51]]]], dtype=torch.uint8)  # one pixel, NHWC
    assert to_model_input(pixels, spec, torch.float32).flatten().tolist() == pytest.approx([1.0, -1.0, 0.2])


def test_topk_credit_takes_ks_as_a_device_tensor() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0], [1.0, 1.0, 0.0]])
    labels = torch.tensor([2, 0])
    # sample 0: one class above -> top1 0, top2 1; sample 1: tied with one other -> top1 0.5, top2 1.
    expected = [[0.0, 0.5], [1.0, 1.0]]
    assert topk_credit(logits, labels, torch.tensor([1.0, 2.0])).tolist() == expected
    assert topk_credit(logits, labels, [1, 2]).tolist() == expected


def test_data_wait_clock_counts_only_the_wait_for_batches_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("trainer.data_wait.time.perf_counter", lambda: now[0])
    clock = DataWaitClock(torch.device("cpu"), seconds=1.0)  # 1 s carried over from a resumed epoch
    for fetch, step in [(2.0, 5.0), (0.5, 7.0), (0.25, 3.0)]:
        now[0] += fetch  # waiting for the batch
        clock.batch_arrived()
        now[0] += step  # the step itself
        clock.step_queued()
    assert clock.settle() == pytest.approx(1.0 + 2.0 + 0.5 + 0.25)
