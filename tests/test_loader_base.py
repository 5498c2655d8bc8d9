"""What every loader shares (dali_pipes/loader.py): the checked request, the base class's cursor and
skip log on all three backends, the one unreadable-sample type, and `dali_pipes.preprocess`."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dali_pipes import (
    BatchLoader,
    ImageDecodeError,
    LoaderError,
    LoaderRequest,
    PackReader,
    PipelineSpec,
    SkippedSample,
    build_loader,
    preprocess,
    samples_per_rank,
)

SIZE = 32
BACKENDS = ["torch", "synthetic", pytest.param("dali", marks=pytest.mark.dali)]


def request(n: int = 10, **overrides) -> LoaderRequest:
    args = dict(spec=PipelineSpec(image_size=SIZE), train=True, batch_size=2)
    return LoaderRequest(np.arange(n), **{**args, **overrides})


# ---------------------------------------------------------------------------- the request

def test_samples_per_rank_by_hand() -> None:
    # Train: equal shards, remainder dropped; eval: every sample once, rank 0 has the most.
    assert [samples_per_rank(10, train=True, world_size=w) for w in (1, 2, 3, 4)] == [10, 5, 3, 2]
    assert [samples_per_rank(10, train=False, world_size=w) for w in (1, 2, 3, 4)] == [10, 5, 4, 3]


def test_request_fills_defaults_and_is_frozen() -> None:
    train, val = request(), request(train=False)
    assert train.drop_last is True and val.drop_last is False  # None: drop the last partial batch when training
    assert request(drop_last=False).drop_last is False
    assert train.device == torch.device("cpu") and train.split_indices.dtype == np.int64
    with pytest.raises(AttributeError):
        train.batch_size = 4  # type: ignore[misc]


@pytest.mark.parametrize("overrides,message", [
    (dict(dtype=torch.int32), "dtype must be"),
    (dict(batch_size=0), "batch size must be positive"),
    (dict(rank=2, world_size=2), "rank 2 outside"),
    (dict(num_workers=-1), "num_workers"),
    (dict(batch_size=4, world_size=3), "larger than the 3"),  # 10 // 3 = 3 per rank when training
    (dict(train=False, drop_last=True, batch_size=5, world_size=3), "larger than the 4"),  # ceil(10 / 3) = 4
])
def test_bad_requests_are_one_line_errors(overrides: dict, message: str) -> None:
    with pytest.raises(LoaderError, match=message) as info:
        request(**overrides)
    assert "\n" not in str(info.value)


def test_a_request_that_fits_exactly_is_accepted() -> None:
    assert request(batch_size=3, world_size=3).per_rank == 3
    assert request(train=False, drop_last=True, batch_size=4, world_size=3).per_rank == 4
    assert request(train=False, batch_size=50).per_rank == 10  # eval keeps the partial batch: any size is fine


def test_empty_split_is_refused() -> None:
    with pytest.raises(LoaderError, match="'val' is empty"):
        LoaderRequest(np.array([], dtype=np.int64), PipelineSpec(), train=False, batch_size=1, split="val")


# ---------------------------------------------------------------------------- the base, on every backend

def make(pack: Path, backend: str, *, train: bool = True, batch_size: int = 4, **kw) -> BatchLoader:
    return build_loader(pack, "train" if train else "val", backend=backend, batch_size=batch_size, train=train,
                        image_size=SIZE, device="cpu", dtype=torch.uint8, num_workers=1 if backend == "dali" else 0,
                        **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_extends_the_base_and_keeps_a_skip_log(demo_pack: Path, backend: str) -> None:
    batches = make(demo_pack, backend)
    assert isinstance(batches, BatchLoader) and batches.backend == backend
    assert batches.skipped == []  # the synthetic backend too: nothing is ever unreadable there
    assert sum(len(y) for _, y in batches) == batches.num_samples and batches.skipped == []
    assert batches.request.batch_size == 4 and batches.spec.image_size == SIZE


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_resumes_mid_epoch_the_same_way(demo_pack: Path, backend: str) -> None:
    train = len(PackReader(demo_pack).split_indices("train"))
    batches = make(demo_pack, backend, batch_size=4, seed=3)
    assert len(batches) == train // 4 and batches.num_samples == (train // 4) * 4
    batches.set_epoch(2, start_batch=3)
    assert batches.epoch == 2 and len(batches) == train // 4  # len() is still the whole epoch
    assert [len(y) for _, y in batches] == [4] * (train // 4 - 3)
    with pytest.raises(ValueError, match="start_batch"):
        batches.set_epoch(0, start_batch=train // 4 + 1)


def test_a_new_backend_writes_only_its_batches(demo_pack: Path) -> None:
    """The base alone gives a subclass the cursor, shards, known-bad filtering and `skipped`."""

    class Indices(BatchLoader):
        backend = "indices"

        def _batches(self):
            for batch in self._remaining():
                yield torch.from_numpy(batch), torch.from_numpy(batch)

    reader = PackReader(demo_pack)
    split = reader.split_indices("val")
    loaders = [Indices(reader, LoaderRequest(split, PipelineSpec(), train=False, batch_size=3, rank=r, world_size=2))
               for r in range(2)]
    seen = [torch.cat([x for x, _ in loader]).tolist() for loader in loaders]
    assert seen == [split[0::2].tolist(), split[1::2].tolist()]  # sample i on rank i % 2, in pack order
    first = loaders[0]
    first._skips.add(SkippedSample(int(split[2]), reader.paths[int(split[2])], "bad"))
    first.set_epoch(1)
    assert first.skipped == []  # set_epoch empties it
    again = torch.cat([x for x, _ in first]).tolist()
    assert again == [i for i in split[0::2].tolist() if i != split[2]]  # known bad: left out before any decode
    assert [s.index for s in first.skipped] == [int(split[2])]  # yet counted in this epoch


# ---------------------------------------------------------------------------- the unreadable sample

def test_decode_error_has_fields_and_survives_pickling() -> None:
    error = ImageDecodeError("p.h5", 7, "cat/1.jpg", "bad huffman table")
    assert str(error) == "p.h5: image 7 (cat/1.jpg) cannot be decoded: bad huffman table"
    copy = pickle.loads(pickle.dumps(error))  # workers hand errors across processes
    assert (copy.index, copy.path, copy.reason, str(copy)) == (7, "cat/1.jpg", "bad huffman table", str(error))
    assert error.sample == SkippedSample(7, "cat/1.jpg", "bad huffman table")


# ---------------------------------------------------------------------------- preprocess

def test_preprocess_equals_the_torch_backends_eval_batches(demo_pack: Path, tmp_path: Path) -> None:
    reader = PackReader(demo_pack)
    val = reader.split_indices("val")
    spec = PipelineSpec(image_size=SIZE)
    files = []
    for index in val:
        path = tmp_path / f"{index}.jpg"
        path.write_bytes(reader.image_bytes(int(index)).tobytes())  # the very bytes the loader decodes
        files.append(path)
    for dtype in (torch.uint8, torch.float32):
        loader = build_loader(reader, "val", backend="torch", batch_size=len(val), train=False, spec=spec, dtype=dtype,
                              num_workers=0)
        [(expected, _)] = list(loader)
        got = preprocess(files, spec, "cpu", dtype=dtype)
        assert (got.shape == expected.shape and got.dtype == dtype
                and got.is_contiguous(memory_format=torch.channels_last))
        # PIL (files) and OpenCV (packs) both use libjpeg; allow one level of IDCT rounding.
        one_level = 1.0 if dtype == torch.uint8 else 1.0 / (255 * min(spec.std))
        assert (got.float() - expected.float()).abs().max() <= one_level + 1e-5
    arrays = [np.asarray(preprocess([f], spec, "cpu", dtype=torch.uint8)[0].permute(1, 2, 0)) for f in files[:2]]
    # Already S x S: the eval resize leaves the pixels as they are.
    assert torch.equal(preprocess(arrays, spec, "cpu", dtype=torch.uint8).permute(0, 2, 3, 1),
                       torch.from_numpy(np.stack(arrays)))


def test_preprocess_names_an_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="x.jpg"):
        preprocess([tmp_path / "x.jpg"], PipelineSpec(image_size=SIZE))
