"""The run folder: its default name, checks before a run writes there, best.pt, and cleaning up after a failed start."""
from __future__ import annotations

import datetime
import os
from pathlib import Path

from trainer.errors import TrainerError


def default_out_dir(arch: str) -> Path:
    """runs/<arch>-<timestamp>."""
    return Path("runs") / f"{arch}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def check_out_dir(out: Path, resume: bool) -> None:
    """Refuse a run folder that cannot be used as asked: a file, a run without --resume, --resume without a run."""
    if out.exists() and not out.is_dir():
        raise TrainerError(f"--out {out} is a file; give a folder")
    if resume:
        if not (out / "last.pt").is_file():
            raise TrainerError(f"--resume {out}: nothing to resume (no last.pt there)")
    elif (out / "last.pt").exists():
        raise TrainerError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")


def prepare_out_dir(out: Path, resume: bool) -> Path:
    """Check (`check_out_dir`) and make the run folder; a folder holding a run is only reused with --resume."""
    check_out_dir(out, resume)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainerError(f"cannot create run folder {out} ({exc.strerror})") from None
    if not os.access(out, os.W_OK):
        raise TrainerError(f"run folder {out} is not writable")
    # Temporaries of a write that was killed (kill -9, power loss) belong to no one now.
    for stale in out.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    (out / ".best.pt.link").unlink(missing_ok=True)
    return out


def discard_untrained(out: Path) -> None:
    """Remove a run folder this run made while it holds no checkpoint: the files a run writes, then the empty folder."""
    if (out / "last.pt").exists():
        return
    for name in ("config.json", "metrics.jsonl"):
        (out / name).unlink(missing_ok=True)
    for stale in out.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    try:
        out.rmdir()
    except OSError:
        pass  # something else is in it: leave it


def link_best(out: Path) -> None:
    """best.pt := last.pt, atomically, without writing the bytes twice (a hard link where possible)."""
    tmp = out / ".best.pt.link"
    tmp.unlink(missing_ok=True)
    try:
        os.link(out / "last.pt", tmp)
    except OSError:
        import shutil

        shutil.copyfile(out / "last.pt", tmp)
    os.replace(tmp, out / "best.pt")
