"""Faces end to end: `trainer embed`, `trainer verify`, training validated by verification on unseen identities."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dali_pipes import PackReader, PipelineSpec
from tools.make_demo_dataset import make_demo_dataset
from tools.pack_dataset import main as pack_main
from trainer.checkpoint import save_checkpoint
from trainer.cli import main as trainer_main
from trainer.models import HeadConfig, build_model

REPO = Path(__file__).resolve().parents[1]
LOADER = ["--backend", "torch", "--workers", "0"]


def _pack(root: Path, *, classes: int, per_class: int, split_by: str = "class", ratio: str = "0.2") -> Path:
    make_demo_dataset(root / "src", classes=classes, per_class=per_class, seed=0, min_size=32, max_size=40, png_every=0)
    args = [str(root / "src"), str(root / "p.h5"), "--split-by", split_by, "--val-ratio", ratio, "--test-ratio", ratio,
            "--workers", "1", "--quiet"]
    result = CliRunner().invoke(pack_main, args)
    assert result.exit_code == 0, result.output
    return root / "p.h5"


def _checkpoint(path: Path, pack: Path, head: str, *, embedding_dim: int = 16, margin: float | None = None,
                scale: float = 30.0, seed: int = 0) -> Path:
    """An untrained checkpoint as `trainer run --seed SEED` would start it (what load_model reads)."""
    torch.manual_seed(seed)
    classes = PackReader(pack).classes
    config = HeadConfig(type=head, embedding_dim=embedding_dim, margin=margin, scale=scale)
    model = build_model("resnet18", len(classes), head=config)
    save_checkpoint(path, {"model": model.state_dict(), "classes": classes, "arch": "resnet18", "epoch": 0,
                           "config": {}, "head": config.to_dict(), "spec": PipelineSpec(image_size=32).to_dict()})
    return path


@pytest.fixture(scope="module")
def class_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 identities x 6 images; 2 identities (12 images) each in val and test."""
    return _pack(tmp_path_factory.mktemp("faces"), classes=12, per_class=6)


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(trainer_main, list(args))
    return result.exit_code, result.output


def test_verify_json_and_roc(class_pack: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "a.pt", class_pack, "arcface")
    verify = ["verify", "--checkpoint", str(ckpt), "--pack", str(class_pack), "--split", "test", *LOADER]
    code, output = _cli(*verify, "--json", "--out", str(tmp_path / "v"))
    assert code == 0, output
    figures = json.loads(output.splitlines()[-1])
    assert list(figures) == ["num_pairs", "pairs", "num_genuine", "num_impostor", "auc", "eer", "accuracy", "threshold",
                             "tar_at_far", "rank1", "rank5"]
    # 2 test identities x 6 images: 2 x 15 genuine and 6 x 6 impostor pairs, every one scored once.
    counts = (figures["pairs"], figures["num_genuine"], figures["num_impostor"], figures["num_pairs"])
    assert counts == ("all", 30, 36, 66)
    assert 0.0 <= figures["auc"] <= 1.0 and 0.0 <= figures["eer"] <= 1.0
    assert set(figures["tar_at_far"]) == {"0.1"}  # 36 impostor pairs: FAR 0.01 needs 100
    assert figures["rank5"] == 1.0  # two identities in the gallery
    assert (tmp_path / "v" / "roc.png").stat().st_size > 0
    code, output = _cli(*verify, "--num-pairs", "10", "--json")
    sampled = json.loads(output.splitlines()[-1])
    assert code == 0 and (sampled["pairs"], sampled["num_genuine"], sampled["num_impostor"]) == ("sampled", 10, 10)
    code, output = _cli(*verify, "--num-pairs", "40", "--json")  # more than either kind holds: all of them
    assert code == 0 and json.loads(output.splitlines()[-1]) == figures
    code, output = _cli(*verify)
    assert code == 0 and "all 66 pairs (30 genuine, 36 impostor)" in output and "10-fold over all pairs" in output
    assert "rank-1" in output
    code, output = _cli(*verify, "--num-pairs", "10", "--pairs", str(tmp_path / "p.csv"))
    assert code != 0 and "not both" in output and len(output.strip().splitlines()) == 1


def test_verify_with_a_pairs_file(class_pack: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "a.pt", class_pack, "cosface")
    reader = PackReader(class_pack)
    test = reader.split_indices("test")
    paths, labels = [reader.paths[i] for i in test], reader.labels[test]
    rows = [(paths[i], paths[j], int(labels[i] == labels[j]))
            for i in range(len(test)) for j in range(i + 1, len(test))]
    (tmp_path / "pairs.csv").write_text("path_a,path_b,same\n" + "".join(f"{a},{b},{s}\n" for a, b, s in rows))
    verify = ["verify", "--checkpoint", str(ckpt), "--pack", str(class_pack), "--json", *LOADER]
    code, output = _cli(*verify, "--pairs", str(tmp_path / "pairs.csv"))
    assert code == 0, output
    from_file = json.loads(output.splitlines()[-1])
    assert from_file["pairs"] == "file" and from_file["num_pairs"] == len(rows) == 66
    # The same 66 pairs, scored exactly from the file and binned as all pairs of the split: one ROC.
    code, output = _cli(*verify)
    every = json.loads(output.splitlines()[-1])
    assert every["pairs"] == "all" and every["num_genuine"] == from_file["num_genuine"]
    for key in ("auc", "eer"):
        assert every[key] == pytest.approx(from_file[key], abs=1e-4), key
    assert every["tar_at_far"] == pytest.approx(from_file["tar_at_far"], abs=1e-4)
    (tmp_path / "bad.csv").write_text("nowhere/x.jpg,nowhere/y.jpg,1\n")
    code, output = _cli(*verify, "--pairs", str(tmp_path / "bad.csv"))
    assert code != 0 and "not in the split" in output and len(output.strip().splitlines()) == 1


def test_embed_pack_and_files_agree(class_pack: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "a.pt", class_pack, "arcface")
    code, output = _cli("embed", "--checkpoint", str(ckpt), "--pack", str(class_pack), "--split", "val",
                        "--out", str(tmp_path / "val.h5"), *LOADER)
    assert code == 0, output
    reader = PackReader(class_pack)
    val = reader.split_indices("val")
    with h5py.File(tmp_path / "val.h5") as f:
        embeddings, labels = f["embeddings"][()], f["labels"][()]
        paths = [p.decode() for p in f["paths"][()]]
    assert embeddings.shape == (12, 16) and np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert labels.tolist() == reader.labels[val].tolist() and paths == [reader.paths[i] for i in val]
    # The same images given as files (decoded by another path than the pack loader) embed alike.
    files = [str(class_pack.parent / "src" / p) for p in paths[:4]]
    code, output = _cli("embed", "--checkpoint", str(ckpt), *files, "--out", str(tmp_path / "f.npy"))
    assert code == 0, output
    from_files = np.load(tmp_path / "f.npy")
    meta = json.loads((tmp_path / "f.json").read_text())
    assert meta["paths"] == files
    assert np.all(np.sum(from_files * embeddings[:4], axis=1) > 0.99)


def test_embed_linear_head_gives_penultimate_features(class_pack: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "l.pt", class_pack, "linear")
    code, output = _cli("embed", "--checkpoint", str(ckpt), "--pack", str(class_pack), "--split", "test",
                        "--out", str(tmp_path / "t.npy"), *LOADER)
    assert code == 0, output
    assert np.load(tmp_path / "t.npy").shape == (12, 512)
    code, output = _cli("embed", "--checkpoint", str(ckpt), "--out", str(tmp_path / "t.npy"))
    assert code != 0 and "either --pack" in output


def test_closed_set_commands_refuse_unseen_identities(class_pack: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "a.pt", class_pack, "arcface")
    evaluate = ["eval", "--checkpoint", str(ckpt), "--pack", str(class_pack), *LOADER]
    code, output = _cli(*evaluate, "--split", "test")
    assert code != 0 and "split by class" in output and "trainer verify" in output
    assert len(output.strip().splitlines()) == 1
    code, output = _cli(*evaluate, "--split", "train", "--json")
    assert code == 0, output  # the identities it was trained on are fine
    run = ["run", "--pack", str(class_pack), "--arch", "resnet18", "--weights", "none", "--image-size", "32",
           "--head", "arcface", "--epochs", "1", "--batch-size", "8", *LOADER, "--out", str(tmp_path / "r")]
    code, output = _cli(*run)
    assert code != 0 and "--monitor val_auc" in output and len(output.strip().splitlines()) == 1
    image_pack = _pack(tmp_path / "img", classes=3, per_class=5, split_by="image")
    run[2] = str(image_pack)
    code, output = _cli(*run, "--monitor", "val_auc")
    assert code != 0 and "split by class" in output and len(output.strip().splitlines()) == 1


def _trainer(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


FACE_HEAD = {"embedding_dim": 64, "margin": 0.3, "scale": 16.0}
FACE_RUN = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--head", "arcface",
            *(f"--{key.replace('_', '-')}={value}" for key, value in FACE_HEAD.items()),
            "--monitor", "val_auc", "--batch-size", "32", *LOADER, "--log-every", "4"]
# About half the smallest gain in test AUC over the untrained network measured (the spread is written where it is
# asserted, in test_arcface_learns_to_verify_unseen_identities).
GAIN_THRESHOLD = 0.05


@pytest.fixture(scope="module")
def face_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small face run: 12 identities x 60 images, 6 to train on and 3 unseen in each of val and test; 8 epochs."""
    root = tmp_path_factory.mktemp("face_run")
    pack = _pack(root, classes=12, per_class=60, ratio="0.25")
    out = root / "run"
    code, output = _cli("run", "--pack", str(pack), *FACE_RUN, "--epochs", "8", "--lr", "0.003", "--patience", "0",
                        "--seed", "0", "--out", str(out))
    assert code == 0, output
    return pack, out


@pytest.mark.slow
def test_arcface_learns_to_verify_unseen_identities(face_run: tuple[Path, Path], tmp_path: Path) -> None:
    pack, out = face_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all({"val_auc", "val_accuracy"} <= set(r) for r in records)
    summary = json.loads((out / "summary.json").read_text())
    best = max(range(len(records)), key=lambda i: records[i]["val_auc"])
    assert summary["best_epoch"] == records[best]["epoch"] and summary["best_val_auc"] == records[best]["val_auc"]
    # 3 unseen test identities x 60 images: all 16,110 pairs, so no pair sampling adds noise.
    assert (summary["test_pairs"], summary["test_num_pairs"]) == ("all", 16110)
    code, output = _cli("verify", "--checkpoint", str(out / "best.pt"), "--pack", str(pack), "--json", *LOADER)
    assert code == 0, output
    assert json.loads(output.splitlines()[-1])["auc"] == pytest.approx(summary["test_auc"], abs=1e-6)
    # The claim: training makes verification of identities it never saw better than the same network before
    # training (the very weights `trainer run --seed 0` starts from), which scores on colour alone. Measured
    # with seeds 0-2 at 1 and 2 threads: untrained test AUC 0.572 to 0.581, trained 0.680 to 0.772, gain 0.108
    # (seed 1, 1 thread) to 0.198 (seed 0, 2 threads); one seed's two thread counts differ by up to 0.03. With 40
    # images per identity the gain went down to 0.069, and the two thread counts of seed 0 differed by 0.057.
    untrained = _checkpoint(tmp_path / "untrained.pt", pack, "arcface", seed=0, **FACE_HEAD)
    code, output = _cli("verify", "--checkpoint", str(untrained), "--pack", str(pack), "--json", *LOADER)
    assert code == 0, output
    before = json.loads(output.splitlines()[-1])["auc"]
    assert summary["test_auc"] - before > GAIN_THRESHOLD, (summary["test_auc"], before)


@pytest.mark.slow
def test_two_process_verification_gathers_each_sample_once(tmp_path: Path) -> None:
    pack = _pack(tmp_path, classes=10, per_class=7, ratio="0.3")  # 3 identities x 7 = 21 test images: shards 11, 10
    reader = PackReader(pack)
    assert reader.split_counts()["test"] == 21
    out = tmp_path / "run"
    result = _trainer("run", "--pack", str(pack), *FACE_RUN, "--epochs", "1", "--batch-size", "4", "--out", str(out),
                      "--nproc", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    code, output = _cli("verify", "--checkpoint", str(out / "best.pt"), "--pack", str(pack), "--json", *LOADER)
    assert code == 0, output
    figures = json.loads(output.splitlines()[-1])
    # A lost or doubled sample changes the pair counts; a reordered one the folds (accuracy) and the gallery (rank1).
    for key in ("num_pairs", "num_genuine", "auc", "eer", "accuracy", "rank1"):
        assert figures[key] == pytest.approx(summary[f"test_{key}"], abs=1e-6), key
