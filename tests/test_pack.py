"""The pack tool and the pack reader, checked against the source files themselves."""
from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dali_pipes import PackError, PackFailure, PackOptions, PackReader, pack_folder
from dali_pipes.pack_format import FORMAT_VERSION
from dali_pipes.splits import stratified_split
from tools.make_demo_dataset import make_demo_dataset
from tools.pack_dataset import main as pack_main
from trainer.cli import main as trainer_main

REPO = Path(__file__).resolve().parents[1]


def _gradient(width: int, height: int) -> np.ndarray:
    """An RGB image whose every pixel differs in a known way, to check orientation and colour."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), np.full_like(xx, 128)],
                    -1).astype(np.uint8)


def _decode(data: bytes | np.ndarray) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(bytes(data))).convert("RGB"))


def _pack(src: Path, out: Path, **options) -> PackReader:
    pack_folder(src, out, PackOptions(**options), workers=1, show_progress=False)
    return PackReader(out)


def _by_path(reader: PackReader) -> dict[str, int]:
    return {p: i for i, p in enumerate(reader.paths)}


@pytest.fixture()
def kinds_tree(tmp_path: Path) -> Path:
    """One class folder holding every input kind the packer must accept, and one of bad files."""
    good = tmp_path / "src" / "good"
    good.mkdir(parents=True)
    rgb = Image.fromarray(_gradient(40, 30))
    rgb.save(good / "baseline.jpg", quality=90)
    rgb.save(good / "progressive.jpg", quality=90, progressive=True)
    rgb.save(good / "plain.png")
    rgb.save(good / "plain.bmp")
    rgb.save(good / "plain.webp", lossless=True)
    rgb.save(good / "plain.tiff")
    rgb.convert("L").save(good / "gray.jpg")
    rgb.convert("P").save(good / "palette.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.full((30, 40), 255, np.uint8)))
    rgba.save(good / "rgba.png")
    rgb.convert("CMYK").save(good / "cmyk.jpg")
    Image.fromarray(_gradient(40, 30)[..., 0].astype(np.uint16) * 257).save(good / "gray16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    rgb.save(good / "exif_rotated.jpg", quality=95, exif=exif)
    big = Image.fromarray(_gradient(300, 120))
    big.save(good / "big.jpg", quality=95)
    (good / ".hidden.jpg").write_bytes((good / "baseline.jpg").read_bytes())
    (good / "notes.txt").write_text("not an image, ignored by extension")
    bad = tmp_path / "src" / "bad"
    bad.mkdir()
    rgb.save(bad / "ok.jpg")  # the class needs one good image
    (bad / "empty.jpg").write_bytes(b"")
    data = (good / "baseline.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (bad / "text.png").write_text("this is not a PNG")
    (bad / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(500))
    Image.fromarray(_gradient(7, 20)).save(bad / "tiny.png")
    (tmp_path / "src" / "empty_class").mkdir()
    (tmp_path / "src" / ".hidden_class").mkdir()
    Image.fromarray(_gradient(20, 20)).save(tmp_path / "src" / ".hidden_class" / "x.jpg")
    return tmp_path / "src"


def test_every_input_kind_is_stored_as_rgb_jpeg(kinds_tree: Path, tmp_path: Path) -> None:
    reader = _pack(kinds_tree, tmp_path / "p.h5", max_side=200, val_ratio=0.0, test_ratio=0.0)
    index = _by_path(reader)
    assert reader.classes == ["bad", "good"]  # empty and hidden class folders get no class
    expected = {f"good/{n}" for n in ("baseline.jpg", "progressive.jpg", "plain.png", "plain.bmp", "plain.webp",
                                      "plain.tiff", "gray.jpg", "palette.png", "rgba.png", "cmyk.jpg", "gray16.png",
                                      "exif_rotated.jpg", "big.jpg")}
    assert set(index) == expected | {"bad/ok.jpg"}
    for path, i in index.items():
        data = bytes(reader.image_bytes(i))
        image = Image.open(io.BytesIO(data))
        assert image.format == "JPEG" and image.mode == "RGB", path
        assert (image.height, image.width) == (reader.heights[i], reader.widths[i]), path
    reference = _gradient(40, 30).astype(int)
    for name in ("plain.png", "plain.bmp", "plain.webp", "plain.tiff", "rgba.png", "progressive.jpg"):
        assert np.abs(_decode(reader.image_bytes(index[f"good/{name}"])).astype(int) - reference).mean() < 3, name
    gray = _decode(reader.image_bytes(index["good/gray16.png"])).astype(int)
    assert np.abs(gray[..., 0] - reference[..., 0]).mean() < 3  # 16-bit scaled, not clipped to white


def test_exif_orientation_is_applied(kinds_tree: Path, tmp_path: Path) -> None:
    reader = _pack(kinds_tree, tmp_path / "p.h5", val_ratio=0.0, test_ratio=0.0)
    i = _by_path(reader)["good/exif_rotated.jpg"]
    assert (reader.heights[i], reader.widths[i]) == (40, 30)
    pixels = _decode(reader.image_bytes(i)).astype(int)
    # Orientation 6 shows the image turned 90 degrees clockwise: the source's left column is now the top row.
    expected = np.rot90(_gradient(40, 30), k=-1).astype(int)
    assert np.abs(pixels - expected).mean() < 4


def test_baseline_rgb_jpeg_is_stored_byte_for_byte(kinds_tree: Path, tmp_path: Path) -> None:
    reader = _pack(kinds_tree, tmp_path / "p.h5", val_ratio=0.0, test_ratio=0.0)
    index = _by_path(reader)
    for name in ("baseline.jpg", "big.jpg"):
        assert bytes(reader.image_bytes(index[f"good/{name}"])) == (kinds_tree / "good" / name).read_bytes()
    for name in ("progressive.jpg", "cmyk.jpg", "exif_rotated.jpg"):
        assert bytes(reader.image_bytes(index[f"good/{name}"])) != (kinds_tree / "good" / name).read_bytes()


def test_max_side_downsizes_keeping_aspect(kinds_tree: Path, tmp_path: Path) -> None:
    reader = _pack(kinds_tree, tmp_path / "p.h5", max_side=150, val_ratio=0.0, test_ratio=0.0)
    i = _by_path(reader)["good/big.jpg"]
    assert (reader.widths[i], reader.heights[i]) == (150, 60)
    assert bytes(reader.image_bytes(i)) != (kinds_tree / "good" / "big.jpg").read_bytes()


def test_bad_files_are_skipped_and_recorded(kinds_tree: Path, tmp_path: Path) -> None:
    reader = _pack(kinds_tree, tmp_path / "p.h5", val_ratio=0.0, test_ratio=0.0)
    reasons = {r["path"]: r["reason"] for r in reader.rejects()}
    assert set(reasons) == {"bad/empty.jpg", "bad/truncated.jpg", "bad/text.png", "bad/garbage.jpg", "bad/tiny.png"}
    assert reasons["bad/empty.jpg"] == "empty file"
    assert reasons["bad/text.png"] == "not an image"
    assert reasons["bad/truncated.jpg"].startswith("undecodable")
    assert reasons["bad/tiny.png"].startswith("too small")


def test_strict_fails_on_first_reject_and_writes_nothing(kinds_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.h5"
    result = CliRunner().invoke(pack_main, [str(kinds_tree), str(out), "--strict", "--workers", "1", "--quiet"])
    assert result.exit_code != 0
    assert "--strict" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.glob(".p.h5.*")) == []


def test_cli_reports_empty_classes_and_rejects(kinds_tree: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(pack_main, [str(kinds_tree), str(tmp_path / "p.h5"), "--workers", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "5 files rejected" in result.output
    assert "empty class folders (no class made): empty_class" in result.output


def test_pack_tool_holds_its_sigterm_handler_only_while_packing(kinds_tree: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import tools.pack_dataset as tool

    during = []
    real = tool.pack_folder

    def watched(*args, **kwargs):
        during.append(signal.getsignal(signal.SIGTERM))
        return real(*args, **kwargs)

    monkeypatch.setattr(tool, "pack_folder", watched)
    before = signal.getsignal(signal.SIGTERM)
    args = [str(kinds_tree), str(tmp_path / "p.h5"), "--workers", "1", "--quiet"]
    packed = CliRunner().invoke(pack_main, args)
    refused = CliRunner().invoke(pack_main, args)  # OUT exists now: fails inside pack_folder
    assert packed.exit_code == 0 and refused.exit_code == 1 and "exists" in refused.output
    assert len(during) == 2 and all(handler not in (before, None) and callable(handler) for handler in during)
    assert signal.getsignal(signal.SIGTERM) == before  # restored after success and after failure


@pytest.mark.parametrize("args, message", [
    (["missing_dir", "out.h5"], "no such directory"),
    (["empty_dir", "out.h5"], "no images found"),
    (["src", "exists.h5"], "exists; pass --force"),
    (["src", "out_dir"], "is a folder; give a file name"),
])
def test_cli_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "out_dir").mkdir()
    make_demo_dataset(tmp_path / "src", classes=2, per_class=2, min_size=16, max_size=20)
    (tmp_path / "exists.h5").write_bytes(b"old")
    result = CliRunner().invoke(pack_main, [str(tmp_path / a) for a in args] + ["--quiet"])
    assert result.exit_code == 1
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert (tmp_path / "exists.h5").read_bytes() == b"old"


def test_only_bad_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.jpg").write_bytes(b"")
    with pytest.raises(PackFailure, match=r"no file could be packed \(1 file tried"):
        pack_folder(tmp_path / "src", tmp_path / "p.h5", PackOptions(), workers=1, show_progress=False)
    assert not (tmp_path / "p.h5").exists()


def test_stratified_split_follows_class_proportions() -> None:
    labels = np.repeat(np.arange(7), [20, 20, 20, 3, 2, 1, 34])
    splits = stratified_split(labels, 0.1, 0.2, seed=3)
    assert (splits == 1).sum() == round(len(labels) * 0.1)
    assert (splits == 2).sum() == round(len(labels) * 0.2)
    for c in range(7):
        members = splits[labels == c]
        n = len(members)
        assert (members == 0).sum() >= 1  # every class keeps a training image
        assert abs((members == 1).sum() - n * 0.1) < 1 + 1e-9 or n < 3
        assert abs((members == 2).sum() - n * 0.2) < 1 + 1e-9 or n < 3
    assert np.array_equal(splits, stratified_split(labels, 0.1, 0.2, seed=3))
    assert not np.array_equal(splits, stratified_split(labels, 0.1, 0.2, seed=4))


def test_same_seed_same_pack(demo_tree: Path, tmp_path: Path) -> None:
    a = _pack(demo_tree, tmp_path / "a.h5", seed=5)
    b = _pack(demo_tree, tmp_path / "b.h5", seed=5)
    c = _pack(demo_tree, tmp_path / "c.h5", seed=6)
    assert a.paths == b.paths and np.array_equal(a.splits, b.splits) and np.array_equal(a.offsets, b.offsets)
    assert all(bytes(a.image_bytes(i)) == bytes(b.image_bytes(i)) for i in range(len(a)))
    assert a.paths != c.paths
    # Shuffled: the stored order is not the sorted folder order.
    assert a.paths != sorted(a.paths)


def test_labels_follow_sorted_class_folders(demo_tree: Path, demo_pack: Path) -> None:
    reader = PackReader(demo_pack)
    assert reader.classes == sorted(p.name for p in demo_tree.iterdir())
    for i, path in enumerate(reader.paths):
        assert reader.classes[reader.labels[i]] == path.split("/")[0]
        assert bytes(reader.image_bytes(i)) == (demo_tree / path).read_bytes() or path.endswith(".png")


def test_given_splits_are_kept(tmp_path: Path) -> None:
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        make_demo_dataset(tmp_path / "src" / split, classes=2, per_class=n, seed=len(split), min_size=16, max_size=24)
    reader = _pack(tmp_path / "src", tmp_path / "p.h5")
    assert reader.split_counts() == {"train": 8, "val": 4, "test": 6}
    for i, path in enumerate(reader.paths):
        assert reader.splits[i] == ("train", "val", "test").index(path.split("/")[0])


def _read_in_worker(args: tuple[PackReader, int]) -> bytes:
    reader, index = args
    return bytes(reader.image_bytes(index))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_reader_in_worker_processes(demo_pack: Path, method: str) -> None:
    reader = PackReader(demo_pack)
    reader.image_bytes(0)  # the parent has a map open before the fork
    with mp.get_context(method).Pool(2) as pool:
        got = pool.map(_read_in_worker, [(reader, i) for i in range(len(reader))])
    assert got == [bytes(reader.image_bytes(i)) for i in range(len(reader))]


def test_image_bytes_is_a_zero_copy_view(demo_pack: Path) -> None:
    reader = PackReader(demo_pack)
    view = reader.image_bytes(3)
    assert isinstance(view.base, (np.memmap, np.ndarray)) and not view.flags.owndata


def test_reader_rejects_bad_files(demo_pack: Path, tmp_path: Path) -> None:
    with pytest.raises(PackError, match="no such file"):
        PackReader(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(PackError, match="not a readable HDF5 pack"):
        PackReader(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(PackError, match="not a dali-trainer pack"):
        PackReader(tmp_path / "other.h5")
    data = demo_pack.read_bytes()
    (tmp_path / "truncated.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(PackError, match=str(tmp_path / "truncated.h5")):
        PackReader(tmp_path / "truncated.h5")
    newer = tmp_path / "newer.h5"
    newer.write_bytes(data)
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(PackError, match="format version"):
        PackReader(newer)


def test_info_json(demo_pack: Path, kinds_tree: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(trainer_main, ["info", str(demo_pack), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    reader = PackReader(demo_pack)
    assert info["num_images"] == len(reader) == sum(info["splits"].values())
    assert info["num_classes"] == len(info["classes"]) == 6
    assert info["format_version"] == FORMAT_VERSION and info["rejects"] == []
    _pack(kinds_tree, tmp_path / "k.h5")
    info = json.loads(CliRunner().invoke(trainer_main, ["info", str(tmp_path / "k.h5"), "--json"]).output)
    assert {r["path"] for r in info["rejects"]} >= {"bad/empty.jpg"} and all("reason" in r for r in info["rejects"])


def test_info_on_a_non_pack_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "x.h5").write_text("nope")
    result = CliRunner().invoke(trainer_main, ["info", str(tmp_path / "x.h5")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1


def test_failure_while_writing_leaves_nothing(demo_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "p.h5"
    out.write_bytes(b"previous pack")
    import dali_pipes.pack_writer as tool

    def broken_write(*args, **kwargs):
        Path(args[0]).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tool, "write_pack", broken_write)
    with pytest.raises(OSError):
        pack_folder(demo_tree, out, PackOptions(), workers=1, force=True, show_progress=False)
    assert out.read_bytes() == b"previous pack"
    assert [p.name for p in tmp_path.iterdir()] == ["p.h5"]


@pytest.mark.slow
def test_kill_9_while_packing_leaves_old_state_or_a_valid_pack(tmp_path: Path) -> None:
    make_demo_dataset(tmp_path / "src", classes=4, per_class=60, min_size=100, max_size=300)
    out = tmp_path / "p.h5"
    cmd = [sys.executable, str(REPO / "tools" / "pack_dataset.py"), str(tmp_path / "src"), str(out), "--workers", "2",
           "--quiet", "--force"]
    outcomes = set()
    for delay in (0.3, 0.8, 1.5, 3.0):
        proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if out.exists():
            assert len(PackReader(out)) == 240  # complete and valid, never partial
            outcomes.add("complete")
        else:
            outcomes.add("absent")
    # A retry cleans up the temporaries that kill -9 left behind, and succeeds.
    subprocess.run(cmd, cwd=REPO, check=True)
    assert len(PackReader(out)) == 240
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.h5", "src"]


def test_a_file_changed_after_verification_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_demo_dataset(tmp_path / "src", classes=2, per_class=3, min_size=20, max_size=30, png_every=0)
    import dali_pipes.pack_writer as tool

    original = tool.encode_job

    def verify_then_change(job):
        index, result = original(job)
        if job[1].endswith("00_disc/0001.jpg"):
            Path(job[1]).write_bytes(Path(job[1]).read_bytes()[:-1] + b"\x00")  # swapped under our feet
        return index, result

    monkeypatch.setattr(tool, "encode_job", verify_then_change)
    reader = _pack(tmp_path / "src", tmp_path / "p.h5", val_ratio=0.0, test_ratio=0.0)
    assert {r["path"]: r["reason"] for r in reader.rejects()} == {"00_disc/0001.jpg": "changed while packing"}
    assert len(reader) == 5


def test_stale_temporaries_are_those_of_dead_processes_only(tmp_path: Path) -> None:
    from dali_pipes.atomic import temporary_name
    from dali_pipes.pack_writer import remove_stale_temporaries

    out = tmp_path / "p.h5"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    pid = int(dead.stdout)
    names = [f".p.h5.{pid}.spool", f".p.h5.{pid}.0a1b2c3d.tmp",  # a killed packer's spool and pack temporary
             f".p.h5.{os.getpid()}.spool", temporary_name(out).name,  # this process's: in use
             f".q.h5.{pid}.spool", f".p.h5.{pid}.notes", "p.h5"]  # another output's, not ours, the pack itself
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporaries(out)
    assert sorted(p.name for p in removed) == sorted(names[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


def test_max_side_rejects_what_it_would_shrink_below_the_minimum(tmp_path: Path) -> None:
    (tmp_path / "src" / "a").mkdir(parents=True)
    Image.fromarray(_gradient(2000, 20)).save(tmp_path / "src" / "a" / "strip.png")  # 48 x 0.48 px at --max-side 48
    Image.fromarray(_gradient(400, 80)).save(tmp_path / "src" / "a" / "wide.png")  # 48 x 9.6 px: kept
    reader = _pack(tmp_path / "src", tmp_path / "p.h5", max_side=48, val_ratio=0.0, test_ratio=0.0)
    assert reader.paths == ["a/wide.png"] and (reader.widths[0], reader.heights[0]) == (48, 10)
    assert reader.rejects() == [{"path": "a/strip.png",
                                 "reason": "too small (48x1 after --max-side 48, need 8 px a side)"}]


def test_pack_json_and_info_json_name_the_split_counts_alike(kinds_tree: Path, tmp_path: Path) -> None:
    packed = CliRunner().invoke(pack_main, [str(kinds_tree), str(tmp_path / "p.h5"), "--workers", "1", "--json"])
    assert packed.exit_code == 0, packed.output
    report = json.loads(packed.output)
    info = json.loads(CliRunner().invoke(trainer_main, ["info", str(tmp_path / "p.h5"), "--json"]).output)
    counts = PackReader(tmp_path / "p.h5").split_counts()
    assert report["splits"] == report["split_counts"] == info["splits"] == info["split_counts"] == counts
    assert report["empty_classes"] == info["empty_classes"] == ["empty_class"]


def test_info_shows_the_empty_class_folders_the_packer_reported(kinds_tree: Path, tmp_path: Path) -> None:
    _pack(kinds_tree, tmp_path / "p.h5")
    result = CliRunner().invoke(trainer_main, ["info", str(tmp_path / "p.h5")])
    assert result.exit_code == 0 and "empty class folders (no class made): empty_class" in result.output
    with h5py.File(tmp_path / "p.h5", "r+") as f:  # a pack written before the attribute existed
        del f.attrs["empty_classes"]
    assert PackReader(tmp_path / "p.h5").empty_classes == []


def test_counts_are_pluralized(tmp_path: Path) -> None:
    make_demo_dataset(tmp_path / "src", classes=1, per_class=1, min_size=16, max_size=20)
    packed = CliRunner().invoke(pack_main, [str(tmp_path / "src"), str(tmp_path / "p.h5"), "--workers", "1", "--quiet",
                                            "--val-ratio", "0", "--test-ratio", "0"])
    assert packed.exit_code == 0 and packed.output.startswith("packed 1 image of 1 class into"), packed.output
    info = CliRunner().invoke(trainer_main, ["info", str(tmp_path / "p.h5")]).output
    assert "  1 image (train 1, val 0, test 0), 1 class," in info


def test_plural() -> None:
    from dali_pipes import plural

    assert [plural(n, "image") for n in (0, 1, 2)] == ["0 images", "1 image", "2 images"]
    assert plural(1, "class") == "1 class" and plural(3, "class") == "3 classes"
    assert plural(2, "identity") == "2 identities" and plural(2, "day") == "2 days"
    assert plural(2, "batch") == "2 batches" and plural(2, "epoch") == "2 epochs"
    assert plural(2, "training image") == "2 training images" and plural(2, "process") == "2 processes"


def test_a_presplit_folder_whose_test_holds_untrained_classes_is_named(tmp_path: Path) -> None:
    make_demo_dataset(tmp_path / "src" / "train", classes=2, per_class=3, seed=1, min_size=16, max_size=24)
    make_demo_dataset(tmp_path / "src" / "val", classes=2, per_class=1, seed=2, min_size=16, max_size=24)
    make_demo_dataset(tmp_path / "src" / "test", classes=3, per_class=1, seed=3, min_size=16, max_size=24)
    result = CliRunner().invoke(pack_main, [str(tmp_path / "src"), str(tmp_path / "p.h5"), "--workers", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    third = sorted(p.name for p in (tmp_path / "src" / "test").iterdir())[2]
    assert f"warning: 1 class without a training image ({third})" in result.output
    assert "trainer run refuses" in result.output
    report = json.loads(CliRunner().invoke(pack_main, [str(tmp_path / "src"), str(tmp_path / "p.h5"), "--workers", "1",
                                                       "--force", "--json"]).output)
    assert report["split_by"] == "image" and report["untrained_classes"] == [third]
    # The control: identity-disjoint val and test make a pack split by class, said as such, without a warning.
    (tmp_path / "src" / "val").rename(tmp_path / "val_aside")
    import shutil

    for name in sorted(p.name for p in (tmp_path / "src" / "test").iterdir())[:2]:
        shutil.rmtree(tmp_path / "src" / "test" / name)
    result = CliRunner().invoke(pack_main, [str(tmp_path / "src"), str(tmp_path / "p.h5"), "--workers", "1", "--quiet",
                                            "--force"])
    assert "split by class" in result.output and "warning" not in result.output, result.output


def test_missing_output_folders_are_made(demo_tree: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(pack_main, [str(demo_tree), str(tmp_path / "new" / "dir" / "p.h5"), "--workers", "1",
                                            "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(PackReader(tmp_path / "new" / "dir" / "p.h5")) == 72


def test_pack_workers_help_is_the_trainers(tmp_path: Path) -> None:
    from trainer.config import WORKERS_HELP

    help_text = " ".join(CliRunner().invoke(pack_main, ["--help"]).output.split())
    assert " ".join(WORKERS_HELP.split()) in help_text and "--split-by" in help_text
