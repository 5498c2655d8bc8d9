"""The decoded cache at the seed's scale: a pack of many small JPEGs trained for one epoch with `--cache ram`.

    python tools/bench_cache_scale.py [--images 140000] [--classes 7000] [--side 112] [--cache-size 64]
                                      [--image-size 32] [--arch resnet18] [--batch-size 256] [--workers N]
                                      [--workdir DIR] [--json OUT.json]

Draws the images with OpenCV straight to JPEG files (each class a colour and a stripe angle,
each image its own phase, shift and noise: fast, and learnable), packs them with
tools/pack_dataset.py, then runs `trainer run --epochs 1 --cache ram` on the pack and reports
the peak memory of the training processes: the proportional set size (PSS) of the trainer
and its workers summed, sampled every 0.5 s, so the cache's shared pages count once. The
images, the pack and the run are made in a temporary folder (under `--workdir`) and removed
at the end; check the free disk first (about 8 kB per image for the images and the pack).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import click
import cv2
import numpy as np
from bench_pipeline import PeakMemory  # a script beside this one (its folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def draw(label: int, rng: np.random.Generator, side: int) -> np.ndarray:
    """One side x side BGR image of class `label`: its colour and stripe angle, with a random phase, shift and noise."""
    hue = (label * 0.618034) % 1.0
    angle = math.pi * ((label * 0.381966) % 1.0)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    stripes = np.sin(2 * math.pi * 4 * (x * math.cos(angle) + y * math.sin(angle)) + rng.uniform(0, 2 * math.pi))
    colour = cv2.cvtColor(np.uint8([[[hue * 179, 200, 220]]]), cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)
    image = colour * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 12, (side, side, 3))
    return np.roll(np.clip(image, 0, 255).astype(np.uint8), rng.integers(0, side, 2), axis=(0, 1))


def _write_classes(job: tuple[Path, range, int, int, int]) -> int:
    out, labels, per_class, side, seed = job
    for label in labels:
        folder = out / f"c{label:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng((seed, label))
        for k in range(per_class):
            cv2.imwrite(str(folder / f"{k:03d}.jpg"), draw(label, rng, side), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return len(labels) * per_class


def make_images(out: Path, classes: int, per_class: int, side: int, workers: int, seed: int = 0) -> int:
    """`classes` folders of `per_class` JPEGs each under `out`, drawn in `workers` processes."""
    step = max(1, classes // (workers * 8))
    jobs = [(out, range(first, min(first + step, classes)), per_class, side, seed) for first in range(0, classes, step)]
    with Pool(workers) as pool:
        return sum(pool.imap_unordered(_write_classes, jobs))


def _run(command: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    if result.returncode != 0:
        raise click.ClickException(f"{' '.join(command[:4])} ... failed: {result.stderr.strip()[-2000:]}")
    return time.perf_counter() - start, result


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--images", default=140_000, show_default=True, type=click.IntRange(min=2))
@click.option("--classes", default=7_000, show_default=True, type=click.IntRange(min=2))
@click.option("--side", default=112, show_default=True, type=click.IntRange(min=8), help="Side of the square JPEGs.")
@click.option("--cache-size", default=64, show_default=True, type=click.IntRange(min=8))
@click.option("--image-size", default=32, show_default=True, type=click.IntRange(min=8))
@click.option("--arch", default="resnet18", show_default=True)
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes (default: all cores).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the temporary folder goes (default: the system's temp folder).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures here.")
def main(images: int, classes: int, side: int, cache_size: int, image_size: int, arch: str, batch_size: int,
         workers: int | None, workdir: Path | None, json_out: Path | None) -> None:
    """Draw, pack and train one epoch with --cache ram; print the peak memory of the training processes."""
    workers = workers or os.cpu_count() or 1
    per_class = max(1, images // classes)
    with tempfile.TemporaryDirectory(prefix="bench-cache-scale-", dir=workdir) as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        count = make_images(folder / "src", classes, per_class, side, workers)
        drawn = time.perf_counter() - start
        click.echo(f"drew {count} images of {side} px in {classes} classes in {drawn:.0f}s")
        packed, _ = _run([sys.executable, str(ROOT / "tools" / "pack_dataset.py"), str(folder / "src"),
                          str(folder / "pack.h5"), "--quiet", "--workers", str(workers)])
        click.echo(f"packed in {packed:.0f}s")
        command = [sys.executable, "-m", "trainer", "run", "--pack", str(folder / "pack.h5"), "--arch", arch,
                   "--weights", "none", "--image-size", str(image_size), "--batch-size", str(batch_size),
                   "--epochs", "1", "--cache", "ram", "--cache-size", str(cache_size), "--workers", str(workers),
                   "--log-seconds", "60", "--out", str(folder / "run")]
        with PeakMemory(interval=0.5) as memory:
            trained, result = _run(command)
        click.echo(result.stdout.strip())
        record = json.loads((folder / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    figures = {"images": count, "classes": classes, "side": side, "cache_size": cache_size, "image_size": image_size,
               "arch": arch, "batch_size": batch_size, "workers": workers, "cores": os.cpu_count(),
               "cache_bytes": count * 3 * min(side, cache_size) ** 2, "peak_pss_mb": round(memory.peak_mb),
               "peak_growth_mb": round(memory.growth_mb), "run_seconds": round(trained, 1),
               "train_seconds": record["train_seconds"], "images_per_second": record["images_per_second"],
               "command": " ".join(command[1:])}
    click.echo(f"peak memory of the training processes (PSS, shared pages once): {figures['peak_growth_mb']} MB; "
               f"the cache holds {figures['cache_bytes'] / 1e9:.2f} GB; run {trained:.0f}s")
    if json_out is not None:
        json_out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
