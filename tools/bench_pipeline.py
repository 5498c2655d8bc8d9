"""Measure input-pipeline throughput against the original notebook loader, in one run.

    python tools/bench_pipeline.py [--images 2000] [--min-size 250 --max-size 450] [--batch-size 64]
                                   [--image-size 224] [--epochs 2] [--seconds N] [--repeat 1] [--backends torch,dali]
                                   [--cache ram,device] [--cache-size N] [--workers N] [--src DIR [--pack PACK]]
                                   [--device cpu] [--json OUT.json]

Makes (or, with `--src`, reuses) an image-folder tree of JPEGs, packs it, then times on
all cores, train mode, device cpu:

  (a) notebook   ImageFolder + PIL Resize((224, 224)), RandomHorizontalFlip, RandomRotation(10),
                 ToTensor, Normalize, DataLoader(shuffle=True, num_workers=all cores)
  (b) decode     workers that only decode the pack's JPEGs (torchvision.io.decode_jpeg), nothing returned
  (c) backends   `build_loader(backend=...)` with dtype uint8 and float32
  (d) cache      the torch backend over a decoded cache of the train split (`trainer run --cache ram` or
                 `device`, short side `--cache-size`), dtype uint8 and float32; "vs torch" is its speed over
                 (c)'s torch row of the same dtype

Each measurement warms up on one epoch, then times `--epochs` epochs' worth of images
(capped by `--seconds`), keeping the best of `--repeat` runs: the cache's figures are those
of its second epoch on, when nothing decodes (building it is not timed, but its memory
counts). Memory is the peak growth of the proportional set size (PSS) of this process and
its workers, sampled every 0.1 s: shared pages (the cache's, the batches') are counted once.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import click
import numpy as np
import torch
from make_demo_dataset import make_demo_dataset  # a script beside this one (its folder is on sys.path)

from dali_pipes import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PackOptions,
    PackReader,
    atomic_write_bytes,
    build_cache,
    build_loader,
    default_cache_size,
    pack_folder,
)
from trainer.cli_usage import HELP_OPTIONS


@dataclass
class Result:
    """One row of the table."""

    name: str
    images: int
    seconds: float
    peak_mem_mb: float
    images_per_s: float = 0.0
    vs_notebook: float | None = None
    vs_decode: float | None = None
    vs_uncached: float | None = None  # (d) rows: over the uncached torch row of the same dtype


# ---------------------------------------------------------------------------- memory

def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:
                continue
            found += [int(c) for c in children]
            frontier += [int(c) for c in children]
    return found


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_mb() -> float:
    """PSS of this process and all its descendants, in MB (0 where /proc is unavailable)."""
    me = os.getpid()
    return sum(_pss_kb(pid) for pid in [me, *_descendants(me)]) / 1024.0


class PeakMemory:
    """Context manager sampling `tree_pss_mb` in a thread; `.growth_mb` is peak minus the start."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.start_mb = 0.0
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, tree_pss_mb())

    def __enter__(self) -> "PeakMemory":
        self.start_mb = self.peak_mb = tree_pss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        """Peak growth over the measurement."""
        return max(0.0, self.peak_mb - self.start_mb)


# ---------------------------------------------------------------------------- timing

def time_epochs(epoch_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]], target: int,
                seconds: float | None) -> tuple[int, float]:
    """Warm up on epoch 0, then count images over epochs 1, 2, ... until `target`.

    The warm-up epoch runs to its end: abandoning it would leave prefetched batches that a
    persistent loader finishes (and discards) inside the timed region.
    """
    start = time.perf_counter()
    for _ in epoch_batches(0):
        if seconds is not None and time.perf_counter() - start > seconds:
            break
    seen, start, epoch = 0, time.perf_counter(), 1
    while seen < target:
        for images, _ in epoch_batches(epoch):
            seen += len(images)
            if seen >= target or (seconds is not None and time.perf_counter() - start > seconds):
                return seen, time.perf_counter() - start
        epoch += 1
    return seen, time.perf_counter() - start


def measure(name: str, make: Callable[[], Callable[[int], Iterable]], target: int, seconds: float | None,
            repeat: int = 1) -> Result:
    """Build a loader with `make` and time it, with its memory growth; the best of `repeat` runs."""
    best: Result | None = None
    for _ in range(repeat):
        with PeakMemory() as memory:
            epoch_batches = make()
            images, elapsed = time_epochs(epoch_batches, target, seconds)
            del epoch_batches
        result = Result(name, images, elapsed, memory.growth_mb, images / elapsed)
        best = result if best is None or result.images_per_s > best.images_per_s else best
    assert best is not None
    return best


# ---------------------------------------------------------------------------- the candidates

def notebook_loader(src: Path, batch_size: int, workers: int) -> Callable[[int], Iterable]:
    """(a) The original notebook's loader over the image folder."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.Resize((224, 224)), transforms.RandomHorizontalFlip(), transforms.RandomRotation(10),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    loader = DataLoader(datasets.ImageFolder(str(src), transform=transform), batch_size=batch_size, shuffle=True,
                        num_workers=workers)
    return lambda epoch: loader


class _DecodeOnly(torch.utils.data.Dataset):
    """Items are batches of pack indices; a worker decodes them and returns only the count."""

    def __init__(self, reader: PackReader) -> None:
        self.reader = reader

    def __getitem__(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.io import decode_jpeg

        for index in indices:
            decode_jpeg(torch.from_numpy(np.array(self.reader.image_bytes(int(index)))))
        return torch.empty(len(indices), 0), torch.empty(0)

    def __len__(self) -> int:
        return len(self.reader)


def decode_only_loader(pack: Path, batch_size: int, workers: int) -> Callable[[int], Iterable]:
    """(b) The decode ceiling: the same pack images, decoded on all cores, nothing shipped back."""
    from torch.utils.data import DataLoader

    reader = PackReader(pack)
    indices = reader.split_indices("train")
    batches = [indices[i : i + batch_size] for i in range(0, len(indices) - batch_size + 1, batch_size)]
    loader = DataLoader(_DecodeOnly(reader), batch_size=None, sampler=batches, num_workers=workers,
                        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    return lambda epoch: loader


def backend_loader(pack: Path, backend: str, dtype: torch.dtype, batch_size: int, workers: int, device: str = "cpu",
                   image_size: int = 224, cache_size: int | None = None,
                   cache_mode: str = "ram") -> Callable[[int], Iterable]:
    """(c) A `dali_pipes` backend in train mode on `device`; (d) with `cache_size`, over a decoded cache."""
    cache = None
    if cache_size is not None:
        reader = PackReader(pack)
        cache, _ = build_cache(reader, reader.split_indices("train"), cache_size, mode=cache_mode,
                               workers=max(1, workers))
    loader = build_loader(pack, "train", backend=backend, batch_size=batch_size, train=True, device=device,
                          dtype=dtype, num_workers=workers, seed=0, image_size=image_size, cache=cache)

    def epoch_batches(epoch: int) -> Iterator:
        loader.set_epoch(epoch)
        for batch in loader:
            yield batch
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)  # count work the GPU finished, not work it was given

    return epoch_batches


# ---------------------------------------------------------------------------- running it

def prepare_pack(src: Path | None, workdir: Path, images: int, min_size: int, max_size: int,
                 workers: int, pack: Path | None = None) -> tuple[Path, Path]:
    """The source tree (made unless given) and its pack (`pack` when given: the tree's own, packed before)."""
    if src is not None and pack is not None:
        return src, pack
    if src is None:
        src = workdir / "src"
        classes = 10
        make_demo_dataset(src, classes=classes, per_class=max(1, images // classes), seed=0, min_size=min_size,
                          max_size=max_size, png_every=0)
    pack = workdir / "bench.h5"
    pack_folder(src, pack, PackOptions(), workers=workers, force=True, show_progress=False)
    return src, pack


def run_all(src: Path, pack: Path, backends: list[str], batch_size: int, workers: int, epochs: int,
            seconds: float | None, echo: Callable[[str], None], repeat: int = 1, device: str = "cpu",
            image_size: int = 224, cache_size: int | None = None, cache_modes: tuple[str, ...] = ()) -> list[Result]:
    """Every measurement, in order, with ratios filled in; (d) rows for each of `cache_modes`."""
    target = epochs * len(PackReader(pack).split_indices("train"))
    runs: list[tuple[str, bool, Callable[[], Callable[[int], Iterable]]]] = [
        ("(a) notebook PIL float32", False, lambda: notebook_loader(src, batch_size, workers)),
        ("(b) decode only", False, lambda: decode_only_loader(pack, batch_size, workers)),
    ]
    for backend in backends:
        for dtype in (torch.uint8, torch.float32):
            # DALI may be missing or unable to run CPU-only here: report it, keep the other rows.
            runs.append((f"{backend} {str(dtype).removeprefix('torch.')}", backend == "dali",
                         lambda b=backend, d=dtype: backend_loader(pack, b, d, batch_size, workers, device,
                                                                   image_size)))
    for mode in cache_modes:
        for dtype in (torch.uint8, torch.float32):
            # A cache larger than /dev/shm (a container's is 64 MB) is refused: report it, keep the other rows.
            runs.append((f"(d) torch {str(dtype).removeprefix('torch.')} cache {mode}", True,
                         lambda d=dtype, m=mode: backend_loader(pack, "torch", d, batch_size, workers, device,
                                                                image_size, cache_size or image_size, m)))
    results = []
    for name, optional, make in runs:
        echo(f"  measuring {name} ...")
        try:
            results.append(measure(name, make, target, seconds, repeat))
        except Exception as exc:
            if not optional:
                raise
            echo(f"  skipped {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    notebook = next((r for r in results if r.name.startswith("(a)")), None)
    decode = next((r for r in results if r.name.startswith("(b)")), None)
    uncached = {r.name: r for r in results}
    for r in results:
        r.vs_notebook = r.images_per_s / notebook.images_per_s if notebook else None
        r.vs_decode = r.images_per_s / decode.images_per_s if decode else None
        plain = uncached.get(r.name.removeprefix("(d) ").split(" cache ")[0])
        if plain is not None and plain is not r:
            r.vs_uncached = r.images_per_s / plain.images_per_s
    return results


def format_table(results: list[Result]) -> list[str]:
    """The printed table."""
    lines = [f"{'pipeline':30s} {'images':>7s} {'seconds':>8s} {'images/s':>9s} {'vs (a)':>7s} {'vs (b)':>7s} "
             f"{'vs torch':>8s} {'peak mem MB':>12s}"]
    for r in results:
        lines.append(f"{r.name:30s} {r.images:7d} {r.seconds:8.2f} {r.images_per_s:9.0f} {_ratio(r.vs_notebook):>7s} "
                     f"{_ratio(r.vs_decode):>7s} {_ratio(r.vs_uncached):>8s} {r.peak_mem_mb:12.0f}")
    return lines


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


@click.command(context_settings=HELP_OPTIONS)
@click.option("--images", default=2000, show_default=True, help="Images to generate (ignored with --src).")
@click.option("--min-size", default=250, show_default=True, help="Smallest generated side (px).")
@click.option("--max-size", default=450, show_default=True, help="Largest generated side (px).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=8),
              help="Training size of the backends' rows (the notebook's stays 224).")
@click.option("--epochs", default=2, show_default=True, type=click.IntRange(min=1),
              help="Timed images: this many train epochs' worth.")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop each measurement after this long.")
@click.option("--backends", default="torch,dali", show_default=True, help="Comma-separated dali_pipes backends.")
@click.option("--cache", "cache_modes", default="ram", show_default=True,
              help="Comma-separated cache modes to measure in (d) (ram, device; none: no (d) rows).")
@click.option("--cache-size", type=click.IntRange(min=8), default=None,
              help="Short side of the cached images. [default: --image-size, as trainer run's]")
@click.option("--repeat", default=1, show_default=True, type=click.IntRange(min=1),
              help="Keep the best of this many runs of each (other load on the machine only slows runs down).")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Worker processes (default: all cores).")
@click.option("--src", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Use this image folder instead of generating one.")
@click.option("--pack", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="With --src: that folder's pack, made before (otherwise it is packed here).")
@click.option("--device", default="cpu", show_default=True,
              help="Where the backends deliver batches (cpu, cuda); (a) and (b) stay on the CPU.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the results here.")
def main(images: int, min_size: int, max_size: int, batch_size: int, image_size: int, epochs: int,
         seconds: float | None, backends: str, cache_modes: str, cache_size: int | None, repeat: int,
         workers: int | None, src: Path | None, pack: Path | None, device: str, json_out: Path | None) -> None:
    """Time the notebook loader, a decode-only ceiling, the dali_pipes backends and the decoded cache."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    names = [b.strip() for b in backends.split(",") if b.strip()]
    modes = tuple(m.strip() for m in cache_modes.split(",") if m.strip() not in ("", "none"))
    if not set(modes) <= {"ram", "device"}:
        raise click.BadParameter(f"{cache_modes!r}: give ram, device or both, or none", param_hint="'--cache'")
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        click.echo("preparing data ...")
        src, pack = prepare_pack(src, Path(tmp), images, min_size, max_size, workers, pack)
        counts = PackReader(pack).split_counts()
        click.echo(f"{src}: {sum(counts.values())} images, train {counts['train']}; batch {batch_size}, "
                   f"{workers} workers, {os.cpu_count()} cores, torch {torch.__version__}")
        results = run_all(src, pack, names, batch_size, workers, epochs, seconds, click.echo, repeat, device,
                          image_size, cache_size or default_cache_size(image_size), modes)
    click.echo("\n".join(format_table(results)))
    if json_out is not None:
        config = dict(images=images, min_size=min_size, max_size=max_size, batch_size=batch_size,
                      image_size=image_size, cache=cache_modes, cache_size=cache_size or default_cache_size(image_size),
                      epochs=epochs,
                      device=device, seconds=seconds, repeat=repeat, workers=workers, cores=os.cpu_count(),
                      torch=torch.__version__)
        text = json.dumps({"config": config, "results": [asdict(r) for r in results]}, indent=2)
        atomic_write_bytes(json_out, lambda f: f.write(text.encode()))
        click.echo(f"wrote {json_out}")


if __name__ == "__main__":
    main()
