"""Sharing a node or a filesystem: workers per local process, packs read without HDF5 file locks."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from dali_pipes import PackReader
from dali_pipes.cores import default_workers


@pytest.mark.parametrize("local_world, expected", [(None, 12), ("1", 12), ("4", 3), ("5", 2), ("64", 1), ("junk", 12)])
def test_default_workers_split_usable_cores_among_local_processes(monkeypatch: pytest.MonkeyPatch,
                                                                  local_world: str | None, expected: int) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(12)), raising=False)
    if local_world is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    assert default_workers() == expected


def test_pack_opens_while_another_process_holds_the_hdf5_lock(demo_pack: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A writer elsewhere holds HDF5's exclusive lock, as a lockless NFS/Lustre mount behaves for every open.
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    pack = tmp_path / "pack.h5"
    shutil.copy(demo_pack, pack)
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time; f = h5py.File(sys.argv[1], 'r+'); "
                               "print('locked', flush=True); time.sleep(60)", str(pack)],
                              stdout=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin"})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OSError):  # the control: a locking reader is refused
            h5py.File(pack, "r")
        reader = PackReader(pack)
        assert (len(reader) == len(PackReader(demo_pack))
                and reader.image_bytes(0).tobytes() == PackReader(demo_pack).image_bytes(0).tobytes())
    finally:
        holder.kill()
        holder.wait()
