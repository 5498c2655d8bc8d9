"""The dali and torch backends give the same tensors for the same pack, split and seed.

`build_loader(backend="dali")` (DALI CPU operators here) against
`build_loader(backend="torch")` (OpenCV decode; eval: torchvision's antialiased resize,
PIL's BILINEAR filter; train: `cv2.warpAffine` with `geometry.affine_matrix`; both after
`geometry`'s integer pre-shrink, which DALI does in its graph), compared on the
normalized float32 output the trainer receives. Measured on the demo pack (48-160 px,
S = 32 and 48, every split):

* Eval: inside the image (outermost row and column left out) at most 1 level of 255
  apart; on the outermost row/column up to 14 levels (DALI's antialiasing clamps at the
  border, PIL's filter renormalizes there); per-image mean at most 0.23 levels.
  Chosen: interior max <= 2 levels, per-image mean <= 0.01 normalized units (~0.6
  level). Negative controls on the torch side measure far above: one-pixel shift
  >= 3.6 levels mean, BGR >= 5.8, swapped mean/std more still.
* Train (same seed and epoch, so the same flips and angles): at most 1 level anywhere,
  mean 0.15 level (the OpenCV path rounds the pre-shrunk image to uint8, DALI keeps it
  in float). Chosen: max <= 2 levels everywhere; a mirrored batch (a flip
  missing or extra) is tens of levels away.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dali_pipes import IMAGENET_MEAN, IMAGENET_STD, PackReader, build_loader

pytestmark = pytest.mark.dali

LEVEL = 1.0 / (255.0 * max(IMAGENET_STD))  # one uint8 level in normalized units, at its largest
INTERIOR_MAX = 2 * LEVEL
IMAGE_MEAN = 0.01
TRAIN_MAX = 2 * LEVEL


@pytest.fixture(scope="module", autouse=True)
def _torch_backend() -> None:
    # The torch backend may be absent in a partial checkout; parity then has nothing to compare.
    pytest.importorskip("dali_pipes.torch_backend")


def batches(pack: Path, split: str, backend: str, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    args = dict(batch_size=8, train=False, image_size=32, seed=0, dtype=torch.float32,
                num_workers=2 if backend == "dali" else 0)
    dl = build_loader(pack, split, backend=backend, **{**args, **kwargs})
    images, labels = zip(*dl)
    return torch.cat(images).numpy().astype(np.float64), torch.cat(labels).numpy()


def errors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: (max |a - b| without the outermost row and column, mean |a - b|)."""
    diff = np.abs(a - b)
    return diff[:, :, 1:-1, 1:-1].max(axis=(1, 2, 3)), diff.mean(axis=(1, 2, 3))


def renormalize(images: np.ndarray, mean, std) -> np.ndarray:
    """Undo ImageNet normalization and apply another one (for the swapped mean/std control)."""
    m, s = (np.asarray(v).reshape(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    pixels = images * s + m
    return (pixels - np.asarray(mean).reshape(1, 3, 1, 1)) / np.asarray(std).reshape(1, 3, 1, 1)


@pytest.mark.parametrize("split,size", [("val", 32), ("test", 48)])
def test_eval_parity(demo_pack: Path, split: str, size: int) -> None:
    dali, dali_labels = batches(demo_pack, split, "dali", image_size=size)
    ref, ref_labels = batches(demo_pack, split, "torch", image_size=size)
    assert dali.shape == ref.shape == (len(PackReader(demo_pack).split_indices(split)), 3, size, size)
    assert np.array_equal(dali_labels, ref_labels)
    interior, mean = errors(dali, ref)
    assert interior.max() <= INTERIOR_MAX and mean.max() <= IMAGE_MEAN, (interior.max(), mean.max())
    controls = {
        "mean/std swapped": renormalize(ref, IMAGENET_STD, IMAGENET_MEAN),
        "BGR": ref[:, ::-1],
        "1 px shift": np.roll(ref, 1, axis=3),
    }
    for name, wrong in controls.items():
        bad_interior, bad_mean = errors(dali, wrong)
        # Every single image must fail, not just the batch on average.
        assert (bad_interior > INTERIOR_MAX).all() and (bad_mean > IMAGE_MEAN).all(), (name, bad_mean.min())


def test_train_parity_same_augmentation(demo_pack: Path) -> None:
    kwargs = dict(train=True, image_size=48, seed=9)
    dali, dali_labels = batches(demo_pack, "train", "dali", **kwargs)
    ref, ref_labels = batches(demo_pack, "train", "torch", **kwargs)
    assert np.array_equal(dali_labels, ref_labels)
    assert np.abs(dali - ref).max() <= TRAIN_MAX
    mirrored = np.abs(dali - ref[..., ::-1]).mean(axis=(1, 2, 3))
    assert (mirrored > 10 * LEVEL).all(), mirrored.min()


@pytest.mark.slow
def test_show_batch_draws_both_backends(demo_pack: Path, tmp_path: Path) -> None:
    # A fresh process, as users run it: this one already holds DALI pipelines, and the torch
    # backend's forked DataLoader workers can deadlock when forked beside DALI's threads.
    out = tmp_path / "batch.png"
    tool = Path(__file__).resolve().parents[1] / "tools" / "show_batch.py"
    args = [str(demo_pack), "--backend", "dali", "--backend", "torch", "--n", "4", "--image-size", "32",
            "--out", str(out)]
    result = subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run([sys.executable, str(tool), str(tmp_path / "none.h5"), "--out", str(out)],
                             capture_output=True, text=True, timeout=180)
    assert missing.returncode == 1 and missing.stderr.strip().count("\n") == 0 and "no such file" in missing.stderr
