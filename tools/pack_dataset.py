"""Pack an image-folder tree into one HDF5 file that the loaders memory-map.

    python tools/pack_dataset.py SRC_DIR OUT.h5 [--val-ratio 0.1] [--test-ratio 0.1] [--seed 0] [--split-by image|class]
                                 [--max-side N] [--quality 95] [--workers N] [--strict] [--force]
                                 [--landmarks FILE --align 112 [--keep-unaligned]]

SRC_DIR holds one folder per class (sorted names give the labels, as torchvision's
ImageFolder), or train/, val/ and test/ folders of class folders, whose split is kept.
Every file is verified by decoding it; bad files are skipped and recorded in the pack.
With --align, each face is stored as the crop its five landmarks align to the ArcFace
template (insightface's 112 x 112), the way face recognition models are trained.
The pack is written beside OUT under a temporary name and renamed only when complete.
The work is `dali_pipes.pack_folder`; this script only parses and reports.
"""
from __future__ import annotations

import json
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click

from dali_pipes import PackFailure, PackOptions, format_report, pack_folder
from trainer.cli_usage import HELP_OPTIONS, OneLineUsageCommand
from trainer.config import FORCE_HELP, WORKERS_HELP


def _handle_sigterm(signum: int, frame: object) -> None:
    # Turn SIGTERM into an exception so the finally blocks remove the temporaries.
    raise SystemExit(128 + signum)


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM raises SystemExit inside the block; the handler before it is back after it."""
    previous = signal.signal(signal.SIGTERM, _handle_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.command(cls=OneLineUsageCommand, context_settings=HELP_OPTIONS)
@click.argument("src_dir", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--val-ratio", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Share of each class for validation (ignored with train/val/test folders).")
@click.option("--test-ratio", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Share of each class for test.")
@click.option("--seed", default=0, show_default=True, help="Seed of the split and of the stored order.")
@click.option("--split-by", default="image", show_default=True, type=click.Choice(["image", "class"]),
              help="class: whole classes go to val and test (identity-disjoint, for verification); "
                   "the ratios are then shares of classes.")
@click.option("--max-side", type=click.IntRange(min=8), default=None,
              help="Downsize images whose longer side exceeds this (px).")
@click.option("--quality", default=95, show_default=True, type=click.IntRange(1, 100),
              help="JPEG quality for re-encoded images.")
@click.option("--landmarks", type=click.Path(path_type=Path),
              help="CSV of five landmarks per image for --align: VGGFace2's loose_landmark_*.csv (NAME_ID,P1X,P1Y,"
                   "...,P5X,P5Y) or path,x1,y1,...,x5,y5 (eyes, nose tip, mouth corners; paths relative to SRC_DIR, "
                   "with or without extension).")
@click.option("--align", type=click.IntRange(min=1), metavar="SIZE",
              help="Store each face as the SIZE x SIZE crop (112, or a multiple) that the similarity mapping its "
                   "--landmarks onto the ArcFace template warps it to; images without landmarks are rejected.")
@click.option("--keep-unaligned", is_flag=True, help="With --align: keep images without landmarks, unaligned.")
@click.option("--workers", type=click.IntRange(min=0), help=WORKERS_HELP)
@click.option("--strict", is_flag=True, help="Fail on the first rejected file.")
@click.option("--force", is_flag=True, help=FORCE_HELP)
@click.option("--quiet", is_flag=True, help="No progress line.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def main(src_dir: Path, out: Path, val_ratio: float, test_ratio: float, seed: int, split_by: str, max_side: int | None,
         quality: int, landmarks: Path | None, align: int | None, keep_unaligned: bool, workers: int | None,
         strict: bool, force: bool, quiet: bool, as_json: bool, debug: bool) -> None:
    """Pack the image folder SRC_DIR into the HDF5 file OUT."""
    if val_ratio + test_ratio >= 1:
        raise click.ClickException("--val-ratio + --test-ratio must be below 1")
    options = PackOptions(val_ratio=val_ratio, test_ratio=test_ratio, seed=seed, max_side=max_side, quality=quality,
                          split_by=split_by, align=align, landmarks=str(landmarks) if landmarks else None,
                          keep_unaligned=keep_unaligned)
    try:
        with _sigterm_exits():
            report = pack_folder(src_dir, out, options, workers, strict, force, show_progress=not quiet and not as_json)
    except PackFailure as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("interrupted; nothing written", err=True)
        sys.exit(130)
    except OSError as exc:
        if debug:
            raise
        raise click.ClickException(f"{exc.filename or out}: {exc.strerror or exc}") from None
    if as_json:
        rejects = [{"path": p, "reason": r} for p, r in report.rejects]
        # `splits` as `trainer info --json` names the counts, beside the report's own `split_counts`.
        click.echo(json.dumps({**report.__dict__, "splits": report.split_counts, "rejects": rejects, "out": str(out)}))
    else:
        click.echo("\n".join(format_report(report, out)))


if __name__ == "__main__":
    main()
