"""The decoded cache (`--cache ram|device`): what it holds, that its batches are the uncached ones, how it is shared,
refused and freed, and whole runs with it (one and two processes, SIGINT and kill -9, rejected and damaged images).

The references are independent of the cache: PIL's decode and OpenCV's INTER_AREA for the stored pixels, the
uncached loaders (CPU path and GPU path, the latter on CPU tensors) for the batches, and uncached runs for the
metrics.
"""
from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_pack
from PIL import Image
from sync_audit import host_syncs_forbidden
from test_corrupt_images import BATCH, SEED, check_skips, damage, train_victims, val_victims
from test_faults import SIGNAL_AT_STEP

from dali_pipes import LoaderRequest, PackReader, PipelineSpec, Room, build_cache, build_loader, plan_epoch
from dali_pipes.cache import cached_sizes, default_cache_size
from dali_pipes.torch_backend import TorchLoader
from dali_pipes.torch_cpu import warp_cpu
from trainer.cli import main as trainer_main

REPO = Path(__file__).resolve().parents[1]
SIZE = 32  # training size
FULL = 80  # at least every stored side (40-70 px): the cache holds the decoded pixels themselves
SMALL = 36  # below the stored sides: every image is shrunk


@pytest.fixture(autouse=True)
def private_cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Cache files go to a folder of this test's own, so what is left there is what these tests left."""
    folder = tmp_path_factory.mktemp("cache_dir")
    monkeypatch.setenv("DALI_TRAINER_CACHE_DIR", str(folder))
    return folder


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 12 JPEGs, 40-70 px: 18 train, 9 val, 9 test (as tests/test_corrupt_images.py's)."""
    return make_pack(tmp_path_factory.mktemp("cache"), classes=3, per_class=12, seed=2, val_ratio=0.25, test_ratio=0.25)


def everything(reader: PackReader) -> np.ndarray:
    return np.arange(len(reader))


def loader(pack: Path, split: str, *, train: bool, cache=None, workers: int = 0, rank: int = 0, world_size: int = 1,
           dtype: torch.dtype = torch.uint8):
    return build_loader(pack, split, backend="torch", batch_size=BATCH, train=train, image_size=SIZE, dtype=dtype,
                        num_workers=workers, seed=SEED, rank=rank, world_size=world_size, cache=cache)


def gpu_path(pack: Path, split: str, *, train: bool) -> TorchLoader:
    """The uncached GPU path (decode in the main process, one batched warp) on CPU tensors."""
    reader = PackReader(pack)
    request = LoaderRequest(reader.split_indices(split), PipelineSpec(image_size=SIZE), train=train, batch_size=BATCH,
                            dtype=torch.uint8, seed=SEED)
    return TorchLoader(reader, request, gpu_decode=True)


def epoch(batches, number: int) -> tuple[torch.Tensor, torch.Tensor]:
    batches.set_epoch(number)
    images, labels = zip(*batches, strict=True)
    return torch.cat(images), torch.cat(labels)


def pil_decode(reader: PackReader, index: int) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(reader.image_bytes(index).tobytes())).convert("RGB"))


# ---------------------------------------------------------------------------- what is stored

def test_cached_sizes_bound_the_short_side_and_keep_the_aspect_ratio() -> None:
    heights, widths = cached_sizes(np.array([100, 50, 30, 64, 200]), np.array([50, 100, 30, 200, 199]), 40)
    assert heights.tolist() == [80, 40, 30, 40, 40] and widths.tolist() == [40, 80, 30, 125, 40]
    assert default_cache_size(112) == 112 and default_cache_size(112, zoom=1.25) == 140


@pytest.mark.parametrize("size", [FULL, SMALL])
def test_cache_holds_each_image_area_averaged_from_its_decode(pack: Path, size: int) -> None:
    reader = PackReader(pack)
    cache, skipped = build_cache(reader, everything(reader), size, workers=2)
    assert skipped == [] and cache.plan.nbytes == sum(cache.image_at(s).size for s in range(len(reader)))
    for index in range(len(reader)):
        decoded = pil_decode(reader, index)
        held = cache.image_at(int(cache.plan.slots([index])[0]))
        if size == FULL:
            assert np.array_equal(held, decoded)
        else:
            h, w = decoded.shape[:2]
            scale = size / min(h, w)
            expected = cv2.resize(decoded, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
            assert min(held.shape[:2]) == size and np.array_equal(held, expected), index


# ---------------------------------------------------------------------------- batches: ram

@pytest.mark.parametrize("split,train,workers", [("train", True, 0), ("val", False, 0),
                                                 pytest.param("train", True, 1, marks=pytest.mark.slow)])
def test_ram_cache_at_full_size_gives_the_uncached_batches(pack: Path, split: str, train: bool, workers: int) -> None:
    reader = PackReader(pack)
    cache, _ = build_cache(reader, everything(reader), FULL)
    uncached, cached = loader(pack, split, train=train), loader(pack, split, train=train, cache=cache, workers=workers)
    for number in (0, 1):
        images, labels = epoch(cached, number)
        reference_images, reference_labels = epoch(uncached, number)
        assert torch.equal(labels, reference_labels) and torch.equal(images, reference_images)
    images, _ = next(iter(loader(pack, split, train=train, cache=cache, dtype=torch.float32)))
    assert images.dtype == torch.float32 and images.is_contiguous(memory_format=torch.channels_last)


def test_ram_cache_at_a_smaller_size_warps_the_shrunk_images_with_the_same_draws(pack: Path) -> None:
    reader = PackReader(pack)
    spec = PipelineSpec(image_size=SIZE)
    cache, _ = build_cache(reader, everything(reader), SMALL)
    images, labels = epoch(loader(pack, "train", train=True, cache=cache), 1)
    order = plan_epoch(reader.split_indices("train"), train=True, seed=SEED, epoch=1, batch_size=BATCH).indices
    assert torch.equal(labels, torch.from_numpy(reader.labels[order]))
    from dali_pipes.geometry import train_matrices

    matrices = train_matrices(spec, SEED, 1, order, reader.heights[order], reader.widths[order])
    expected = np.empty((len(order), SIZE, SIZE, 3), dtype=np.uint8)
    rgba = np.empty((SIZE, SIZE, 4), dtype=np.uint8)
    for row, (index, matrix) in enumerate(zip(order, matrices)):
        decoded = pil_decode(reader, int(index))
        h, w = decoded.shape[:2]
        scale = SMALL / min(h, w)
        small = cv2.resize(decoded, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        # The same warp on the shrunk image: the stored image's matrix after the resize's inverse.
        back = np.diag([w / small.shape[1], h / small.shape[0], 1.0])
        warp_cpu(cv2.cvtColor(small, cv2.COLOR_RGB2RGBA), spec, np.vstack([matrix, [0, 0, 1]])[:2] @ back, rgba)
        expected[row] = rgba[..., :3]
    assert torch.equal(images, torch.from_numpy(expected).permute(0, 3, 1, 2))
    # Against the uncached batch (a direct bilinear warp of the whole image): measured mean 3.0 levels of 255.
    uncached, _ = epoch(loader(pack, "train", train=True), 1)
    assert (images.float() - uncached.float()).abs().mean() < 5.0


# ---------------------------------------------------------------------------- batches: device

@pytest.mark.parametrize("split,train", [("train", True), ("val", False)])
def test_device_cache_at_full_size_gives_the_uncached_gpu_path_batches(pack: Path, split: str, train: bool) -> None:
    reader = PackReader(pack)
    cache, _ = build_cache(reader, everything(reader), FULL, mode="device")
    cached, uncached = loader(pack, split, train=train, cache=cache), gpu_path(pack, split, train=train)
    for number in (0, 1):
        images, labels = epoch(cached, number)
        reference_images, reference_labels = epoch(uncached, number)
        assert torch.equal(labels, reference_labels) and torch.equal(images, reference_images)


def test_device_cache_matches_the_ram_cache_to_a_level(pack: Path) -> None:
    """grid_sample against OpenCV's fixed-point warp on the same shrunk pixels (tests/test_gpu_path.py: 1-2 levels)."""
    reader = PackReader(pack)
    ram, _ = build_cache(reader, everything(reader), SMALL)
    device, _ = build_cache(reader, everything(reader), SMALL, mode="device")
    for split, train in (("train", True), ("val", False)):
        ram_images, ram_labels = epoch(loader(pack, split, train=train, cache=ram), 1)
        device_images, device_labels = epoch(loader(pack, split, train=train, cache=device), 1)
        assert torch.equal(ram_labels, device_labels)
        assert (ram_images.int() - device_images.int()).abs().max() <= 2


def test_device_cache_holds_only_its_shard_of_each_epoch(pack: Path) -> None:
    reader = PackReader(pack)
    cache, _ = build_cache(reader, everything(reader), SMALL, mode="device")
    ranks = [loader(pack, "train", train=True, cache=cache, rank=r, world_size=2) for r in (0, 1)]
    held = []
    for number in (0, 1):
        for rank, batches in enumerate(ranks):
            epoch(batches, number)
            shard = plan_epoch(reader.split_indices("train"), train=True, seed=SEED, epoch=number, batch_size=BATCH,
                               rank=rank, world_size=2).indices
            assert np.array_equal(batches.held.indices, np.sort(shard))
            assert batches.held.nbytes == int(cache.plan.image_bytes(cache.plan.slots(shard)).sum())
            held.append(batches.held.indices)
    assert not np.array_equal(held[0], held[2])  # rank 0 holds another shard in epoch 1
    single = loader(pack, "train", train=True, cache=cache)
    epoch(single, 0)
    first = single.held
    epoch(single, 1)
    assert single.held is first  # one process: the whole split every epoch, copied once


def test_device_cache_batches_make_no_host_sync(pack: Path) -> None:
    reader = PackReader(pack)
    cache, _ = build_cache(reader, everything(reader), SMALL, mode="device")
    batches = loader(pack, "train", train=True, cache=cache, dtype=torch.float32)
    epoch(batches, 0)  # copies the shard in
    batches.set_epoch(0)
    with host_syncs_forbidden():
        count = sum(len(labels) for _, labels in batches)
    assert count == batches.num_samples


# ---------------------------------------------------------------------------- damaged images

@pytest.mark.parametrize("mode", ["ram", "device"])
@pytest.mark.parametrize("split,train", [("val", False), ("train", True)])
def test_damaged_images_are_skipped_as_without_the_cache(pack: Path, tmp_path: Path, mode: str, split: str, train: bool,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    reader = PackReader(pack)
    bad = train_victims(reader) if train else val_victims(reader)
    damaged = damage(pack, tmp_path / "d.h5", bad)
    cache, skipped = build_cache(PackReader(damaged), everything(reader), FULL, mode=mode)
    uncached = loader(damaged, split, train=train)
    uncached.set_epoch(0)
    list(uncached)
    # The build records each as the loaders do: the same SkippedSample, reason and all.
    assert skipped == sorted(uncached.skipped, key=lambda sample: sample.index)
    clean = loader(pack, split, train=train) if mode == "ram" else gpu_path(pack, split, train=train)
    caplog.clear()
    check_skips(clean, loader(damaged, split, train=train, cache=cache), reader, split, bad, train=train, caplog=caplog)


# ---------------------------------------------------------------------------- sharing and freeing

def _first_pixels(cache, queue) -> None:
    queue.put((cache.pixels[:64].tobytes(), cache.pixels[-64:].tobytes()))


@pytest.mark.slow
def test_cache_travels_to_a_new_process_by_descriptor_and_leaves_no_file(pack: Path, private_cache_dir: Path) -> None:
    reader = PackReader(pack)
    cache, _ = build_cache(reader, everything(reader), SMALL)
    assert list(private_cache_dir.iterdir()) == []  # unlinked as soon as made: nothing to leave behind
    context = mp.get_context("spawn")  # a fresh process, as forkserver and spawn workers are
    queue = context.Queue()
    child = context.Process(target=_first_pixels, args=(cache, queue))
    child.start()
    got = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0 and got == (cache.pixels[:64].tobytes(), cache.pixels[-64:].tobytes())


# ---------------------------------------------------------------------------- what the run says and refuses

RUN = ["--arch", "resnet18", "--weights", "none", "--image-size", str(SIZE), "--batch-size", "4", "--workers", "0",
       "--log-every", "1", "--scheduler", "step", "--backend", "torch", "--seed", str(SEED)]


@pytest.mark.parametrize("args, message", [
    (["--cache", "ram", "--cache-max-gb", "0.00001"], "--cache ram needs 0.1 MB of shared memory, more than the 0.0 MB "
                                                      "allowed (--cache-max-gb); lower --cache-size (now 32) or raise "
                                                      "--cache-max-gb"),
    (["--cache-size", "64"], "--cache-size and --cache-max-gb need --cache ram or --cache device"),
    (["--cache", "device", "--backend", "synthetic"], "--cache device keeps the pack's images, --backend synthetic"),
])
def test_cache_refusals_are_one_line_and_make_nothing(pack: Path, tmp_path: Path, private_cache_dir: Path,
                                                      args: list[str], message: str) -> None:
    result = CliRunner().invoke(trainer_main, ["run", "--pack", str(pack), *RUN, "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists() and list(private_cache_dir.iterdir()) == []


def test_a_device_cache_too_big_for_the_device_names_it(pack: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer import run_cache
    from trainer.config import build_config
    from trainer.errors import TrainerError

    cfg = build_config({"pack": str(pack), "cache": "device", "image_size": SIZE})
    need = run_cache.need_cache(cfg, PackReader(pack), 2, torch.device("cpu"))
    assert need is not None and "on each device" in need.line and "--cache-max-gb" in need.line
    plenty = 1 << 40
    monkeypatch.setattr(run_cache, "free_room", lambda device: Room(plenty, plenty, 1000))
    with pytest.raises(TrainerError, match=r"on cpu, more than the 0.0 MB allowed \(half the free memory of cpu"):
        run_cache.need_cache(cfg, PackReader(pack), 2, torch.device("cpu"))
    monkeypatch.setattr(run_cache, "free_room", lambda device: Room(plenty, 1000, None))
    with pytest.raises(TrainerError, match="which has 0.0 MB free; .*--shm-size.*DALI_TRAINER_CACHE_DIR"):
        run_cache.need_cache(cfg, PackReader(pack), 2, None)


def test_info_says_what_a_cache_of_that_size_takes(pack: Path) -> None:
    reader = PackReader(pack)
    result = CliRunner().invoke(trainer_main, ["info", str(pack), "--cache-size", str(SMALL), "--json"])
    assert result.exit_code == 0, result.output
    # Each image: short side SMALL (all are larger), the long side scaled alike.
    expected = sum(3 * round(h * SMALL / min(h, w)) * round(w * SMALL / min(h, w))
                   for h, w in zip(reader.heights.tolist(), reader.widths.tolist()))
    assert json.loads(result.output)["cache"] == {"size": SMALL, "images": len(reader), "bytes": expected}
    text = CliRunner().invoke(trainer_main, ["info", str(pack), "--cache-size", str(SMALL)]).output
    assert f"--cache-size {SMALL}: {expected / 1e6:.1f} MB of pixels for {len(reader)} images" in text


# ---------------------------------------------------------------------------- whole runs

@pytest.fixture(scope="module")
def flawed_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pack with a rejected file (not an image) and a damaged image in its train split."""
    from dali_pipes import PackOptions, pack_folder
    from tools.make_demo_dataset import make_demo_dataset

    root = tmp_path_factory.mktemp("flawed")
    make_demo_dataset(root / "src", classes=3, per_class=12, seed=2, min_size=40, max_size=70, png_every=0)
    (root / "src" / "00_disc" / "broken.jpg").write_bytes(b"not a jpeg")
    pack_folder(root / "src", root / "p.h5", PackOptions(val_ratio=0.25, test_ratio=0.25), workers=1,
                show_progress=False)
    reader = PackReader(root / "p.h5")
    assert len(reader.rejects()) == 1
    return damage(root / "p.h5", root / "flawed.h5", [int(reader.split_indices("train")[0])])


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


TRAINING_KEYS = ("train_loss", "train_top1", "val_loss", "val_top1", "skipped_samples")


def _same_training(a: Path, b: Path, keys: tuple[str, ...] = TRAINING_KEYS) -> None:
    for ra, rb in zip(_metrics(a), _metrics(b), strict=True):
        for key in keys:
            assert ra[key] == pytest.approx(rb[key], abs=1e-6), (ra["epoch"], key)
    for key in ("test_loss", "test_top1", "test_samples"):
        assert json.loads((a / "summary.json").read_text())[key] == pytest.approx(
            json.loads((b / "summary.json").read_text())[key], abs=1e-6), key


@pytest.fixture(scope="module")
def cached_run(flawed_pack: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 2-epoch run with --cache ram at full size on the flawed pack, and its output."""
    out = tmp_path_factory.mktemp("cached_run") / "run"
    result = CliRunner().invoke(trainer_main, ["run", "--pack", str(flawed_pack), *RUN, "--epochs", "2", "--out",
                                               str(out), "--cache", "ram", "--cache-size", str(FULL)])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.slow
def test_cached_run_trains_as_the_uncached_run(flawed_pack: Path, cached_run: tuple[Path, str], tmp_path: Path) -> None:
    uncached = tmp_path / "uncached"
    result = CliRunner().invoke(trainer_main, ["run", "--pack", str(flawed_pack), *RUN, "--epochs", "2", "--out",
                                               str(uncached)])
    assert result.exit_code == 0, result.output
    out, output = cached_run
    _same_training(out, uncached)
    assert [r["skipped_samples"] for r in _metrics(out)] == [1, 1]
    assert f"cache ram: 36 images of train, val, test with short side <= {FULL} px: " in output
    assert "1 cannot be decoded and are skipped, as without the cache" in output


def _trainer(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _hook(tmp_path: Path, code: str) -> dict[str, str]:
    folder = tmp_path / "hook"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(textwrap.dedent(code))
    return {"PYTHONPATH": os.pathsep.join([str(folder), str(REPO)])}


# Each rank notes the file it maps (device and inode) when it opens the cache.
RECORD_CACHE_FILE = """
    import os
    if "RANK" in os.environ:
        import dali_pipes.cache as cache
        _init = cache.DecodedCache.__init__
        def __init__(self, plan, fd, *args, **kwargs):
            stat = os.fstat(fd)
            with open({log!r}, "a") as f:
                f.write(f"{{os.environ['RANK']}} {{stat.st_dev}}:{{stat.st_ino}}\\n")
            _init(self, plan, fd, *args, **kwargs)
        cache.DecodedCache.__init__ = __init__
"""


@pytest.mark.slow
def test_two_processes_share_one_cache_and_train_as_uncached(flawed_pack: Path, tmp_path: Path) -> None:
    log = tmp_path / "files.log"
    cached = _trainer("run", "--pack", str(flawed_pack), *RUN, "--epochs", "1", "--out", str(tmp_path / "cached"),
                      "--nproc", "2", "--cache", "ram", "--cache-size", str(FULL),
                      env=_hook(tmp_path, RECORD_CACHE_FILE.format(log=str(log))))
    assert cached.returncode == 0, cached.stderr[-3000:]
    ranks = dict(line.split() for line in log.read_text().splitlines())
    assert sorted(ranks) == ["0", "1"] and ranks["0"] == ranks["1"]  # one file for both
    uncached = _trainer("run", "--pack", str(flawed_pack), *RUN, "--epochs", "1", "--out", str(tmp_path / "uncached"),
                        "--nproc", "2")
    assert uncached.returncode == 0, uncached.stderr[-3000:]
    _same_training(tmp_path / "cached", tmp_path / "uncached")


@pytest.mark.slow
def test_device_cache_with_two_processes_survives_kill_9(flawed_pack: Path, tmp_path: Path,
                                                        private_cache_dir: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "trainer", "run", "--pack", str(flawed_pack), *RUN, "--epochs", "2", "--out",
               str(out), "--nproc", "2", "--cache", "device"]
    # Its own session: kill -9 reaches the launcher, torchrun and both ranks at once.
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert list(private_cache_dir.iterdir()) == []  # nothing was left for anyone to free
    resumed = _trainer("run", "--resume", str(out), "--nproc", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in _metrics(out)] == [1, 2]
    assert [r["skipped_samples"] for r in _metrics(out)] == [1, 1]
    assert list(private_cache_dir.iterdir()) == []


@pytest.mark.slow
def test_sigint_mid_epoch_with_the_cache_resumes_to_the_same_training(flawed_pack: Path, cached_run: tuple[Path, str],
                                                                      tmp_path: Path) -> None:
    part = tmp_path / "part"
    # 17 good training images, batch 4: 4 steps an epoch; step 6 is the 2nd step of epoch 2.
    stopped = _trainer("run", "--pack", str(flawed_pack), *RUN, "--epochs", "2", "--out", str(part), "--cache", "ram",
                       "--cache-size", str(FULL), env=_hook(tmp_path, SIGNAL_AT_STEP.format(step=6, signal="SIGINT")))
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "stopped by SIGINT at epoch 2, step 2" in stopped.stderr
    resumed = _trainer("run", "--resume", str(part))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "cache ram: decoded 36 images" in resumed.stdout
    # skipped_samples leaves out: a resumed epoch counts the unreadable samples after its resume point only, with or
    # without the cache (the damaged image sits before it here).
    _same_training(cached_run[0], part, TRAINING_KEYS[:-1])



def test_default_cache_size_holds_the_largest_crop_magnification() -> None:
    # A 100 x 100 image, the smallest box torchvision's RandomResizedCrop can draw at scale 0.25 and ratio 4/3:
    # area 2,500, height sqrt(2500 / (4/3)) = 43.3 px. Stretched onto 64 px that is a 1.48x zoom, so the cache's
    # short side must be 64 x 100 / 43.3 = 148 px; the 3/4 ratio gives the same zoom along the width.
    from dali_pipes import largest_zoom

    zoom = largest_zoom((0.25, 1.0), (3 / 4, 4 / 3))
    assert zoom == pytest.approx(100 / math.sqrt(2500 / (4 / 3)))
    assert largest_zoom(None, (3 / 4, 4 / 3)) == 1.0
    assert default_cache_size(64, zoom) == math.ceil(64 * 100 / math.sqrt(2500 / (4 / 3)))
