"""The torch backend's GPU path run on CPU tensors: the vectorized augmentation draw, the
batched warp, decode -> warp -> normalize against the OpenCV path, the prefetcher's order,
the cached normalization constants, and the data-wait clock. Only nvJPEG and streams are
left to tests/test_cuda.py.
"""
from __future__ import annotations

import itertools
import shutil
import threading
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dali_pipes import PackReader, PipelineSpec
from dali_pipes.device import DECODE_PRIORITY, PREPARE_PRIORITY, DeviceStreams, device_streams
from dali_pipes.geometry import (
    affine_matrices,
    affine_matrix,
    sample_augmentation,
    train_matrices,
    warp_shrink_factors,
)
from dali_pipes.inputs import resize_cpu
from dali_pipes.loader import normalization_constants, to_model_input
from dali_pipes.prefetch import Prefetcher
from dali_pipes.seeded import uniforms
from dali_pipes.torch_cpu import render_batch_cpu, warp_cpu
from dali_pipes.torch_gpu import _canvas, _preshrunk, decode_on_device, resize_weights, transform_images
from trainer.data_wait import DataWaitClock
from trainer.scoring import topk_credit

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
def test_an_exact_integer_downscale_is_a_box_average_on_both_paths(flip: bool) -> None:
    # 128 x 256 onto 32 x 32 is 4x and 8x: the pre-shrink alone makes 32 x 32 and the warp, its
    # matrix moved onto the shrunk image, only flips. So both paths give OpenCV's INTER_AREA
    # resize (at an integer ratio, the plain block mean), mirrored or not.
    # Measured: 0 levels apart on the OpenCV path, at most 1 on the torch path; mirrored: ~90 mean.
    size, height, width = 32, 128, 256
    spec = PipelineSpec(image_size=size)
    assert spec.train_antialias  # the default
    image = _textured(height, width, 3)
    matrix = affine_matrix(height, width, size, flip, 0.0)
    opencv = np.empty((size, size, 4), np.uint8)
    warp_cpu(cv2.cvtColor(image, cv2.COLOR_RGB2RGBA), spec, matrix, opencv)
    torch_path = transform_images([torch.from_numpy(image).permute(2, 0, 1)], spec, matrix[None])[0].numpy()
    area = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    reference = area[:, ::-1] if flip else area
    for out, limit in ((opencv[..., :3], 0), (torch_path, 1)):
        assert np.abs(out.astype(int) - reference).max() <= limit
        assert np.abs(out.astype(int) - reference[:, ::-1]).mean() > 10  # a lost (or extra) flip shows


@pytest.mark.parametrize("interpolation, antialias", [("linear", True), ("linear", False), ("cubic", True),
                                                      ("cubic", False), ("nearest", False)])
def test_resize_weights_are_interpolates_own(interpolation: str, antialias: bool) -> None:
    # Heights and widths below, at and above the output size, with room to spare in the canvas.
    size, shapes = 24, [(24, 24), (97, 40), (13, 150), (60, 61)]
    images = [torch.rand(3, h, w, generator=torch.Generator().manual_seed(h * w)) * 255 for h, w in shapes]
    lengths = torch.tensor(shapes, dtype=torch.float32)
    wy = resize_weights(lengths[:, 0], 110, size, interpolation, antialias)
    wx = resize_weights(lengths[:, 1], 160, size, interpolation, antialias)
    assert wy.shape == (4, size, 110) and wx.shape == (4, size, 160)
    for n, (image, (h, w)) in enumerate(zip(images, shapes)):
        assert wy[n, :, h:].abs().sum() == 0 and wx[n, :, w:].abs().sum() == 0  # the canvas padding never counts
        ours = wy[n, :, :h] @ image @ wx[n, :, :w].T
        mode = {"linear": "bilinear", "cubic": "bicubic"}.get(interpolation, "nearest")
        extra = {} if mode == "nearest" else {"antialias": antialias, "align_corners": False}
        reference = F.interpolate(image[None], size=(size, size), mode=mode, **extra)[0]
        torch.testing.assert_close(ours, reference, atol=2e-3, rtol=1e-5)


def test_eval_of_mixed_and_huge_photos_is_one_batch_equal_to_the_cpu_path() -> None:
    # A 2000 px and a 1500 x 900 photo among small ones: both paths pre-shrink by the same integer
    # factors (ceil(side / 4S): 3 and 2 x 2 here), then resize antialiased. The reference is
    # independent of both: OpenCV's INTER_AREA by those factors, then PIL's bilinear resize.
    # Measured: 1 level at most between the paths, and from the reference.
    size, shapes = 160, [(2000, 2000), (1500, 900), (120, 90), (400, 300)]
    spec = PipelineSpec(image_size=size)
    images = [_textured(h, w, j) for j, (h, w) in enumerate(shapes)]
    gpu_path = transform_images([torch.from_numpy(im).permute(2, 0, 1) for im in images], spec, None).numpy()
    for j, (image, (h, w)) in enumerate(zip(images, shapes)):
        cpu_path = np.empty((size, size, 3), np.uint8)
        resize_cpu(image, spec, torch.from_numpy(cpu_path))
        fy, fx = -(-h // (4 * size)), -(-w // (4 * size))
        area = cv2.resize(image, (w // fx, h // fy), interpolation=cv2.INTER_AREA) if h % fy == w % fx == 0 else image
        reference = np.asarray(Image.fromarray(area).resize((size, size), Image.BILINEAR), dtype=int)
        for out in (gpu_path[j], cpu_path):
            assert np.abs(out.astype(int) - reference).max() <= 2, (j, np.abs(out.astype(int) - reference).max())
        assert np.abs(gpu_path[j].astype(int) - cpu_path).max() <= 2


def test_canvas_is_one_uint8_allocation_sized_by_the_shrunk_images() -> None:
    # One 4000 x 3000 photo among small ones: shrunk first (factors 124 and 92: d = 125 and 93.75),
    # the canvas holds uint8 at the largest shrunk size, not 4000 x 3000 float.
    spec = PipelineSpec(image_size=32, rotation_degrees=0.0, flip_prob=0.0)
    shapes = [(4000, 3000), (50, 40), (60, 45)]  # the small ones below 2x: not shrunk
    images = [torch.full((3, h, w), 10 * (j + 1), dtype=torch.uint8) for j, (h, w) in enumerate(shapes)]
    matrices = train_matrices(spec, 0, 0, np.arange(3), *np.array(shapes).T)
    fy, fx = warp_shrink_factors(matrices)
    shrunk = _preshrunk(images, fy, fx)
    canvas = _canvas(shrunk, spec.fill)
    assert canvas.dtype == torch.uint8 and tuple(canvas.shape) == (3, 3, 60, 45)
    assert tuple(shrunk[0].shape) == (3, 33, 33)  # ceil(4000 / 124), ceil(3000 / 92)
    for j, image in enumerate(shrunk):  # each image in its corner, padding = fill
        h, w = image.shape[-2:]
        assert (canvas[j, :, :h, :w] == 10 * (j + 1)).all() and (canvas[j, :, h:] == spec.fill).all()
    out = transform_images(images, spec, matrices)
    assert (out == torch.tensor([10, 20, 30], dtype=torch.uint8).view(3, 1, 1, 1)).all()  # flat images stay flat


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

def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dali_pipes-prefetch"]


def _numbered(item: int) -> tuple[torch.Tensor, ...] | None:
    return None if item < 0 else (torch.full((2,), item),)


def test_prefetcher_prepares_in_a_thread_and_hands_over_in_order() -> None:
    threads: set[int] = set()

    def prepare(item: int) -> tuple[torch.Tensor, ...] | None:
        threads.add(threading.get_ident())
        return _numbered(item)

    seen = [int(batch[0]) for (batch,) in Prefetcher([0, 1, -1, 2, 3], prepare, torch.device("cpu"), depth=2)]
    assert seen == [0, 1, 2, 3]  # in order, the unusable item (None) left out
    assert threads and threading.get_ident() not in threads
    assert _prefetch_threads() == []


def test_prefetcher_on_cpu_is_a_plain_loop_unless_asked() -> None:
    trace: list[str] = []

    def prepare(item: int) -> tuple[torch.Tensor, ...] | None:
        trace.append(f"prepare {item} in {'this' if threading.get_ident() == me else 'another'} thread")
        return _numbered(item)

    me = threading.get_ident()
    for (batch,) in Prefetcher([0, -1, 1], prepare, torch.device("cpu")):
        trace.append(f"use {int(batch[0])}")
    assert trace == ["prepare 0 in this thread", "use 0", "prepare -1 in this thread", "prepare 1 in this thread",
                     "use 1"]


@pytest.mark.parametrize("where", ["prepare", "items"])
def test_prefetcher_raises_a_failure_at_its_batch_and_leaves_no_thread(where: str) -> None:
    def items():
        yield 0
        if where == "items":
            raise ValueError("bad batch")
        yield 1
        yield 2

    def prepare(item: int) -> tuple[torch.Tensor, ...]:
        if item == 1:
            raise ValueError("bad batch")
        return _numbered(item)

    seen = []
    with pytest.raises(ValueError, match="bad batch"):
        for (batch,) in Prefetcher(items(), prepare, torch.device("cpu"), depth=2):
            seen.append(int(batch[0]))
    assert seen == [0] and _prefetch_threads() == []


def test_prefetcher_stops_its_thread_when_the_consumer_stops_early() -> None:
    prepared: list[int] = []

    def prepare(item: int) -> tuple[torch.Tensor, ...]:
        prepared.append(item)
        return _numbered(item)

    depth = 2
    batches = iter(Prefetcher(itertools.count(), prepare, torch.device("cpu"), depth=depth))
    taken = [int(next(batches)[0][0]) for _ in range(3)]
    batches.close()  # what a `break` in a for loop does to the generator
    assert taken == [0, 1, 2] and _prefetch_threads() == []
    # An endless source: the thread stopped, having run at most a full queue (and one batch waiting
    # for room) past what the consumer took.
    assert len(prepared) <= len(taken) + depth + 1


# ---------------------------------------------------------------------------- streams

def test_streams_are_made_once_per_device_and_kept() -> None:
    made: list[tuple[torch.device, int]] = []

    def new_stream(device: torch.device, priority: int) -> object:
        made.append((device, priority))
        return object()

    gpu = torch.device("cuda", 1)
    streams = DeviceStreams(gpu, new_stream)
    prepare, decode = streams.prepare, streams.decode
    for _epoch in range(3):  # every epoch and every loader asks again: the same streams come back
        assert streams.prepare is prepare and streams.decode is decode
    assert prepare is not decode
    assert made == [(gpu, PREPARE_PRIORITY), (gpu, DECODE_PRIORITY)] and PREPARE_PRIORITY != DECODE_PRIORITY
    assert DeviceStreams(torch.device("cpu"), new_stream).prepare is None and len(made) == 2
    # One holder per device for the whole process (nothing is made on CUDA until a stream is asked for).
    assert device_streams(torch.device("cuda:1")) is device_streams(gpu)
    assert device_streams(torch.device("cuda:0")) is not device_streams(gpu)


def test_only_the_stream_holder_makes_cuda_streams() -> None:
    # A stream taken anywhere else (per epoch, per loader) comes from torch's small round-robin pool
    # and sooner or later is some other user's stream.
    package = Path(__file__).resolve().parents[1] / "dali_pipes"
    makers = sorted(p.name for p in package.glob("*.py") if "cuda.Stream(" in p.read_text())
    assert makers == ["device.py"]


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


# ---------------------------------------------------------------------------- the CPU sync audit

def _armed_after_first(batches, audit):
    """`batches`, with the audit armed from the second batch until the last one has been taken.

    The first step may sync (constants made once per device); what the loop does after the
    last batch (the epoch's closing figures) is the next log boundary, where syncs belong.
    """
    audit.armed = False
    for k, batch in enumerate(batches):
        audit.armed = k >= 1
        yield batch
    audit.armed = False


def test_gpu_path_and_train_steps_never_sync_between_log_boundaries(demo_pack: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """What tests/test_cuda.py checks under set_sync_debug_mode("error"), counted on CPU tensors.

    The loop checks the loss every step on the CPU (a sync costs nothing there) and every
    --log-every steps on a GPU: the test asks for the GPU's interval.
    """
    from sync_audit import counting_host_syncs
    from torch import nn

    from dali_pipes.loader import LoaderRequest
    from dali_pipes.torch_backend import TorchLoader
    from trainer.loop import StepConfig, train_one_epoch

    monkeypatch.setattr("trainer.loop.nonfinite_check_every", lambda device, log_every: log_every, raising=False)
    reader = PackReader(demo_pack)
    request = LoaderRequest(reader.split_indices("train"), PipelineSpec(image_size=32, rotation_degrees=20.0),
                            train=True, batch_size=6, num_workers=0, seed=5)
    loader = TorchLoader(reader, request, gpu_decode=True)  # the GPU path, on CPU tensors
    assert len(loader) >= 4 and len(set(zip(reader.heights, reader.widths))) > 1  # mixed sizes in a batch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, loader.num_classes)).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = StepConfig(criterion=nn.CrossEntropyLoss(), amp_dtype=None,
                      scaler=torch.amp.GradScaler("cpu", enabled=False), log_every=10_000)
    with counting_host_syncs() as audit:
        result = train_one_epoch(model, _armed_after_first(loader, audit), optimizer, step, device=torch.device("cpu"),
                                 set_lr=lambda i: 0.01, set_train_mode=model.train,
                                 batches=len(loader))
    assert result.metrics["train_samples"] == loader.num_samples
    assert audit.calls == [], "\n".join(audit.calls)
