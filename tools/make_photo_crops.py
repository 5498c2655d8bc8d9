"""Turn a few photographs into an image-folder tree of random crops: one class per photograph.

    python tools/make_photo_crops.py PHOTO... --out OUT_DIR [--per-class 100] [--min-size 64] [--max-size 160]
                                     [--seed 0] [--force]

Each photograph (any format PIL reads; grey ones become RGB) gives a class named after
its file, and `--per-class` crops of it: a side between 20% and 60% of the photograph's
shorter side, an aspect ratio between 3/4 and 4/3, a uniform position, resized (PIL,
antialiased) to a random size between `--min-size` and `--max-size` px and saved as
JPEG. The task is to tell which photograph a crop came from: real photographic
statistics (texture, noise, colour) without a download. Seeded, so the same photographs
give the same tree.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import click
import numpy as np
from PIL import Image

from trainer.cli_usage import HELP_OPTIONS, OneLineUsageCommand

SIDE = (0.2, 0.6)  # a crop's side, as a fraction of the photograph's shorter side
ASPECT = (3 / 4, 4 / 3)


def crop_photo(photo: Image.Image, rng: np.random.Generator, min_size: int, max_size: int) -> Image.Image:
    """One random crop of `photo`, resized to a random side in [min_size, max_size] (the longer side)."""
    width, height = photo.size
    side = min(width, height) * rng.uniform(*SIDE)
    aspect = math.exp(rng.uniform(math.log(ASPECT[0]), math.log(ASPECT[1])))
    w, h = min(width, round(side * math.sqrt(aspect))), min(height, round(side / math.sqrt(aspect)))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    target = int(rng.integers(min_size, max_size + 1))
    scale = target / max(w, h)
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    return photo.crop((left, top, left + w, top + h)).resize(size, Image.Resampling.BILINEAR)


def make_photo_crops(photos: list[Path], out: Path, *, per_class: int = 100, min_size: int = 64, max_size: int = 160,
                     seed: int = 0) -> int:
    """Write `per_class` crops of each photograph into OUT/<photo name>/NNNN.jpg; returns how many were written."""
    written = 0
    for k, path in enumerate(sorted(photos)):
        photo = Image.open(path).convert("RGB")
        rng = np.random.default_rng((seed, k))
        folder = out / path.stem
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            crop_photo(photo, rng, min_size, max_size).save(folder / f"{j:04d}.jpg", quality=90)
            written += 1
    return written


@click.command(cls=OneLineUsageCommand, context_settings=HELP_OPTIONS)
@click.argument("photos", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder to write the tree into.")
@click.option("--per-class", default=100, show_default=True, type=click.IntRange(min=1), help="Crops per photograph.")
@click.option("--min-size", default=64, show_default=True, type=click.IntRange(min=8), help="Smallest longer side.")
@click.option("--max-size", default=160, show_default=True, type=click.IntRange(min=8), help="Largest longer side.")
@click.option("--seed", default=0, show_default=True, help="Seed of the crops.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
def main(photos: tuple[Path, ...], out: Path, per_class: int, min_size: int, max_size: int, seed: int,
         force: bool) -> None:
    """Random crops of each PHOTO into OUT_DIR/<photo name>/, one class per photograph."""
    if out.exists():
        if not force:
            raise click.ClickException(f"{out} exists; pass --force to replace it")
        shutil.rmtree(out)
    if min_size > max_size:
        raise click.ClickException(f"--min-size {min_size} is above --max-size {max_size}")
    count = make_photo_crops(list(photos), out, per_class=per_class, min_size=min_size, max_size=max_size, seed=seed)
    click.echo(f"wrote {count} crops of {len(photos)} photographs to {out}")


if __name__ == "__main__":
    main()
