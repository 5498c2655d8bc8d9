"""Identity-disjoint packs: whole classes per split, seeded; `trainer info` tells the kind."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dali_pipes import PackReader, class_split, split_kind
from tools.make_demo_dataset import make_demo_dataset
from tools.pack_dataset import main as pack_main
from trainer.cli import main as trainer_main


def _labels() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.permutation(np.repeat(np.arange(20), rng.integers(1, 9, 20)))


def test_class_split_is_disjoint_and_follows_class_ratios() -> None:
    labels = _labels()
    splits = class_split(labels, 0.2, 0.1, seed=3)
    per_split = [set(labels[splits == s]) for s in range(3)]
    assert [len(c) for c in per_split] == [14, 4, 2]  # 20 classes: round(4) val, round(2) test, the rest train
    assert not (per_split[0] & per_split[1]) and not (per_split[0] & per_split[2]) and not (per_split[1] & per_split[2])
    for c in range(20):  # every class lies whole in one split
        assert len(set(splits[labels == c])) == 1


def test_class_split_is_seeded() -> None:
    labels = _labels()
    assert np.array_equal(class_split(labels, 0.2, 0.2, seed=1), class_split(labels, 0.2, 0.2, seed=1))
    assert not np.array_equal(class_split(labels, 0.2, 0.2, seed=1), class_split(labels, 0.2, 0.2, seed=2))


def test_class_split_minimums() -> None:
    labels = np.repeat(np.arange(10), 3)
    splits = class_split(labels, 0.05, 0.0, seed=0)  # round(0.5) = 0 classes, raised to the minimum of 2
    assert len(set(labels[splits == 1])) == 2 and not (splits == 2).any()
    with pytest.raises(ValueError, match="at least 2 classes"):
        class_split(np.repeat(np.arange(5), 2), 0.2, 0.2, seed=0)  # 2 + 2 held out leaves 1 for train


def test_split_kind() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    assert split_kind(labels, np.array([0, 0, 0, 0, 1, 2])) == "class"
    assert split_kind(labels, np.array([0, 1, 0, 0, 0, 2])) == "image"
    assert split_kind(labels, np.zeros(6)) == "image"


def _info(pack: Path) -> dict:
    result = CliRunner().invoke(trainer_main, ["info", str(pack), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_pack_tool_split_by_class(tmp_path: Path) -> None:
    make_demo_dataset(tmp_path / "src", classes=8, per_class=4, seed=0, min_size=24, max_size=32, png_every=0)
    args = [str(tmp_path / "src"), str(tmp_path / "c.h5"), "--split-by", "class", "--val-ratio", "0.25",
            "--test-ratio", "0.25", "--workers", "1", "--quiet"]
    result = CliRunner().invoke(pack_main, args)
    assert result.exit_code == 0, result.output
    reader = PackReader(tmp_path / "c.h5")
    classes = [set(reader.labels[reader.split_indices(s)]) for s in ("train", "val", "test")]
    assert [len(c) for c in classes] == [4, 2, 2] and not (classes[0] & (classes[1] | classes[2]))
    assert _info(tmp_path / "c.h5")["split_by"] == "class"
    assert reader.options["split_by"] == "class"
    result = CliRunner().invoke(pack_main,
                                args[:2] + ["--test-ratio", "0.3", "--workers", "1", "--quiet"] + ["--force"])
    assert result.exit_code == 0, result.output
    assert _info(tmp_path / "c.h5")["split_by"] == "image"
    result = CliRunner().invoke(pack_main, args[:3] + ["class", "--val-ratio", "0.45", "--test-ratio", "0.45",
                                                       "--force", "--quiet"])
    assert result.exit_code != 0 and "at least 2 classes" in result.output and "Traceback" not in result.output


def test_presplit_folders_with_other_classes_count_as_class_split(tmp_path: Path) -> None:
    make_demo_dataset(tmp_path / "all", classes=6, per_class=3, seed=0, min_size=24, max_size=32, png_every=0)
    for split, names in (("train", ["00_disc", "01_square"]), ("val", ["02_triangle", "03_cross"]),
                         ("test", ["04_ring", "05_star"])):
        (tmp_path / "src" / split).mkdir(parents=True)
        for name in names:
            shutil.move(tmp_path / "all" / name, tmp_path / "src" / split / name)
    result = CliRunner().invoke(pack_main, [str(tmp_path / "src"), str(tmp_path / "p.h5"), "--workers", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert _info(tmp_path / "p.h5")["split_by"] == "class"
