"""Images damaged inside a pack after packing: skipped, counted and logged, never fatal.

Every check compares a loader over a damaged copy of a pack with a loader over the
undamaged pack: the good samples must come out exactly as they do there (same index,
same pixels), in the same order, and only the damaged ones are missing.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_pack

from dali_pipes import PackReader, build_loader, plan_epoch
from trainer.cli import main as trainer_main

BATCH = 2
SEED = 0


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 12 JPEGs, 40-70 px: 18 train, 9 val, 9 test."""
    return make_pack(tmp_path_factory.mktemp("corrupt"), classes=3, per_class=12, seed=2, val_ratio=0.25,
                     test_ratio=0.25)


def damage(pack: Path, out: Path, indices: list[int]) -> Path:
    """A copy of `pack` whose images `indices` lost their JPEG header (zeros over the first 16 bytes)."""
    shutil.copyfile(pack, out)
    reader = PackReader(out)
    with open(out, "r+b") as f:
        for index in indices:
            f.seek(reader._data_offset + int(reader.offsets[index]))
            f.write(b"\x00" * 16)
    return out


def loader(pack: Path, split: str, backend: str, *, train: bool = False, workers: int = 0):
    return build_loader(pack, split, backend=backend, batch_size=BATCH, train=train, image_size=32, dtype=torch.uint8,
                        num_workers=workers, seed=SEED)


def epoch(batches, number: int) -> tuple[list[torch.Tensor], torch.Tensor, list[int]]:
    """One epoch: its batches' images, all labels, and the batch sizes."""
    batches.set_epoch(number)
    images, labels = zip(*batches, strict=True)
    return list(images), torch.cat(labels), [len(y) for y in labels]


def plan(reader: PackReader, split: str, train: bool, number: int):
    """The epoch's plan for one rank, made independently of any backend."""
    return plan_epoch(reader.split_indices(split), train=train, seed=SEED, epoch=number, batch_size=BATCH)


def visit_order(reader: PackReader, split: str, train: bool, number: int) -> np.ndarray:
    """Pack indices in the order one rank visits them."""
    batches = plan(reader, split, train, number)
    return batches.indices[: batches.num_samples]


def check_skips(clean, broken, reader: PackReader, split: str, bad: list[int], *, train: bool,
                caplog: pytest.LogCaptureFixture) -> None:
    """Two epochs: the `broken` loader (damaged pack) gives the good samples as `clean` does, the bad ones skipped,
    counted in each epoch and logged once."""
    caplog.set_level(logging.WARNING, logger="dali_pipes")
    for number in (0, 1):
        order = visit_order(reader, split, train, number)
        keep = ~np.isin(order, bad)
        ref_images, ref_labels, _ = epoch(clean, number)
        images, labels, sizes = epoch(broken, number)
        assert torch.equal(torch.cat(images), torch.cat(ref_images)[torch.from_numpy(keep)])
        assert torch.equal(labels, ref_labels[torch.from_numpy(keep)])
        assert torch.equal(labels, torch.from_numpy(reader.labels[order[keep]]))
        # Batches lose their bad samples; one left with none is not yielded at all.
        expected_sizes = [n for b in plan(reader, split, train, number).batches()
                          if (n := int((~np.isin(b, bad)).sum()))]
        assert sizes == expected_sizes and len(sizes) <= len(broken)
        visited_bad = [int(i) for i in order if i in bad]
        assert sorted(s.index for s in broken.skipped) == sorted(visited_bad)
        assert all(s.path == reader.paths[s.index] and s.reason for s in broken.skipped)
    for index in bad:
        named = [r for r in caplog.records if r.levelno == logging.WARNING and reader.paths[index] in r.getMessage()]
        assert len(named) == 1, f"image {index}: {len(named)} warnings"  # once per loader, not per epoch
        assert f"image {index} " in named[0].getMessage()


def val_victims(reader: PackReader) -> list[int]:
    """Val positions 2 and 3 (all of batch 1) and 6 (half of batch 3)."""
    val = reader.split_indices("val")
    return [int(val[2]), int(val[3]), int(val[6])]


def train_victims(reader: PackReader) -> list[int]:
    """Two train samples visited in epochs 0 and 1."""
    both = np.intersect1d(visit_order(reader, "train", True, 0), visit_order(reader, "train", True, 1))
    return [int(both[0]), int(both[-1])]


# ---------------------------------------------------------------------------- torch

@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_torch_eval_skips_bad_images(pack: Path, tmp_path: Path, workers: int,
                                     caplog: pytest.LogCaptureFixture) -> None:
    reader = PackReader(pack)
    bad = val_victims(reader)
    damaged = damage(pack, tmp_path / "d.h5", bad)
    # The reference runs in-process: batches do not depend on the worker count (tests/test_torch_backend.py).
    check_skips(loader(pack, "val", "torch"), loader(damaged, "val", "torch", workers=workers), reader, "val", bad,
                train=False, caplog=caplog)


def test_torch_train_skips_bad_images(pack: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reader = PackReader(pack)
    bad = train_victims(reader)
    damaged = damage(pack, tmp_path / "d.h5", bad)
    check_skips(loader(pack, "train", "torch", train=True), loader(damaged, "train", "torch", train=True), reader,
                "train", bad, train=True, caplog=caplog)


@pytest.mark.parametrize("split,train", [("val", False), ("train", True)])
def test_torch_gpu_path_skips_bad_images(pack: Path, tmp_path: Path, split: str, train: bool,
                                         caplog: pytest.LogCaptureFixture) -> None:
    """The GPU path's code (decode in the main process, torch geometry), run on the CPU."""
    from dali_pipes import LoaderRequest, PipelineSpec
    from dali_pipes.torch_backend import TorchLoader

    def gpu_path(path: Path) -> TorchLoader:
        r = PackReader(path)
        request = LoaderRequest(r.split_indices(split), PipelineSpec(image_size=32), train=train, batch_size=BATCH,
                                device=torch.device("cpu"), dtype=torch.uint8, num_workers=0, seed=SEED, rank=0,
                                world_size=1, drop_last=train)
        return TorchLoader(r, request, gpu_decode=True)

    reader = PackReader(pack)
    bad = train_victims(reader) if train else val_victims(reader)
    damaged = damage(pack, tmp_path / "d.h5", bad)
    broken = gpu_path(damaged)
    check_skips(gpu_path(pack), broken, reader, split, bad, train=train, caplog=caplog)
    assert not any(".cpp:" in s.reason for s in broken.skipped)  # torchvision's source location is noise in a log line


def test_torch_known_bad_images_are_not_decoded_again(pack: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from dali_pipes import torch_cpu

    bad = val_victims(PackReader(pack))
    batches = loader(damage(pack, tmp_path / "d.h5", bad), "val", "torch")
    decoded: list[int] = []
    real = torch_cpu.decode_image
    monkeypatch.setattr(torch_cpu, "decode_image",
                        lambda reader, index, channels: (decoded.append(index), real(reader, index, channels))[1])
    epoch(batches, 0)
    assert set(bad) <= set(decoded)
    decoded.clear()
    epoch(batches, 1)
    assert not set(bad) & set(decoded) and len(batches.skipped) == len(bad)


# ---------------------------------------------------------------------------- dali

@pytest.mark.dali
@pytest.mark.parametrize("split,train", [("val", False), ("train", True)])
def test_dali_skips_bad_images(pack: Path, tmp_path: Path, split: str, train: bool, caplog: pytest.LogCaptureFixture,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    from dali_pipes import dali_backend

    reader = PackReader(pack)
    bad = train_victims(reader) if train else val_victims(reader)
    damaged = damage(pack, tmp_path / "d.h5", bad)
    builds: list[Path] = []
    real = dali_backend.build_pipeline
    monkeypatch.setattr(dali_backend, "build_pipeline",
                        lambda feed, *a, **kw: (builds.append(feed._reader.path), real(feed, *a, **kw))[1])
    check_skips(loader(pack, split, "dali", train=train), loader(damaged, split, "dali", train=train), reader, split,
                bad, train=train, caplog=caplog)
    # Rebuilt after failures in epoch 0 only: epoch 1 never fed the known-bad samples to DALI.
    rebuilds = builds.count(damaged) - 1
    assert 1 <= rebuilds <= len(bad)


# ---------------------------------------------------------------------------- trainer CLI

@pytest.mark.slow
def test_run_and_eval_go_on_without_bad_images(pack: Path, tmp_path: Path) -> None:
    reader = PackReader(pack)
    victims = [train_victims(reader)[0], int(reader.split_indices("test")[4])]
    damaged = damage(pack, tmp_path / "d.h5", victims)
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(trainer_main, ["run", "--pack", str(damaged), "--backend", "torch", "--workers", "0",
                                          "--weights", "none", "--image-size", "32", "--epochs", "2",
                                          "--batch-size", "8", "--arch", "resnet18", "--seed", str(SEED),
                                          "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_samples"] for r in records] == [1, 1]
    assert result.output.count("skipped 1") == 2
    summary = json.loads((out / "summary.json").read_text())
    test_size = len(reader.split_indices("test"))
    assert summary["test_skipped_samples"] == 1 and summary["test_samples"] == test_size - 1

    result = runner.invoke(trainer_main, ["eval", "--checkpoint", str(out / "best.pt"), "--pack", str(damaged),
                                          "--backend", "torch", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["skipped_samples"] == 1 and report["num_samples"] == test_size - 1
    text = runner.invoke(trainer_main, ["eval", "--checkpoint", str(out / "best.pt"), "--pack", str(damaged),
                                        "--backend", "torch", "--workers", "0"])
    assert text.exit_code == 0 and "skipped 1 unreadable image (the log names them)" in text.output
