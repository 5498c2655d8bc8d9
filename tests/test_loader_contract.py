"""The batch contract every backend honours, and the shared planning and normalization code
(`plan_epoch`, `to_model_input`) against direct computations."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dali_pipes import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LoaderError,
    PackOptions,
    PackReader,
    PipelineSpec,
    build_loader,
    pack_folder,
    plan_epoch,
    to_model_input,
)
from tools.make_demo_dataset import make_demo_dataset

SIZE = 32

BACKENDS = [
    "torch",
    "synthetic",
    pytest.param("dali", marks=pytest.mark.dali),
]


def make(pack, split: str, backend: str, *, train: bool, batch_size: int = 8, dtype: torch.dtype = torch.float32,
         **kw):
    return build_loader(pack, split, backend=backend, batch_size=batch_size, train=train, image_size=SIZE, device="cpu",
                        dtype=dtype, num_workers=1 if backend == "dali" else 0, **kw)


def fingerprints(images: torch.Tensor) -> list[bytes]:
    """One key per image, to recognize the same sample in another rank's output."""
    return [image.contiguous().numpy().tobytes() for image in images]


# ---------------------------------------------------------------------------- the contract

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False])
def test_shapes_dtypes_device_layout(demo_pack: Path, backend: str, train: bool) -> None:
    reader = PackReader(demo_pack)
    for dtype in (torch.float32, torch.uint8):
        batches = list(make(demo_pack, "train" if train else "val", backend, train=train, dtype=dtype))
        for images, labels in batches:
            assert images.shape[1:] == (3, SIZE, SIZE) and images.shape[0] == labels.shape[0] <= 8
            assert images.dtype == dtype and labels.dtype == torch.int64
            assert images.device.type == "cpu" and labels.device.type == "cpu"
            assert images.is_contiguous(memory_format=torch.channels_last)
            assert 0 <= labels.min() and labels.max() < reader.num_classes
        if dtype == torch.float32:
            values = torch.cat([x for x, _ in batches])
            # Normalized ImageNet-style: (0 - 0.485) / 0.229 .. (1 - 0.406) / 0.225.
            assert values.min() >= -2.2 and values.max() <= 2.7


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train,drop_last,batch_size",
                         [(True, True, 8), (True, False, 8), (False, False, 6), (False, True, 6)])
def test_len_and_drop_last(demo_pack: Path, backend: str, train: bool, drop_last: bool, batch_size: int) -> None:
    split = "train" if train else "val"
    n = len(PackReader(demo_pack).split_indices(split))
    loader = make(demo_pack, split, backend, train=train, batch_size=batch_size, drop_last=drop_last, dtype=torch.uint8)
    sizes = [len(labels) for _, labels in loader]
    assert len(loader) == len(sizes) == (n // batch_size if drop_last else -(-n // batch_size))
    assert all(s == batch_size for s in sizes[:-1])
    assert sizes[-1] == (batch_size if drop_last else n - batch_size * (len(sizes) - 1))
    assert loader.num_samples == sum(sizes)
    assert len(loader) == len(sizes)  # iterating does not change len()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_covers_split_once_across_ranks(demo_pack: Path, backend: str, world_size: int) -> None:
    reader = PackReader(demo_pack)
    split = reader.split_indices("val")
    outputs = [list(make(demo_pack, "val", backend, train=False, batch_size=4, dtype=torch.uint8, rank=rank,
                         world_size=world_size)) for rank in range(world_size)]
    counts = [sum(len(y) for _, y in batches) for batches in outputs]
    assert sum(counts) == len(split)
    assert max(counts) - min(counts) <= 1
    if backend == "synthetic":
        return  # random pixels and labels: only the counts mean something
    labels = [int(v) for batches in outputs for _, y in batches for v in y]
    assert Counter(labels) == Counter(reader.labels[split].tolist())
    whole = make(demo_pack, "val", backend, train=False, batch_size=4, dtype=torch.uint8)
    expected = Counter(f for x, _ in whole for f in fingerprints(x))
    assert Counter(f for batches in outputs for x, _ in batches for f in fingerprints(x)) == expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [2, 3])
def test_train_shards_disjoint_and_equal(demo_pack: Path, backend: str, world_size: int) -> None:
    reader = PackReader(demo_pack)
    n = len(reader.split_indices("train"))
    loaders = [make(demo_pack, "train", backend, train=True, batch_size=4, drop_last=False, dtype=torch.uint8, rank=r,
                    world_size=world_size) for r in range(world_size)]
    outputs = [list(loader) for loader in loaders]
    counts = [sum(len(y) for _, y in batches) for batches in outputs]
    assert counts == [n // world_size] * world_size
    assert len({len(loader) for loader in loaders}) == 1
    if backend == "synthetic":
        return
    # Augmentation depends on (seed, epoch, sample) only, so a sample seen by two ranks would match.
    seen = [set(f for x, _ in batches for f in fingerprints(x)) for batches in outputs]
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not seen[a] & seen[b]
    labels = Counter(int(v) for batches in outputs for _, y in batches for v in y)
    assert not labels - Counter(reader.labels[reader.split_indices("train")].tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_larger_than_split_is_an_error(demo_pack: Path, backend: str) -> None:
    with pytest.raises(LoaderError, match="batch size"):
        make(demo_pack, "train", backend, train=True, batch_size=1000)


@pytest.fixture(scope="module")
def pack_without_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("small") / "tree"
    make_demo_dataset(src, classes=2, per_class=4, seed=1, min_size=24, max_size=40, png_every=0)
    out = src.parent / "no_val.h5"
    pack_folder(src, out, PackOptions(val_ratio=0.0, test_ratio=0.25), workers=1, show_progress=False)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_split_is_an_error(pack_without_val: Path, backend: str) -> None:
    with pytest.raises(LoaderError, match="'val' is empty") as info:
        make(pack_without_val, "val", backend, train=False)
    assert str(info.value).startswith(f"{pack_without_val}: ")  # the request's check, naming the pack


def test_unknown_backend_is_an_error(demo_pack: Path) -> None:
    with pytest.raises(LoaderError, match="unknown backend"):
        make(demo_pack, "train", "nope", train=True)


# ---------------------------------------------------------------------------- plan_epoch

def test_eval_plan_is_round_robin_in_pack_order() -> None:
    split = np.array([3, 5, 8, 9, 12, 20, 21], dtype=np.int64)
    for world_size in (1, 2, 3):
        for rank in range(world_size):
            plan = plan_epoch(split, train=False, seed=0, epoch=4, batch_size=2, rank=rank, world_size=world_size)
            expected = [int(split[i]) for i in range(len(split)) if i % world_size == rank]
            assert plan.indices.tolist() == expected
            assert len(plan) == -(-len(expected) // 2) and plan.num_samples == len(expected)
            assert [b.tolist() for b in plan.batches()] == [expected[i : i + 2] for i in range(0, len(expected), 2)]


def test_train_plan_shards_a_seeded_permutation() -> None:
    split = np.arange(100, 123, dtype=np.int64)  # 23 samples
    for world_size in (1, 2, 3):
        shards = [plan_epoch(split, train=True, seed=7, epoch=2, batch_size=4, rank=r, world_size=world_size)
                  for r in range(world_size)]
        per_rank = 23 // world_size
        assert all(len(s.indices) == per_rank for s in shards)
        together = np.concatenate([s.indices for s in shards])
        assert len(set(together.tolist())) == len(together) and set(together.tolist()) <= set(split.tolist())
        for s in shards:
            # Train drops the last partial batch.
            assert len(s) == per_rank // 4 and s.num_samples == 4 * (per_rank // 4)
            assert all(len(b) == 4 for b in s.batches())
    again = plan_epoch(split, train=True, seed=7, epoch=2, batch_size=4)
    assert again.indices.tolist() == plan_epoch(split, train=True, seed=7, epoch=2, batch_size=4).indices.tolist()
    assert again.indices.tolist() != plan_epoch(split, train=True, seed=7, epoch=3, batch_size=4).indices.tolist()
    assert again.indices.tolist() != plan_epoch(split, train=True, seed=8, epoch=2, batch_size=4).indices.tolist()
    assert sorted(again.indices.tolist()) == split.tolist()


def test_plan_resume_and_drop_last_override() -> None:
    split = np.arange(10, dtype=np.int64)
    plan = plan_epoch(split, train=True, seed=0, epoch=0, batch_size=3, drop_last=False)
    assert len(plan) == 4 and plan.num_samples == 10
    batches = [b.tolist() for b in plan.batches()]
    assert [b.tolist() for b in plan.batches(start=2)] == batches[2:]
    assert sum(batches, []) == plan.indices.tolist()


# ---------------------------------------------------------------------------- to_model_input

def test_to_model_input_matches_direct_computation() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)
    spec = PipelineSpec()
    expected = ((pixels / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(0, 3, 1, 2)
    out = to_model_input(torch.from_numpy(pixels), spec, torch.float32)
    assert out.shape == (2, 3, 5, 7) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-5)
    for dtype, atol in ((torch.float16, 4e-3), (torch.bfloat16, 2e-2)):
        low = to_model_input(torch.from_numpy(pixels), spec, dtype)
        assert low.dtype == dtype and low.is_contiguous(memory_format=torch.channels_last)
        np.testing.assert_allclose(low.float().numpy(), expected, rtol=0, atol=atol)
    raw = to_model_input(torch.from_numpy(pixels), spec, torch.uint8)
    assert raw.dtype == torch.uint8 and raw.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(raw.numpy(), pixels.transpose(0, 3, 1, 2))
    custom = PipelineSpec(mean=(0.5, 0.25, 0.0), std=(0.5, 1.0, 2.0))
    direct = ((pixels / 255.0 - np.array([0.5, 0.25, 0.0])) / np.array([0.5, 1.0, 2.0])).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(to_model_input(torch.from_numpy(pixels), custom, torch.float32).numpy(), direct,
                               atol=1e-5)
