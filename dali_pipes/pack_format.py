"""The pack format: one HDF5 file holding every encoded image of a dataset, and its reader.

Layout (format version 1)::

    /images     uint8  [total_bytes]   contiguous, uncompressed: all JPEG bytes back to back
    /offsets    int64  [N + 1]         image i is images[offsets[i]:offsets[i + 1]]
    /labels     int64  [N]             index into /classes
    /splits     uint8  [N]             index into SPLITS
    /paths      str    [N]             source path relative to SRC_DIR
    /heights    int32  [N]             stored (decoded) height
    /widths     int32  [N]             stored (decoded) width
    /classes    str    [K]             sorted class folder names
    /rejects/paths, /rejects/reasons   str  files left out, and why
    attrs: format_version, magic, options (JSON), num_images, num_classes, counts (JSON),
           empty_classes (JSON: class folders the packer found without an image; absent in older packs)

Because /images is contiguous and uncompressed, the reader memory-maps the file at the
dataset's byte offset and hands out zero-copy views: no HDF5 call on the hot path.
`pack_writer.write_pack` writes this layout. This module knows h5py and numpy only
(no torch, no DALI).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

FORMAT_VERSION = 1
MAGIC = "dali-trainer-pack"
SPLITS = ("train", "val", "test")


class PackError(Exception):
    """A pack cannot be read: not a pack, another format version, truncated, missing."""


def split_code(name: str) -> int:
    """Integer code stored in /splits for a split name."""
    try:
        return SPLITS.index(name)
    except ValueError:
        raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}") from None


class PackReader:
    """Read-only access to a pack: metadata in RAM, image bytes as memory-map views.

    Safe to hand to DataLoader workers and DALI callbacks: the memory map is opened
    lazily in each process (fork or spawn) and never pickled. Metadata is validated
    when the reader is made, so a bad file fails with one `PackError` naming it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        meta = _read_metadata(self.path)
        self.format_version: int = meta["format_version"]
        self.options: dict[str, Any] = meta["options"]
        self.empty_classes: list[str] = meta["empty_classes"]  # folders the packer found empty (no class made)
        self.classes: list[str] = meta["classes"]
        self.labels: np.ndarray = meta["labels"]
        self.splits: np.ndarray = meta["splits"]
        self.offsets: np.ndarray = meta["offsets"]
        self.heights: np.ndarray = meta["heights"]
        self.widths: np.ndarray = meta["widths"]
        self._paths: list[str] | None = None
        self._data_offset: int = meta["data_offset"]
        self._mmap: np.memmap | None = None
        self._mmap_pid: int | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are 0 .. num_classes - 1)."""
        return len(self.classes)

    def split_indices(self, split: str) -> np.ndarray:
        """Pack indices of the images in `split`, in pack order."""
        return np.flatnonzero(self.splits == split_code(split)).astype(np.int64)

    def split_counts(self) -> dict[str, int]:
        """Number of images in each split."""
        return {name: int((self.splits == i).sum()) for i, name in enumerate(SPLITS)}

    def class_counts(self, split: str) -> np.ndarray:
        """Images of each class (index = label) in `split`."""
        return np.bincount(self.labels[self.split_indices(split)], minlength=self.num_classes)

    def classes_in(self, split: str) -> list[str]:
        """The classes with at least one image in `split` (all of them in train, unless the pack is split by class)."""
        return [self.classes[i] for i in np.flatnonzero(self.class_counts(split))]

    @property
    def paths(self) -> list[str]:
        """Source paths (relative to the packed folder); loaded on first use."""
        if self._paths is None:
            with _open_h5(self.path) as f:
                self._paths = [p.decode() if isinstance(p, bytes) else p for p in f["paths"][()]]
        return self._paths

    def rejects(self) -> list[dict[str, str]]:
        """Files the packer left out, each with its `path` and `reason`."""
        with _open_h5(self.path) as f:
            paths = [_text(p) for p in f["rejects/paths"][()]]
            reasons = [_text(r) for r in f["rejects/reasons"][()]]
        return [{"path": p, "reason": r} for p, r in zip(paths, reasons)]

    def _map(self) -> np.memmap:
        # A memmap inherited through fork shares the parent's pages, which is fine for
        # reading, but a reader made in the parent and pickled to a spawned worker has
        # none: open per process.
        if self._mmap is None or self._mmap_pid != os.getpid():
            total = int(self.offsets[-1])
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_offset,
                                   shape=(max(total, 1),))
            self._mmap_pid = os.getpid()
        return self._mmap

    def image_bytes(self, index: int) -> np.ndarray:
        """Encoded JPEG bytes of image `index`: a zero-copy uint8 view of the memory map."""
        start, end = self.offsets[index], self.offsets[index + 1]
        return self._map()[start:end]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_mmap"] = None
        state["_mmap_pid"] = None
        return state


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _open_h5(path: Path) -> h5py.File:
    if not path.exists():
        raise PackError(f"{path}: no such file")
    if path.is_dir():
        raise PackError(f"{path}: is a directory, not a pack")
    try:
        # No HDF5 file lock: a pack is only ever read here, and NFS or Lustre mounts without
        # lock support would otherwise refuse to open it ("unable to lock file").
        return h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise PackError(f"{path}: not a readable HDF5 pack ({_short(exc)}); "
                        "make one with tools/pack_dataset.py") from None


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:120]


_REQUIRED = ("images", "offsets", "labels", "splits", "paths", "heights", "widths", "classes", "rejects/paths",
             "rejects/reasons")


def _read_metadata(path: Path) -> dict[str, Any]:
    with _open_h5(path) as f:
        if f.attrs.get("magic") != MAGIC:
            raise PackError(f"{path}: not a dali-trainer pack (no pack header); make one with tools/pack_dataset.py")
        version = int(f.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise PackError(f"{path}: pack format version {version}, this program reads version {FORMAT_VERSION}; "
                            "repack it with tools/pack_dataset.py")
        missing = [name for name in _REQUIRED if name not in f]
        if missing:
            raise PackError(f"{path}: damaged pack, missing {', '.join(missing)}; repack it")
        try:
            images = f["images"]
            data_offset = images.id.get_offset()
            meta = {
                "format_version": version,
                "options": json.loads(f.attrs.get("options", "{}")),
                "empty_classes": [str(c) for c in json.loads(f.attrs.get("empty_classes", "[]"))],
                "offsets": f["offsets"][()].astype(np.int64),
                "labels": f["labels"][()].astype(np.int64),
                "splits": f["splits"][()].astype(np.uint8),
                "heights": f["heights"][()].astype(np.int32),
                "widths": f["widths"][()].astype(np.int32),
                "classes": [_text(c) for c in f["classes"][()]],
                "data_offset": data_offset,
            }
        except (OSError, KeyError, ValueError) as exc:
            raise PackError(f"{path}: damaged pack ({_short(exc)}); repack it") from None
        if data_offset is None or images.chunks is not None or images.compression is not None:
            raise PackError(f"{path}: image bytes are not stored contiguously; repack it with tools/pack_dataset.py")
    n = len(meta["labels"])
    consistent = (
        len(meta["offsets"]) == n + 1
        and all(len(meta[k]) == n for k in ("splits", "heights", "widths"))
        and (n == 0 or (np.all(np.diff(meta["offsets"]) > 0) and meta["offsets"][0] == 0))
        and (n == 0 or (meta["labels"].min() >= 0 and meta["labels"].max() < len(meta["classes"])))
    )
    if not consistent:
        raise PackError(f"{path}: damaged pack (inconsistent index arrays); repack it")
    needed = data_offset + int(meta["offsets"][-1])
    if os.path.getsize(path) < needed:
        raise PackError(f"{path}: truncated pack ({os.path.getsize(path)} bytes, needs {needed}); repack it")
    return meta
