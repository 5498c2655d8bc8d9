"""Pack an image-folder tree into one HDF5 file that the loaders memory-map.

    python tools/pack_dataset.py SRC_DIR OUT.h5 [--val-ratio 0.1] [--test-ratio 0.1] [--seed 0] [--split-by image|class]
                                 [--max-side N] [--quality 95] [--workers N] [--strict] [--force]

SRC_DIR holds one folder per class (sorted names give the labels, as torchvision's
ImageFolder), or train/, val/ and test/ folders of class folders, whose split is kept.
Every file is verified by decoding it; bad files are skipped and recorded in the pack.
The pack is written beside OUT under a temporary name and renamed only when complete.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import click
import numpy as np

from dali_pipes.pack import FORMAT_VERSION, SPLITS, PackedImage, split_code, write_pack
from dali_pipes.packing import Encoded, SourceFile, class_split, encode_job, ignore_sigint, scan_tree, source_bytes, stratified_split
from trainer.cli_usage import OneLineUsageCommand
from trainer.progress import Progress


@dataclass(frozen=True)
class PackOptions:
    """Everything that decides a pack's contents; stored in the pack's attributes."""

    val_ratio: float = 0.1
    test_ratio: float = 0.1
    seed: int = 0
    max_side: int | None = None
    quality: int = 95
    split_by: str = "image"  # image: stratified by class; class: whole classes (identities) per split


@dataclass
class PackReport:
    """What packing did, for the summary line and for tests."""

    num_images: int = 0
    num_classes: int = 0
    split_counts: dict[str, int] = field(default_factory=dict)
    rejects: list[tuple[str, str]] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    copied: int = 0
    reencoded: int = 0
    total_bytes: int = 0
    seconds: float = 0.0


class PackFailure(Exception):
    """A reason to stop packing, shown to the user as one line."""


def _temp_paths(out: Path) -> tuple[Path, Path]:
    stem = f".{out.name}.{os.getpid()}"
    return out.with_name(stem + ".tmp"), out.with_name(stem + ".spool")


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete temporaries of earlier packing runs of `out` whose process is gone (kill -9)."""
    removed = []
    for path in out.parent.glob(f".{out.name}.*"):
        parts = path.name[len(out.name) + 2 :].split(".")
        if len(parts) == 2 and parts[0].isdigit() and parts[1] in ("tmp", "spool") and not _alive(int(parts[0])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _encoded_in_order(files: list[SourceFile], options: PackOptions, workers: int) -> Iterator[tuple[int, Encoded]]:
    jobs = [(i, str(f.path), options.max_side, options.quality) for i, f in enumerate(files)]
    if workers <= 1:
        yield from map(encode_job, jobs)
        return
    # Not fork: forking a process that runs other threads (DALI's, a pool's feeder) can
    # leave a child waiting forever on a lock copied in the held state. forkserver
    # children start from a clean single-threaded server. imap keeps order and bounds memory.
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    context = mp.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["dali_pipes.packing"])  # imported once, not per worker
    with context.Pool(workers, initializer=ignore_sigint) as pool:
        yield from pool.imap(encode_job, jobs, chunksize=32)


def pack_folder(src: Path, out: Path, options: PackOptions, workers: int = 0, strict: bool = False,
                force: bool = False, show_progress: bool = True) -> PackReport:
    """Pack `src` into `out` atomically; raises `PackFailure` with a one-line reason."""
    if not src.exists():
        raise PackFailure(f"{src}: no such directory")
    if not src.is_dir():
        raise PackFailure(f"{src}: not a directory")
    if out.exists() and not force:
        raise PackFailure(f"{out} exists; pass --force to replace it")
    if out.exists() and out.is_dir():
        raise PackFailure(f"{out} is a directory; give a file name such as {out / 'pack.h5'}")
    if not out.parent.is_dir():
        raise PackFailure(f"{out.parent}: output folder does not exist")
    if not os.access(out.parent, os.W_OK):
        raise PackFailure(f"{out.parent}: output folder is not writable")
    scan = scan_tree(src)
    if not scan.files:
        raise PackFailure(f"{src}: no images found (expected SRC_DIR/<class>/<image> or SRC_DIR/train/<class>/<image>)")
    remove_stale_temporaries(out)
    start = time.perf_counter()
    order = np.random.default_rng(options.seed).permutation(len(scan.files))
    files = [scan.files[i] for i in order]
    tmp, spool = _temp_paths(out)
    report = PackReport(empty_classes=scan.empty_classes)
    try:
        accepted = _spool_images(files, options, workers or os.cpu_count() or 1, spool, report, strict, show_progress)
        if not accepted:
            raise PackFailure(f"{src}: none of {len(files)} files could be packed (first: {report.rejects[0][0]}: {report.rejects[0][1]})")
        labels, splits, classes = _labels_and_splits(accepted, scan.presplit, options)
        pack_options = {**options.__dict__, "source": str(src.resolve()), "presplit": scan.presplit, "format_version": FORMAT_VERSION}
        write_pack(tmp, spool, accepted, labels, splits, classes, report.rejects, pack_options)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    finally:
        tmp.unlink(missing_ok=True)
        spool.unlink(missing_ok=True)
    report.num_images = len(accepted)
    report.num_classes = len(classes)
    report.split_counts = {name: int((splits == split_code(name)).sum()) for name in SPLITS}
    report.seconds = time.perf_counter() - start
    return report


def _spool_images(files: list[SourceFile], options: PackOptions, workers: int, spool: Path,
                  report: PackReport, strict: bool, show_progress: bool) -> list[PackedImage]:
    accepted: list[PackedImage] = []
    progress = Progress(len(files), "packing", enabled=show_progress)
    with open(spool, "wb") as sink:
        for index, result in _encoded_in_order(files, options, workers):
            source = files[index]
            progress.update()
            data = None
            try:
                data = None if result.rejected else source_bytes(source.path, result)
            except ValueError as exc:
                result = replace(result, reason=str(exc))
            if data is None or result.rejected:
                report.rejects.append((source.rel_path, result.reason or "rejected"))
                if strict:
                    raise PackFailure(f"{source.rel_path}: {result.reason} (--strict)")
                continue
            sink.write(data)
            report.total_bytes += len(data)
            report.copied += result.copied
            report.reencoded += not result.copied
            accepted.append(PackedImage(source.rel_path, source.class_name, source.split, result.height, result.width, len(data)))
        # No fsync: the spool is a temporary; only the finished pack must reach the disk.
    progress.close()
    return accepted


def _labels_and_splits(accepted: list[PackedImage], presplit: bool, options: PackOptions) -> tuple[np.ndarray, np.ndarray, list[str]]:
    classes = sorted({im.class_name for im in accepted})
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index[im.class_name] for im in accepted], dtype=np.int64)
    if presplit:
        splits = np.array([split_code(im.split or "train") for im in accepted], dtype=np.uint8)
    elif options.split_by == "class":
        try:
            splits = class_split(labels, options.val_ratio, options.test_ratio, options.seed)
        except ValueError as exc:
            raise PackFailure(f"--split-by class: {exc}") from None
    else:
        splits = stratified_split(labels, options.val_ratio, options.test_ratio, options.seed)
    return labels, splits, classes


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def format_report(report: PackReport, out: Path) -> list[str]:
    """Human summary lines for a finished pack."""
    splits = ", ".join(f"{name} {report.split_counts.get(name, 0)}" for name in SPLITS)
    rate = report.num_images / max(report.seconds, 1e-9)
    lines = [
        f"packed {report.num_images} images of {report.num_classes} classes into {out} "
        f"({report.total_bytes / 1e6:.1f} MB; {splits}) in {report.seconds:.1f}s, {rate:,.0f} images/s",
        f"  {report.copied} stored byte for byte, {report.reencoded} re-encoded",
    ]
    if report.rejects:
        lines.append(f"  {len(report.rejects)} files rejected:")
        lines += [f"    {path}: {reason}" for path, reason in report.rejects[:20]]
        if len(report.rejects) > 20:
            lines.append(f"    ... and {len(report.rejects) - 20} more (trainer info {out})")
    if report.empty_classes:
        lines.append(f"  empty class folders (no class made): {', '.join(report.empty_classes)}")
    return lines


def _handle_sigterm(signum: int, frame: object) -> None:
    # Turn SIGTERM into an exception so the finally blocks remove the temporaries.
    raise SystemExit(128 + signum)


@click.command(cls=OneLineUsageCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src_dir", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--val-ratio", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True), help="Share of each class for validation (ignored with train/val/test folders).")
@click.option("--test-ratio", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True), help="Share of each class for test.")
@click.option("--seed", default=0, show_default=True, help="Seed of the split and of the stored order.")
@click.option("--split-by", default="image", show_default=True, type=click.Choice(["image", "class"]), help="class: whole classes go to val and test (identity-disjoint, for verification); the ratios are then shares of classes.")
@click.option("--max-side", type=click.IntRange(min=8), default=None, help="Downsize images whose longer side exceeds this (px).")
@click.option("--quality", default=95, show_default=True, type=click.IntRange(1, 100), help="JPEG quality for re-encoded images.")
@click.option("--workers", default=0, type=click.IntRange(min=0), help="Worker processes (default: all cores).")
@click.option("--strict", is_flag=True, help="Fail on the first rejected file.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress line.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def main(src_dir: Path, out: Path, val_ratio: float, test_ratio: float, seed: int, split_by: str, max_side: int | None, quality: int,
         workers: int, strict: bool, force: bool, quiet: bool, as_json: bool, debug: bool) -> None:
    """Pack the image folder SRC_DIR into the HDF5 file OUT."""
    signal.signal(signal.SIGTERM, _handle_sigterm)
    if val_ratio + test_ratio >= 1:
        raise click.ClickException("--val-ratio + --test-ratio must be below 1")
    options = PackOptions(val_ratio, test_ratio, seed, max_side, quality, split_by)
    try:
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
        click.echo(json.dumps({**report.__dict__, "rejects": [{"path": p, "reason": r} for p, r in report.rejects], "out": str(out)}))
    else:
        click.echo("\n".join(format_report(report, out)))


if __name__ == "__main__":
    main()
