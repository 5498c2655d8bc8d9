"""Packing speed against what one core can decode (and encode), measured in the same run.

    python tools/bench_pack.py [--images 1000] [--min-size 250] [--max-size 450] [--workers N] [--json OUT.json]

Two generated trees of the same pictures: baseline JPEGs (stored byte for byte, each
verified by a full decode) and PNGs (decoded and re-encoded as JPEG). The baselines are
one core's rate of exactly that per-file work (read + PIL decode; read + decode + JPEG
encode), times the number of workers. The ratio (packer rate over that baseline; the
target is 70%) is what matters: everything else the packer does (scheduling, the spool,
HDF5, the progress line) is overhead.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from make_demo_dataset import make_demo_dataset  # a script beside this one (its folder is on sys.path)
from PIL import Image

from dali_pipes import PackOptions, encode_file, pack_folder
from trainer.cli_usage import HELP_OPTIONS


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def single_core_rate(files: list[Path], work: str, quality: int = 95) -> float:
    """Files per second of one process doing `work` ("decode" or "decode+encode") on each file."""
    start = time.perf_counter()
    for path in files:
        image = Image.open(io.BytesIO(path.read_bytes()))
        image.load()
        if work == "decode+encode":
            image.convert("RGB").save(io.BytesIO(), format="JPEG", quality=quality)
    return len(files) / (time.perf_counter() - start)


def packer_rate(src: Path, out: Path, workers: int) -> tuple[float, dict[str, Any]]:
    """Images per second of `pack_folder` end to end (scan, verify/encode, spool, HDF5, rename)."""
    start = time.perf_counter()
    report = pack_folder(src, out, PackOptions(), workers=workers, force=True, show_progress=False)
    seconds = time.perf_counter() - start
    return report.num_images / seconds, {"copied": report.copied, "reencoded": report.reencoded, "seconds": seconds}


def _png_tree(jpeg_root: Path, png_root: Path) -> None:
    for path in _files(jpeg_root):
        target = png_root / path.relative_to(jpeg_root).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).save(target, compress_level=1)


@click.command(context_settings=HELP_OPTIONS)
@click.option("--images", default=1000, show_default=True)
@click.option("--min-size", default=250, show_default=True)
@click.option("--max-size", default=450, show_default=True)
@click.option("--workers", default=0, help="Packer processes (default: all cores).")
@click.option("--json", "json_out", type=click.Path(path_type=Path))
def main(images: int, min_size: int, max_size: int, workers: int, json_out: Path | None) -> None:
    """Print packing images/s for the byte-copy and re-encode paths, against one core's decode (+encode) rate."""
    workers = workers or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        click.echo(f"generating {images} images of {min_size}-{max_size} px ...")
        make_demo_dataset(root / "jpeg", classes=10, per_class=max(1, images // 10), min_size=min_size,
                          max_size=max_size, png_every=0)
        _png_tree(root / "jpeg", root / "png")
        encode_file(_files(root / "jpeg")[0], None, 95)  # import and warm PIL's codecs
        rows = []
        paths = (("byte copy (baseline JPEG)", root / "jpeg", "decode"),
                 ("re-encode (PNG -> JPEG)", root / "png", "decode+encode"))
        for name, tree, work in paths:
            files = _files(tree)
            one_core = single_core_rate(files, work)
            rate, detail = packer_rate(tree, root / "bench.h5", workers)
            rows.append({"path": name, "images": len(files), "one_core_rate": one_core, "workers": workers,
                         "target_rate": one_core * workers, "packer_rate": rate, "ratio": rate / (one_core * workers),
                         **detail})
    click.echo(f"{'path':28} {'images':>6} {'1 core ' + 'decode(+enc)/s':>22} {'x workers':>10} {'packer/s':>9} "
               f"{'ratio':>6}")
    for r in rows:
        click.echo(f"{r['path']:28} {r['images']:6d} {r['one_core_rate']:22,.0f} {r['target_rate']:10,.0f} "
                   f"{r['packer_rate']:9,.0f} {r['ratio']:6.2f}")
    if json_out:
        json_out.write_text(json.dumps({"rows": rows, "cores": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
