"""Save a picture of one training batch as each backend really produces it.

    python tools/show_batch.py PACK [--backend torch --backend dali ...] [--split train] [--n 16]
                               [--image-size 224] [--seed 0] [--device cpu] [--out batch.png]

Each backend gets one block of the grid, side by side, showing the raw augmented pixels
(`dtype=torch.uint8`, before normalization) with each image's class name. With the same
seed every backend draws the same samples and the same flips and angles, so the blocks
should look alike; a difference is a bug worth a closer look.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

from dali_pipes import LoaderError, PackError, PackReader, available_backends, build_loader
from trainer.cli_usage import HELP_OPTIONS


def default_backends() -> list[str]:
    """Every backend this machine can run, except the synthetic one (it has no real pixels)."""
    return [name for name in available_backends() if name != "synthetic"]


def first_batch(reader: PackReader, split: str, backend: str, n: int, image_size: int, seed: int,
                device: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x S x S x 3 pixels and labels of the first training batch of epoch 0."""
    # drop_last=False: a split smaller than --n still shows what it has.
    loader = build_loader(reader, split, backend=backend, batch_size=n, train=True, image_size=image_size,
                          device=device, dtype=torch.uint8, seed=seed, drop_last=False)
    images, labels = next(iter(loader))
    return images.permute(0, 2, 3, 1).cpu().numpy(), labels.cpu().numpy()


def grid_figure(blocks: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str]) -> "Figure":
    """One block of images per backend, side by side, each image titled with its class."""
    from matplotlib.figure import Figure

    count = max(len(images) for images, _ in blocks.values())
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(1.6 * cols * len(blocks) + 0.4 * (len(blocks) - 1), 1.7 * rows + 0.5), layout="constrained")
    panels = np.atleast_1d(fig.subfigures(1, len(blocks), wspace=0.04))
    for sub, (backend, (images, labels)) in zip(panels, blocks.items()):
        sub.suptitle(backend, fontsize=12, weight="bold")
        for k, ax in enumerate(sub.subplots(rows, cols, squeeze=False).flat):
            ax.set_axis_off()
            if k < len(images):
                ax.imshow(images[k])
                ax.set_title(classes[int(labels[k])], fontsize=7)
    return fig


@click.command(context_settings=HELP_OPTIONS)
@click.argument("pack", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--backend", "backends", multiple=True, help="Backend to show (repeat for several). "
              "Default: every available one except synthetic.")
@click.option("--split", default="train", show_default=True, help="Split to draw the batch from.")
@click.option("--n", "n", default=16, show_default=True, type=click.IntRange(min=1), help="Images per backend.")
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=8), help="Output side in px.")
@click.option("--seed", default=0, show_default=True, help="Seed of the order and the augmentation.")
@click.option("--device", default="cpu", show_default=True, help="Device the backends run on (cpu, cuda, cuda:1).")
@click.option("--out", default=Path("batch.png"), show_default=True, type=click.Path(dir_okay=False, path_type=Path),
              help="PNG to write.")
def main(pack: Path, backends: tuple[str, ...], split: str, n: int, image_size: int, seed: int, device: str,
         out: Path) -> None:
    """Save a PNG grid of one un-normalized training batch from each backend of PACK."""
    chosen = list(backends) or default_backends()
    try:
        reader = PackReader(pack)
        # DALI's thread pools make a later fork risky: torch's DataLoader workers forked after a DALI
        # pipeline exists can deadlock, so every other backend draws its batch first.
        drawn = {name: first_batch(reader, split, name, n, image_size, seed, device)
                 for name in sorted(chosen, key=lambda name: name == "dali")}
        blocks = {name: drawn[name] for name in chosen}
        grid_figure(blocks, reader.classes).savefig(out, dpi=100)
    except (PackError, LoaderError, ValueError, RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    shown = min(len(images) for images, _ in blocks.values())
    click.echo(f"wrote {out} ({', '.join(chosen)}; {split}, {shown} images each, {image_size} px, seed {seed})")


if __name__ == "__main__":
    main()
