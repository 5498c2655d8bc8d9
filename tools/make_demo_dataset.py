"""Write a small, deterministic, learnable image-folder tree: the demo data and most tests' data.

    python tools/make_demo_dataset.py OUT_DIR [--classes 10] [--per-class 40] [--seed 0] [--landmarks FILE]

Each class is a drawn shape (disc, square, triangle, ...) over a noisy gradient
background, with random position, scale and rotation and a random colour whose hue
leans towards the class's own (a second, weaker cue, so that a model trained from
scratch on a few hundred images learns within a few epochs); sizes between `--min-size` and
`--max-size` px, mostly JPEG with every `--png-every`-th image a PNG. Nothing is downloaded.

`--landmarks FILE` also writes five synthetic landmarks per image (`path,x1,y1,...,x5,y5`): the
ArcFace template's eyes, nose and mouth corners moved by the similarity that places, sizes and
turns the image's shape, so `tools/pack_dataset.py --landmarks FILE --align 112` packs every
shape centred, upright and of one size, as aligned faces are. A pipeline check, not faces.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import click
import numpy as np
from PIL import Image, ImageDraw

from dali_pipes import plural
from dali_pipes.atomic import atomic_write_bytes
from dali_pipes.face_align import ARCFACE_TEMPLATE, PLAIN_HEADER
from trainer.cli_usage import HELP_OPTIONS

# The template's spread (about 21 px from the points' centre) becomes this share of the shape's radius.
TEMPLATE_SPAN = 0.9
SHAPES = ("disc", "square", "triangle", "cross", "ring", "star", "bar", "diamond", "hexagon", "crescent", "arrow",
          "checker")


def _polygon(cx: float, cy: float, radius: float, sides: int, rotation: float,
             star: bool = False) -> list[tuple[float, float]]:
    points = []
    count = sides * 2 if star else sides
    for k in range(count):
        r = radius * (0.45 if star and k % 2 else 1.0)
        a = rotation + 2 * math.pi * k / count
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float,
               color: tuple[int, int, int]) -> None:
    """Draw one class's shape centred at (cx, cy) with radius r and rotation rot (radians)."""
    if shape == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r, 4, rot), fill=color)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, rot), fill=color)
    elif shape == "cross":
        w = r / 3
        for a in (rot, rot + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            px, py = -dy * w, dx * w
            draw.polygon([(cx - dx * r + px, cy - dy * r + py), (cx + dx * r + px, cy + dy * r + py),
                          (cx + dx * r - px, cy + dy * r - py), (cx - dx * r - px, cy - dy * r - py)], fill=color)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=max(2, int(r / 4)))
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r, 5, rot, star=True), fill=color)
    elif shape == "bar":
        draw.polygon(_polygon(cx, cy, r, 4, rot)[:2] + [(cx, cy)], fill=color)
        draw.line([(cx - r * math.cos(rot), cy - r * math.sin(rot)), (cx + r * math.cos(rot), cy + r * math.sin(rot))],
                  fill=color, width=max(3, int(r / 3)))
    elif shape == "diamond":
        pts = _polygon(cx, cy, r, 4, rot + math.pi / 4)
        draw.polygon([(x, cy + (y - cy) * 0.5) for x, y in pts], fill=color)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, rot), fill=color)
    elif shape == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        off = r * 0.5
        draw.ellipse([cx - r + off, cy - r, cx + r + off, cy + r], fill=(0, 0, 0))
    elif shape == "arrow":
        draw.polygon(_polygon(cx, cy, r, 3, rot), fill=color)
        draw.line([(cx, cy), (cx - 1.6 * r * math.cos(rot), cy - 1.6 * r * math.sin(rot))], fill=color,
                  width=max(3, int(r / 3)))
    elif shape == "checker":
        step = max(2, int(r / 2))
        for i in range(-2, 2):
            for j in range(-2, 2):
                if (i + j) % 2 == 0:
                    draw.rectangle([cx + i * step, cy + j * step, cx + (i + 1) * step, cy + (j + 1) * step], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    import colorsys

    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))  # type: ignore[return-value]


def make_image(rng: np.random.Generator, shape: str, min_size: int, max_size: int, hue: float = 0.0) -> Image.Image:
    """One random picture of `shape` on a noisy gradient background; the shape's hue is `hue` +- 0.1."""
    return make_image_and_landmarks(rng, shape, min_size, max_size, hue)[0]


def shape_landmarks(cx: float, cy: float, r: float, rotation: float) -> np.ndarray:
    """5 x 2: the ArcFace template's points placed as a face would be on a shape at (cx, cy) of radius r, turned
    by `rotation` radians."""
    points = np.array(ARCFACE_TEMPLATE)
    centred = points - points.mean(axis=0)
    scale = TEMPLATE_SPAN * r / np.linalg.norm(centred, axis=1).mean()
    c, s = math.cos(rotation), math.sin(rotation)
    return centred @ (scale * np.array([[c, s], [-s, c]])) + (cx, cy)


def make_image_and_landmarks(rng: np.random.Generator, shape: str, min_size: int, max_size: int,
                             hue: float = 0.0) -> tuple[Image.Image, np.ndarray]:
    """`make_image`'s picture and its shape's synthetic landmarks (`shape_landmarks`)."""
    width, height = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    base = np.array(_hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.5), rng.uniform(0.3, 0.9)))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    gradient = ((xx / width)[..., None] * rng.uniform(-60, 60, size=3)
                + (yy / height)[..., None] * rng.uniform(-60, 60, size=3))
    noise = rng.normal(0, 12, size=(height, width, 3))
    background = np.clip(base + gradient + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    r = side * rng.uniform(0.18, 0.38)
    cx = rng.uniform(r, width - r)
    cy = rng.uniform(r, height - r)
    # Saturated shape on a duller background, so every sample is learnable.
    color = _hsv_to_rgb(hue + rng.uniform(-0.1, 0.1), rng.uniform(0.7, 1.0), rng.uniform(0.6, 1.0))
    rotation = rng.uniform(0, 2 * math.pi)
    draw_shape(draw, shape, cx, cy, r, rotation, color)
    return image, shape_landmarks(cx, cy, r, rotation)


def _write_class(job: tuple[Path, int, int, int, int, int, int, int, int]) -> list[tuple[str, np.ndarray]]:
    """Draw and save images first..last-1 of class c; their paths (relative to the tree) and landmarks."""
    out_dir, c, classes, first, last, seed, min_size, max_size, png_every = job
    shape = SHAPES[c]
    folder = out_dir / f"{c:02d}_{shape}"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(first, last):
        # Seeded per image, so the tree is the same whatever the number of workers.
        image, points = make_image_and_landmarks(np.random.default_rng((seed, c, i)), shape, min_size, max_size,
                                                 hue=c / classes)
        name = f"{i:04d}.png" if png_every and i % png_every == png_every - 1 else f"{i:04d}.jpg"
        image.save(folder / name, **({} if name.endswith(".png") else {"quality": 90}))
        written.append((f"{folder.name}/{name}", points))
    return written


def make_demo_dataset(out_dir: Path, classes: int = 10, per_class: int = 40, seed: int = 0,
                      min_size: int = 100, max_size: int = 400, png_every: int = 10, workers: int = 1,
                      landmarks: Path | None = None) -> int:
    """Write `classes` x `per_class` images under out_dir/<class>/ (and their landmarks CSV to `landmarks`);
    returns the number written."""
    if not 1 <= classes <= len(SHAPES):
        raise ValueError(f"classes must be between 1 and {len(SHAPES)}")
    step = max(1, min(per_class, 200))
    jobs = [(out_dir, c, classes, first, min(first + step, per_class), seed, min_size, max_size, png_every)
            for c in range(classes) for first in range(0, per_class, step)]
    if workers <= 1 or len(jobs) == 1:
        written = [row for rows in map(_write_class, jobs) for row in rows]
    else:
        import multiprocessing as mp

        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(workers) as pool:
            written = [row for rows in pool.imap(_write_class, jobs) for row in rows]
    if landmarks is not None:
        write_landmarks(landmarks, written)
    return len(written)


def write_landmarks(path: Path, rows: list[tuple[str, np.ndarray]]) -> None:
    """A landmarks CSV (`path,x1,y1,...,x5,y5`, the header `face_align` reads), written atomically."""
    lines = [",".join(PLAIN_HEADER)] + [",".join([name, *(f"{v:.2f}" for v in points.reshape(-1))])
                                          for name, points in rows]
    atomic_write_bytes(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))


@click.command(context_settings=HELP_OPTIONS)
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--classes", default=10, show_default=True, help=f"Number of classes (at most {len(SHAPES)}).")
@click.option("--per-class", default=40, show_default=True, help="Images per class.")
@click.option("--seed", default=0, show_default=True)
@click.option("--min-size", default=100, show_default=True, help="Smallest side length in px.")
@click.option("--max-size", default=400, show_default=True, help="Largest side length in px.")
@click.option("--png-every", default=10, show_default=True, help="Every n-th image is a PNG (0: none).")
@click.option("--workers", default=1, show_default=True,
              help="Processes drawing images (the output does not depend on it).")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--landmarks", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write this CSV of five synthetic landmarks per image (for pack_dataset.py --align 112).")
def main(out_dir: Path, classes: int, per_class: int, seed: int, min_size: int, max_size: int, png_every: int,
         workers: int, force: bool, landmarks: Path | None) -> None:
    """Write the deterministic demo image-folder tree into OUT_DIR."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise click.ClickException(f"{out_dir} exists and is not empty; pass --force to replace it")
        shutil.rmtree(out_dir)
    if not 8 <= min_size <= max_size:
        raise click.BadParameter("need 8 <= --min-size <= --max-size")
    try:
        count = make_demo_dataset(out_dir, classes, per_class, seed, min_size, max_size, png_every, workers, landmarks)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {plural(count, 'image')} in {plural(classes, 'class')} to {out_dir}"
               + (f" and their landmarks to {landmarks}" if landmarks else ""))


if __name__ == "__main__":
    main()
