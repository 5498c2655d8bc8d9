"""How a pack is written: `pack_folder` turns an image-folder tree into one pack file.

Steps: read the landmarks when faces are aligned (`face_align.read_landmarks`), scan the
tree (`pack_sources.scan_tree`), shuffle the file order with the seed, verify and encode
(or align) every file in worker processes (`pack_sources.encode_job`), stream
the accepted bytes to a spool (a contiguous HDF5 dataset cannot grow, so the total size
must be known before the bytes are written), split (`splits`), then write the pack from
the spool (`write_pack`, the layout of `pack_format`) through `atomic.atomic_path`: the
pack appears complete or not at all. Temporaries of a run that was killed are removed
by the next run for the same output.

`tools/pack_dataset.py` is a command-line shell over this module. Knows numpy, h5py
and PIL (through `pack_sources`), never torch, DALI or `trainer`.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from .atomic import OutputError, atomic_path, check_output, stale_temporary
from .cores import default_workers
from .face_align import LandmarksError, LandmarkTable, read_landmarks, template
from .pack_format import FORMAT_VERSION, MAGIC, SPLITS, split_code
from .pack_sources import Encoded, EncodeJob, SourceFile, encode_job, ignore_sigint, scan_tree, source_bytes
from .progress import Progress
from .splits import class_split, split_kind, stratified_split
from .words import plural


@dataclass(frozen=True)
class PackOptions:
    """Everything that decides a pack's contents; stored in the pack's attributes."""

    val_ratio: float = 0.1
    test_ratio: float = 0.1
    seed: int = 0
    max_side: int | None = None
    quality: int = 95
    split_by: str = "image"  # image: stratified by class; class: whole classes (identities) per split
    align: int | None = None  # store faces aligned to the ArcFace template as align x align crops (112)
    landmarks: str | None = None  # the CSV of five landmarks per image that --align warps by
    keep_unaligned: bool = False  # with align: keep images without landmarks as they are, instead of rejecting them


@dataclass
class PackReport:
    """What packing did, for the summary line and for tests."""

    num_images: int = 0
    num_classes: int = 0
    split_counts: dict[str, int] = field(default_factory=dict)
    split_by: str = "image"  # what `splits.split_kind` calls the pack: image or class
    untrained_classes: list[str] = field(default_factory=list)  # classes with no training image
    rejects: list[tuple[str, str]] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    copied: int = 0
    reencoded: int = 0
    aligned: int = 0  # of the re-encoded: faces aligned to the template
    total_bytes: int = 0
    seconds: float = 0.0


class PackFailure(Exception):
    """A reason to stop packing, shown to the user as one line."""


@dataclass(frozen=True)
class PackedImage:
    """One accepted image, as the writer records it (its bytes live in the spool)."""

    path: str
    class_name: str
    split: str | None  # None: assigned later by the stratified split
    height: int
    width: int
    nbytes: int


def write_pack(
    out_path: Path,
    spool_path: Path,
    images: Sequence[PackedImage],
    labels: np.ndarray,
    splits: np.ndarray,
    classes: Sequence[str],
    rejects: Sequence[tuple[str, str]],
    options: dict[str, Any],
    copy_chunk_bytes: int = 64 << 20,
    empty_classes: Sequence[str] = (),
) -> None:
    """Write the HDF5 file at `out_path` from a spool of concatenated image bytes.

    `images` are in spool order, which is the pack order. `empty_classes` are the class
    folders the scan found without an image (kept for `trainer info`). The bytes are copied in
    bounded chunks, so memory does not grow with the dataset. The caller owns atomicity
    (it writes through `atomic.atomic_path`, which fsyncs and renames).
    """
    sizes = np.fromiter((im.nbytes for im in images), dtype=np.int64, count=len(images))
    offsets = np.zeros(len(images) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    total = int(offsets[-1])
    if os.path.getsize(spool_path) != total:
        raise RuntimeError(f"spool holds {os.path.getsize(spool_path)} bytes, expected {total}")
    text = h5py.string_dtype(encoding="utf-8")
    counts = {name: int((splits == split_code(name)).sum()) for name in SPLITS}
    with h5py.File(out_path, "w", libver="earliest") as f:
        f.attrs["magic"] = MAGIC
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["options"] = json.dumps(options, sort_keys=True)
        f.attrs["num_images"] = len(images)
        f.attrs["num_classes"] = len(classes)
        f.attrs["counts"] = json.dumps(counts)
        f.attrs["empty_classes"] = json.dumps(list(empty_classes))
        # Contiguous layout (no chunks, no filters) is what makes memory-mapping possible.
        dset = f.create_dataset("images", shape=(max(total, 1),), dtype=np.uint8)
        with open(spool_path, "rb") as spool:
            pos = 0
            while pos < total:
                chunk = spool.read(min(copy_chunk_bytes, total - pos))
                dset[pos : pos + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
                pos += len(chunk)
        f.create_dataset("offsets", data=offsets)
        f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
        f.create_dataset("splits", data=np.asarray(splits, dtype=np.uint8))
        f.create_dataset("paths", data=[im.path for im in images], dtype=text)
        f.create_dataset("heights", data=np.array([im.height for im in images], dtype=np.int32))
        f.create_dataset("widths", data=np.array([im.width for im in images], dtype=np.int32))
        f.create_dataset("classes", data=list(classes), dtype=text)
        rej = f.create_group("rejects")
        rej.create_dataset("paths", data=[p for p, _ in rejects], dtype=text, shape=(len(rejects),))
        rej.create_dataset("reasons", data=[r for _, r in rejects], dtype=text, shape=(len(rejects),))


def spool_path(out: Path) -> Path:
    """Where this process streams the accepted images' bytes before writing `out`."""
    return out.with_name(f".{out.name}.{os.getpid()}.spool")


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete temporaries of earlier packing runs of `out` whose process is gone (kill -9)."""
    removed = []
    for path in out.parent.glob(f".{out.name}.*"):
        if stale_temporary(path, out):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _check_paths(src: Path, out: Path, force: bool) -> None:
    if not src.exists():
        raise PackFailure(f"{src}: no such directory")
    if not src.is_dir():
        raise PackFailure(f"{src}: not a directory")
    try:
        check_output(out, force)
    except OutputError as exc:
        raise PackFailure(str(exc)) from None


def _check_alignment(options: PackOptions) -> None:
    """Refuse alignment options that do not fit together, before any work."""
    if options.align is None:
        if options.landmarks or options.keep_unaligned:
            raise PackFailure("--landmarks and --keep-unaligned need --align SIZE (112: the ArcFace template)")
        return
    if not options.landmarks:
        raise PackFailure(f"--align {options.align} needs --landmarks FILE (five landmarks per image)")
    try:
        template(options.align)
    except ValueError as exc:
        raise PackFailure(f"--align {options.align}: {exc}") from None


def _landmarks(options: PackOptions) -> LandmarkTable | None:
    """The landmarks table the faces are aligned by (None: no alignment); an unusable file is a `PackFailure`."""
    if options.align is None or not options.landmarks:
        return None
    try:
        return read_landmarks(options.landmarks)
    except LandmarksError as exc:
        raise PackFailure(str(exc)) from None


def _job(index: int, source: SourceFile, options: PackOptions, landmarks: LandmarkTable | None) -> EncodeJob:
    """What a worker does with `source`: encode it, or align it (no landmarks: rejected, or kept unaligned)."""
    points = landmarks.lookup(source.rel_path) if landmarks is not None else None
    align = None if landmarks is None or (points is None and options.keep_unaligned) else options.align
    return index, str(source.path), options.max_side, options.quality, align, points


def _encoded_in_order(files: list[SourceFile], options: PackOptions, workers: int,
                      landmarks: LandmarkTable | None) -> Iterator[tuple[int, Encoded]]:
    jobs = [_job(i, f, options, landmarks) for i, f in enumerate(files)]
    if workers <= 1:
        yield from map(encode_job, jobs)
        return
    # Not fork: forking a process that runs other threads (DALI's, a pool's feeder) can
    # leave a child waiting forever on a lock copied in the held state. forkserver
    # children start from a clean single-threaded server. imap keeps order and bounds memory.
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    context = mp.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["dali_pipes.pack_sources"])  # imported once, not per worker
    with context.Pool(workers, initializer=ignore_sigint) as pool:
        yield from pool.imap(encode_job, jobs, chunksize=32)


def pack_folder(src: Path, out: Path, options: PackOptions, workers: int | None = None, strict: bool = False,
                force: bool = False, show_progress: bool = True) -> PackReport:
    """Pack `src` into `out` atomically; raises `PackFailure` with a one-line reason.

    `workers` processes verify and encode (None: `cores.default_workers()`; 0 or 1: this process).
    """
    _check_alignment(options)
    _check_paths(src, out, force)
    landmarks = _landmarks(options)
    scan = scan_tree(src)
    if not scan.files:
        raise PackFailure(f"{src}: no images found (expected SRC_DIR/<class>/<image> or SRC_DIR/train/<class>/<image>)")
    remove_stale_temporaries(out)
    start = time.perf_counter()
    order = np.random.default_rng(options.seed).permutation(len(scan.files))
    files = [scan.files[i] for i in order]
    spool = spool_path(out)
    report = PackReport(empty_classes=scan.empty_classes)
    try:
        accepted = _spool_images(files, options, default_workers() if workers is None else workers, spool, report,
                                 strict, show_progress, landmarks)
        if not accepted:
            first, reason = report.rejects[0]
            raise PackFailure(f"{src}: no file could be packed ({plural(len(files), 'file')} tried; first: {first}: "
                              f"{reason})")
        labels, splits, classes = _labels_and_splits(accepted, scan.presplit, options)
        pack_options = {**options.__dict__, "source": str(src.resolve()), "presplit": scan.presplit,
                        "format_version": FORMAT_VERSION,
                        "landmarks": str(Path(options.landmarks).resolve()) if options.landmarks else None}
        with atomic_path(out) as tmp:
            write_pack(tmp, spool, accepted, labels, splits, classes, report.rejects, pack_options,
                       empty_classes=scan.empty_classes)
    finally:
        spool.unlink(missing_ok=True)
    report.num_images = len(accepted)
    report.num_classes = len(classes)
    report.split_counts = {name: int((splits == split_code(name)).sum()) for name in SPLITS}
    report.split_by = split_kind(labels, splits)
    trained = np.bincount(labels[splits == split_code("train")], minlength=len(classes))
    report.untrained_classes = [classes[i] for i in np.flatnonzero(trained == 0)]
    report.seconds = time.perf_counter() - start
    return report


def _spool_images(files: list[SourceFile], options: PackOptions, workers: int, spool: Path, report: PackReport,
                  strict: bool, show_progress: bool, landmarks: LandmarkTable | None) -> list[PackedImage]:
    accepted: list[PackedImage] = []
    progress = Progress(len(files), "packing", enabled=show_progress)
    with open(spool, "wb") as sink:
        for index, result in _encoded_in_order(files, options, workers, landmarks):
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
            report.aligned += result.aligned
            accepted.append(PackedImage(source.rel_path, source.class_name, source.split, result.height, result.width,
                                        len(data)))
        # No fsync: the spool is a temporary; only the finished pack must reach the disk.
    progress.close()
    return accepted


def _labels_and_splits(accepted: list[PackedImage], presplit: bool,
                       options: PackOptions) -> tuple[np.ndarray, np.ndarray, list[str]]:
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


def format_report(report: PackReport, out: Path) -> list[str]:
    """Human summary lines for a finished pack."""
    splits = ", ".join(f"{name} {report.split_counts.get(name, 0)}" for name in SPLITS)
    rate = report.num_images / max(report.seconds, 1e-9)
    lines = [
        f"packed {plural(report.num_images, 'image')} of {plural(report.num_classes, 'class')} into {out} "
        f"({report.total_bytes / 1e6:.1f} MB; {splits}) in {report.seconds:.1f}s, {rate:,.0f} images/s",
        f"  {report.copied} stored byte for byte, {report.reencoded} re-encoded"
        + (f" ({report.aligned} faces aligned to the ArcFace template)" if report.aligned else ""),
    ]
    lines += _split_lines(report)
    if report.rejects:
        lines.append(f"  {plural(len(report.rejects), 'file')} rejected:")
        lines += [f"    {path}: {reason}" for path, reason in report.rejects[:20]]
        if len(report.rejects) > 20:
            lines.append(f"    ... and {len(report.rejects) - 20} more (trainer info {out})")
    if report.empty_classes:
        lines.append(f"  empty class folders (no class made): {', '.join(report.empty_classes)}")
    return lines


def _split_lines(report: PackReport) -> list[str]:
    """What the split means for training: split by class, or a warning when the given splits are neither kind."""
    if report.split_by == "class":
        return ["  split by class: val and test hold only classes train never saw (for verification)"]
    if not report.untrained_classes:
        return []
    names = ", ".join(report.untrained_classes[:5]) + (", ..." if len(report.untrained_classes) > 5 else "")
    return [f"  warning: {plural(len(report.untrained_classes), 'class')} without a training image ({names}) beside "
            "val/test classes that train holds: split neither by image nor by class, so trainer run refuses it; "
            "move their images into train/, or keep in val/ and test/ only classes absent from train/"]
