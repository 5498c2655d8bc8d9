"""Writing a file atomically (a temporary beside it, fsync, rename, fsync the folder), and checking outputs first.

One helper for every file the project writes whole (packs, checkpoints, metrics,
figures): a reader sees the old file or the complete new one, never a part, and a
failure (a full disk, Ctrl-C) leaves the old file as it was and no temporary behind.
Temporaries are named `.{name}.{pid}.{token}.tmp`, so a later run can tell those of a
process that was killed (`stale_temporary`); an error never names them, only the file asked for.

`check_output` and `check_output_folder` hold the one rule of every command that writes a
result (the packer, `trainer export`, `embed`, `eval --out`, `verify --out`), applied before
any work: missing folders are made, and an existing file is replaced only with `--force`.
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

TEMP_SUFFIX = ".tmp"


def temporary_name(path: Path, kind: str = TEMP_SUFFIX[1:]) -> Path:
    """A fresh hidden name beside `path` that carries this process's id."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{kind}")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path to write `path`'s new contents to; renamed over `path` when the block succeeds.

    The writer inside the block must flush its own data (h5py and `atomic_write_bytes`
    do); here the temporary is fsynced before the rename and the folder after it.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        if exc.filename in (str(tmp), tmp):  # the user asked for `path`; the temporary means nothing to them
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    except BaseException:
        _discard(tmp)
        raise
    fsync_dir(path.parent)


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass  # its folder is gone or unreadable: there is no temporary to remove


def atomic_write_bytes(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """Write `path` through `write(file)` atomically (see the module docstring)."""
    with atomic_path(path) as tmp:
        # Not mkstemp: its 0600 would survive the rename; 0666 here is narrowed by the umask as usual.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)


class OutputError(Exception):
    """An output that cannot be written as asked; the message is one line naming it and the fix."""


def check_output_folder(folder: str | os.PathLike[str]) -> Path:
    """Make `folder` (and its parents) for a command's output files; `OutputError` when it is a file or not writable."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is a file; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create folder {folder} ({exc.strerror or exc})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: folder is not writable")
    return folder


def check_output(path: str | os.PathLike[str], force: bool) -> Path:
    """Check an output file before any work, in one `OutputError` line: the one rule of every command that writes.

    An existing file is replaced only with `force` (--force); a folder in its place is
    refused; its folder is made when missing (`check_output_folder`) and must be writable.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name")
    if path.exists() and not force:
        raise OutputError(f"{path} exists; pass --force to replace it")
    check_output_folder(path.parent)
    return path


def stale_temporary(path: Path, target: Path) -> bool:
    """Whether `path` is a temporary of `target` (this module's, or a `.{name}.{pid}.spool`) left by a dead process."""
    prefix = f".{target.name}."
    if path.parent != target.parent or not path.name.startswith(prefix):
        return False
    parts = path.name[len(prefix) :].split(".")
    ours = len(parts) == 3 and parts[2] == TEMP_SUFFIX[1:]
    spool = len(parts) == 2 and parts[1] in ("spool", "tmp")
    return (ours or spool) and parts[0].isdigit() and not _alive(int(parts[0]))


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


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename in folder `path` durable (its directory entry on disk); best effort."""
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
