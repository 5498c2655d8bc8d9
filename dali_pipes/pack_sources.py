"""The sources of a pack: finding image files in a folder tree, and reading, verifying, encoding each one.

The per-file steps of `pack_writer.pack_folder` (the library behind
tools/pack_dataset.py): each file stored as it is where it can be, re-encoded, or a face
aligned to the ArcFace template (`face_align`); and `load_rgb`, which reads a file as the
packer stores it. Knows PIL, OpenCV and numpy, never torch or DALI.
"""
from __future__ import annotations

import io
import os
import signal
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .face_align import NO_LANDMARKS, align_face
from .pack_format import SPLITS

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff"})
MIN_SIDE = 8
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class SourceFile:
    """One candidate file: where it is, its class folder, and its given split (or None)."""

    path: Path
    rel_path: str
    class_name: str
    split: str | None


@dataclass(frozen=True)
class Encoded:
    """The result of preparing one file: JPEG bytes and size, or the reason it was rejected."""

    data: bytes | None
    height: int
    width: int
    reason: str | None
    copied: bool  # stored byte for byte, not re-encoded
    checksum: int | None = None  # crc32 of the bytes, when `data` was left behind (see `encode_job`)
    aligned: bool = False  # a face aligned to the template (`encode_aligned`)

    @property
    def rejected(self) -> bool:
        """True when the file does not go into the pack."""
        return self.reason is not None


@dataclass(frozen=True)
class Scan:
    """What was found under SRC_DIR."""

    files: list[SourceFile]
    empty_classes: list[str]
    presplit: bool


def _visible(entry: os.DirEntry[str]) -> bool:
    return not entry.name.startswith(".")


def _class_dirs(root: Path) -> list[os.DirEntry[str]]:
    return sorted((e for e in os.scandir(root) if e.is_dir() and _visible(e)), key=lambda e: e.name)


def scan_tree(src: Path) -> Scan:
    """List candidate image files under `src` (class folders, or train/val/test of class folders).

    Hidden files and folders and files without an image extension are ignored; class
    folders with no candidate image are reported in `empty_classes`.
    """
    top = [e.name for e in _class_dirs(src)]
    presplit = "train" in top and set(top) <= set(SPLITS)
    roots = [(src / name, name) for name in SPLITS if name in top] if presplit else [(src, None)]
    files: list[SourceFile] = []
    empty: list[str] = []
    for root, split in roots:
        for class_dir in _class_dirs(root):
            found = []
            for dirpath, dirnames, filenames in os.walk(class_dir.path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                        continue
                    path = Path(dirpath) / name
                    found.append(SourceFile(path, path.relative_to(src).as_posix(), class_dir.name, split))
            if found:
                files.extend(found)
            else:
                empty.append(class_dir.name if split is None else f"{split}/{class_dir.name}")
    return Scan(files, empty, presplit)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit and float scaled, palettes and alpha flattened on black."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(image, dtype=np.float64)
        # 16-bit data stored in 'I' keeps 0..65535; scale to 0..255 rather than clip.
        peak = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        image = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def size_problem(width: int, height: int, where: str = "") -> str | None:
    """The reject reason of an image of `width` x `height` px (`where`: the step that made it that size), or None.

    The one size rule of the packer and of loose files (`load_rgb`): at least MIN_SIDE px a side.
    """
    if min(width, height) >= MIN_SIDE:
        return None
    return f"too small ({width}x{height}{where}, need {MIN_SIDE} px a side)"


def stored_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) of an image as stored: downsized, aspect ratio kept, so its longer side is at most `max_side`."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_file(path: Path, max_side: int | None, quality: int) -> Encoded:
    """Read, verify (full decode) and, where needed, re-encode one file as RGB JPEG.

    A baseline RGB JPEG with no EXIF rotation and within `max_side` is kept byte for
    byte; anything else is converted (EXIF orientation applied, RGB, downsized to
    `max_side` with antialiasing) and encoded at `quality`.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        return Encoded(None, 0, 0, f"unreadable: {exc.strerror or exc}", False)
    if not data:
        return Encoded(None, 0, 0, "empty file", False)
    try:
        image = Image.open(io.BytesIO(data))
        fmt = image.format
        image.load()  # full decode: catches truncated and corrupt files
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except UnidentifiedImageError:
        return Encoded(None, 0, 0, "not an image", False)
    except Image.DecompressionBombError:
        return Encoded(None, 0, 0, "image too large (decompression bomb guard)", False)
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        return Encoded(None, 0, 0, f"undecodable: {str(exc).splitlines()[0][:100]}", False)
    width, height = image.size
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    stored = stored_size(width, height, max_side)
    small = size_problem(width, height) or size_problem(*stored, f" after --max-side {max_side}")
    if small:
        return Encoded(None, height, width, small, False)
    fits = stored == (width, height)
    progressive = bool(image.info.get("progressive") or image.info.get("progression"))
    if fmt == "JPEG" and image.mode == "RGB" and not progressive and orientation == 1 and fits:
        return Encoded(data, height, width, None, True)
    try:
        image = _to_rgb(ImageOps.exif_transpose(image))
        if not fits:
            image = image.resize(stored, Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=quality)
    except (OSError, ValueError) as exc:
        return Encoded(None, height, width, f"could not convert: {str(exc).splitlines()[0][:100]}", False)
    return Encoded(out.getvalue(), image.height, image.width, None, False)


def encode_aligned(path: Path, landmarks: np.ndarray | None, size: int, quality: int) -> Encoded:
    """The face in `path` aligned to the `size` x `size` ArcFace template by its five `landmarks`, as JPEG.

    Decoded as `load_rgb` decodes (EXIF orientation applied, the frame the landmarks are given
    in) and always re-encoded at `quality`. Rejected with `NO_LANDMARKS` without landmarks, and
    with the reason when the file cannot be read or the landmarks cannot be used.
    """
    if landmarks is None:
        return Encoded(None, 0, 0, NO_LANDMARKS, False)
    try:
        rgb = _read_rgb(path)
    except READ_ERRORS as exc:
        return Encoded(None, 0, 0, f"undecodable: {_reason(exc)}", False)
    try:
        face = align_face(rgb, landmarks, size)
    except ValueError as exc:  # degenerate landmarks
        return Encoded(None, rgb.shape[0], rgb.shape[1], str(exc), False)
    out = io.BytesIO()
    Image.fromarray(face).save(out, format="JPEG", quality=quality)
    return Encoded(out.getvalue(), size, size, None, False, aligned=True)


EncodeJob = tuple[int, str, int | None, int, int | None, np.ndarray | None]


def encode_job(job: EncodeJob) -> tuple[int, Encoded]:
    """`encode_file`, or `encode_aligned` where an align size is given, for a pool:
    (position, path, max_side, quality, align size or None, landmarks or None) -> (position, result).

    A file stored byte for byte comes back without its bytes, only their crc32: shipping
    every byte through the pool's pipe cost more than the decode (2 workers: 1,400 vs
    2,300 images/s measured), and the parent reads the file again from the page cache.
    """
    index, path, max_side, quality, align, landmarks = job
    if align is not None:
        return index, encode_aligned(Path(path), landmarks, align, quality)
    result = encode_file(Path(path), max_side, quality)
    if result.copied and result.data is not None:
        result = replace(result, data=None, checksum=zlib.crc32(result.data))
    return index, result


def source_bytes(path: Path, result: Encoded) -> bytes:
    """The bytes to store for `result`: its own, or the file's (checked against the crc32 it was verified with).

    Raises `ValueError` when the file changed or vanished since it was verified.
    """
    if result.data is not None:
        return result.data
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"unreadable after verification: {exc.strerror or exc}") from None
    if zlib.crc32(data) != result.checksum:
        raise ValueError("changed while packing")
    return data


def ignore_sigint() -> None:
    """Pool initializer: Ctrl-C is the parent's to handle (it cleans up and stops the pool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, UnidentifiedImageError, Image.DecompressionBombError)


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        image.load()
        return np.array(_to_rgb(ImageOps.exif_transpose(image)))  # a writable copy


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__


def load_rgb(path: Path) -> np.ndarray:
    """Any supported image file as H x W x 3 uint8 RGB, EXIF orientation applied (as the packer stores it).

    Raises `ValueError` naming the file when it cannot be read or decoded, or when the packer
    would reject it as too small (`size_problem`).
    """
    try:
        pixels = _read_rgb(path)
    except READ_ERRORS as exc:
        raise ValueError(f"{path}: cannot read image ({_reason(exc)})") from None
    small = size_problem(pixels.shape[1], pixels.shape[0])
    if small:
        raise ValueError(f"{path}: {small}")
    return pixels
