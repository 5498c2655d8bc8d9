"""The integer pre-shrink: the factor rules, OpenCV and torch agreeing, the matrix correction, and the grating
test, on its own and through every backend's training path."""
from __future__ import annotations

import io
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dali_pipes import PackOptions, PackReader, PipelineSpec, build_loader, pack_folder
from dali_pipes.geometry import (
    preshrink_numpy,
    preshrink_torch,
    resize_shrink_factors,
    shrink_factors,
    shrunk_matrices,
    shrunk_size,
    source_per_output,
    warp_shrink_factors,
)


def grating(height: int, width: int) -> np.ndarray:
    """1-pixel black and white vertical stripes, H x W x 3 uint8."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, 1::2] = 255
    return image


def box_matrix(box: tuple[float, float, float, float], size: int, angle: float = 0.0) -> np.ndarray:
    """2 x 3 source -> output matrix (pixel centres at +0.5): box (top, left, h, w) to size x size, then a rotation."""
    top, left, h, w = box
    crop = np.array([[size / w, 0, -left * size / w], [0, size / h, -top * size / h], [0, 0, 1]])
    c, s, mid = math.cos(math.radians(angle)), math.sin(math.radians(angle)), size / 2
    rotate = np.array([[c, s, mid - c * mid - s * mid], [-s, c, mid + s * mid - c * mid], [0, 0, 1]])
    return (rotate @ crop)[:2]


def warp_opencv(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """One bilinear `cv2.warpAffine` (OpenCV puts pixel centres on integers: shift by half a pixel both sides)."""
    shifted = np.array(matrix, np.float64)
    shifted[:, 2] += 0.5 * (shifted[:, 0] + shifted[:, 1]) - 0.5
    return cv2.warpAffine(image, shifted, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def warp_torch(image: torch.Tensor, matrix: np.ndarray, size: int) -> torch.Tensor:
    """The same warp with `grid_sample`: each output pixel centre mapped back through the inverse matrix."""
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    source = np.einsum("ij,jhw->hwi", inverse, np.stack([xs, ys, np.ones_like(xs)]))
    height, width = image.shape[-2:]
    grid = 2 * source / np.array([width, height]) - 1
    return F.grid_sample(image[None].float(), torch.from_numpy(grid[None]).float(), mode="bilinear",
                         padding_mode="zeros", align_corners=False)[0]


def test_factor_rule_hand_values() -> None:
    source = np.array([50, 100, 127, 128, 255, 256, 383, 384, 450, 512, 700])
    # d = source / 64: 0.78 1.56 1.98 2 3.98 4 5.98 6 7.03 8 10.9 -> 1 below 2, else the largest even <= d.
    np.testing.assert_array_equal(shrink_factors(source, 64), [1, 1, 1, 2, 2, 4, 4, 6, 6, 8, 10])
    assert shrink_factors(512 * (1 - 1e-9), 64) == 8  # a ratio computed a hair under 8 is still 8
    d = np.linspace(1, 40, 400)
    f = shrink_factors(d, 1.0)
    assert ((d / f >= 1 - 1e-9) & (d / f < 2)).all()  # the warp after the shrink never downscales 2x or more


def test_factors_follow_the_matrix_for_any_box_flip_and_rotation() -> None:
    # A 260 x 350 box of a larger photo onto 64 x 64, rotated and flipped: source pixels per output
    # pixel are the box's sides over 64 along the source axes, whatever the rotation.
    flip = np.array([[-1.0, 0, 64], [0, 1, 0], [0, 0, 1]])
    matrix = (flip @ np.vstack([box_matrix((20.0, 31.0, 260.0, 350.0), 64, angle=33.0), [0, 0, 1]]))[:2]
    dy, dx = source_per_output(matrix)
    assert (dy, dx) == (pytest.approx(260 / 64), pytest.approx(350 / 64))
    assert tuple(map(int, warp_shrink_factors(matrix))) == (4, 4)
    batch = np.stack([box_matrix((0.0, 0.0, 100.0, 900.0), 64), box_matrix((0.0, 0.0, 1000.0, 64.0), 64)])
    fy, fx = warp_shrink_factors(batch)  # d = (1.56, 14.06) and (15.6, 1): per axis, per sample
    np.testing.assert_array_equal(fy, [1, 14])
    np.testing.assert_array_equal(fx, [14, 1])


def test_eval_factor_leaves_at_most_four_times_the_target() -> None:
    sides = np.array([224, 896, 897, 1000, 1792, 1793, 4000])
    fy, fx = resize_shrink_factors(sides, sides[::-1], 224)
    np.testing.assert_array_equal(fy, [1, 1, 2, 2, 2, 3, 5])  # ceil(side / 896)
    np.testing.assert_array_equal(fx, fy[::-1])
    assert all(side / f <= 4 * 224 for side, f in zip(sides, fy))


@pytest.mark.parametrize("height, width, fy, fx", [(37, 53, 2, 2), (37, 53, 3, 5), (41, 29, 4, 4), (64, 48, 8, 8),
                                                   (99, 101, 6, 2), (13, 7, 1, 4)])
def test_torch_equals_opencv_area_within_a_level(height: int, width: int, fy: int, fx: int) -> None:
    image = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    cv = preshrink_numpy(image, fy, fx)
    assert cv.shape[:2] == shrunk_size(height, width, fy, fx) == (math.ceil(height / fy), math.ceil(width / fx))
    torch_chw = preshrink_torch(torch.from_numpy(image).permute(2, 0, 1), fy, fx)
    assert torch_chw.dtype == torch.float32 and torch_chw.shape == (3, *cv.shape[:2])
    assert np.abs(torch_chw.permute(1, 2, 0).numpy() - cv).max() <= 1.0
    batch = preshrink_torch(torch.from_numpy(np.stack([image, image[::-1]])).permute(0, 3, 1, 2), fy, fx)
    torch.testing.assert_close(batch[0], torch_chw)
    # Edge blocks average only the pixels they have: the bottom-right block by hand.
    corner = image[(height - 1) // fy * fy:, (width - 1) // fx * fx:].reshape(-1, 3).mean(0)
    np.testing.assert_allclose(torch_chw[:, -1, -1].numpy(), corner, rtol=1e-6)
    assert np.abs(cv[-1, -1] - corner).max() <= 0.5


def test_shrunk_matrix_warps_the_shrunk_image_like_the_original() -> None:
    # A smooth image has nothing to alias, so shrink + corrected warp must give the plain warp's pixels.
    ys, xs = np.mgrid[0:301, 0:403]
    smooth = np.stack([127 + 100 * np.sin(xs / 40.0), 127 + 100 * np.cos(ys / 30.0), (xs + ys) / 3], -1)
    smooth = smooth.astype(np.uint8)
    matrix = box_matrix((20.0, 31.0, 260.0, 350.0), 64, angle=7.0)  # d = 4.1 and 5.5: factors 4 and 4
    fy, fx = shrink_factors(260.0, 64), shrink_factors(350.0, 64)
    assert (fy, fx) == (4, 4)
    ours = warp_opencv(preshrink_numpy(smooth, int(fy), int(fx)), shrunk_matrices(matrix, fy, fx), 64)
    plain = warp_opencv(smooth, matrix, 64)
    assert np.abs(ours.astype(int) - plain)[2:-2, 2:-2].max() <= 3
    np.testing.assert_allclose(shrunk_matrices(np.array([[1.0, 2, 3], [4, 5, 6]]), 3, 2), [[2, 6, 3], [8, 15, 6]])
    batch = shrunk_matrices(np.stack([matrix, matrix]), np.array([4, 2]), np.array([4, 6]))
    np.testing.assert_allclose(batch[1], shrunk_matrices(matrix, 2, 6))


@pytest.mark.parametrize("size, box, angle", [
    (600, (44.0, 44.0, 512.0, 512.0), 10.0),  # the case: 8x, with the training rotation
    (450, (0.0, 0.0, 450.0, 450.0), 0.0),  # 7.03x: factor 6, the warp does the last 1.17x
    (700, (100.0, 100.0, 300.0, 300.0), -5.0),  # 4.7x: factor 4
])
def test_fine_grating_comes_out_flat_grey_as_with_pil(size: int, box, angle: float) -> None:
    image, out = grating(size, size), 64
    matrix = box_matrix(box, out, angle)
    f = int(shrink_factors(box[2], out))
    top, left, h, w = (int(v) for v in box)
    pil = np.asarray(Image.fromarray(image[top:top + h, left:left + w]).resize((out, out), Image.BILINEAR), float)
    inner = (slice(4, -4), slice(4, -4), 0)  # away from the rotated border's fill
    plain = warp_opencv(image, matrix, out)[inner].astype(float)
    shrunk_cv = warp_opencv(preshrink_numpy(image, f, f), shrunk_matrices(matrix, f, f), out)[inner].astype(float)
    chw = torch.from_numpy(image).permute(2, 0, 1)
    shrunk_torch = warp_torch(preshrink_torch(chw, f, f), shrunk_matrices(matrix, f, f), out).permute(1, 2, 0)
    shrunk_torch = shrunk_torch.numpy()[inner]
    # PIL (antialiased): std 0.0 / 1.4 / 2.6; ours 0.0 in all three. A plain bilinear warp: moire, std 66-74.
    assert pil[inner].std() < 3 and plain.std() > 40
    for ours in (shrunk_cv, shrunk_torch):
        assert ours.std() < 3 and abs(ours.mean() - pil[inner].mean()) < 2


@pytest.fixture(scope="module")
def grating_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Vertical and horizontal 1-pixel gratings of 256-272 px, as JPEG (quality 95, which keeps them sharp)."""
    root = tmp_path_factory.mktemp("grating")
    for name, stripes in (("vertical", np.s_[:, 1::2]), ("horizontal", np.s_[1::2])):
        folder = root / "src" / name
        folder.mkdir(parents=True)
        for k, side in enumerate((256, 264, 256, 272)):
            image = np.zeros((side, side, 3), np.uint8)
            image[stripes] = 255
            cv2.imwrite(str(folder / f"{k}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    pack_folder(root / "src", root / "grating.h5", PackOptions(val_ratio=0.25, test_ratio=0.0), workers=1,
                show_progress=False)
    return root / "grating.h5"


def _train_batch(pack: Path, backend: str, spec: PipelineSpec) -> torch.Tensor:
    """Every training image of `pack` through `backend` ("torch-gpu-path": the GPU path on CPU tensors), uint8."""
    reader = PackReader(pack)
    if backend == "torch-gpu-path":
        from dali_pipes.loader import LoaderRequest
        from dali_pipes.torch_backend import TorchLoader

        request = LoaderRequest(reader.split_indices("train"), spec, train=True, batch_size=2, dtype=torch.uint8)
        loader = TorchLoader(reader, request, gpu_decode=True)
    else:
        loader = build_loader(reader, "train", backend=backend, batch_size=2, train=True, spec=spec, dtype=torch.uint8,
                              num_workers=0 if backend == "torch" else 1)
    return torch.cat([images for images, _ in loader])


@pytest.mark.parametrize("backend", ["torch", "torch-gpu-path", pytest.param("dali", marks=pytest.mark.dali)])
def test_training_turns_a_fine_grating_flat_grey_in_every_backend(grating_pack: Path, backend: str) -> None:
    # 256-272 px onto 32 px (8x-8.5x), with the default flip and rotation. Inside the images
    # (away from the rotated border's fill), measured: every backend std 0.0 and mean 128, as PIL's
    # antialiased resize of the same decoded JPEGs (std <= 0.5, mean 127.5-128); the plain warp
    # (`train_antialias` off): moire, std 77 in every backend.
    reader = PackReader(grating_pack)
    pil = [np.asarray(Image.open(io.BytesIO(reader.image_bytes(int(i)).tobytes())).convert("RGB").resize(
        (32, 32), Image.BILINEAR), dtype=float)[6:-6, 6:-6] for i in reader.split_indices("train")]
    assert max(p.std() for p in pil) < 1 and all(abs(p.mean() - 127.5) < 1 for p in pil)
    inner = _train_batch(grating_pack, backend, PipelineSpec(image_size=32))[:, :, 6:-6, 6:-6].double()
    assert len(inner) == len(pil)
    assert inner.std(dim=(1, 2, 3)).max() < 2 and (inner.mean(dim=(1, 2, 3)) - 127.5).abs().max() < 2
    aliased = _train_batch(grating_pack, backend, PipelineSpec(image_size=32, train_antialias=False))
    assert aliased[:, :, 6:-6, 6:-6].double().std(dim=(1, 2, 3)).min() > 30
