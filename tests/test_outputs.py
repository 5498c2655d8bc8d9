"""What the commands write and say: one output rule, epochs from 1, synthetic data marked, closed sets over the
classes a model trained on, model files recognised, paths as the user has them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_pack
from PIL import Image

from dali_pipes import PackReader, atomic_write_bytes
from tools.pack_dataset import main as pack_main
from trainer.cli import main as trainer_main

RUN = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "8", "--backend", "torch",
       "--workers", "0", "--patience", "0"]
LOADER = ["--backend", "torch", "--workers", "0"]


def _cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(trainer_main, [str(a) for a in args])
    return result.exit_code, result.output


def _json(*args: object) -> dict:
    """The one JSON object a command prints on stdout (its warnings go to stderr)."""
    result = CliRunner().invoke(trainer_main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def _one_line_error(code: int, output: str, *words: str) -> None:
    assert code == 1 and len(output.strip().splitlines()) == 1, output
    assert all(word in output for word in words), output


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 10 images, split by image: 18 train, 6 val, 6 test."""
    return make_pack(tmp_path_factory.mktemp("outputs"), classes=3, per_class=10, seed=7)


@pytest.fixture(scope="module")
def run(pack: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "r"
    code, output = _cli("run", "--pack", pack, *RUN, "--epochs", "2", "--out", out)
    assert code == 0, output
    assert "amp off, world size 1" in output  # the --amp name, never a torch dtype
    return out


# --- one output rule ------------------------------------------------------------------------------------------------


def _commands(pack: Path, checkpoint: Path, out: Path) -> dict[str, tuple[list[object], Path]]:
    """Each command that writes a result: its arguments with `out`, and the file it writes there."""
    return {
        "export": (["export", "--checkpoint", checkpoint, "--format", "torchscript", "--out", out / "m.pt"],
                   out / "m.pt"),
        "embed": (["embed", "--checkpoint", checkpoint, "--pack", pack, "--out", out / "e.h5", *LOADER], out / "e.h5"),
        "eval": (["eval", "--checkpoint", checkpoint, "--pack", pack, "--out", out, *LOADER],
                 out / "confusion_test.png"),
        "verify": (["verify", "--checkpoint", checkpoint, "--pack", pack, "--num-pairs", "20", "--out", out, *LOADER],
                   out / "roc.png"),
    }


@pytest.mark.parametrize("command", ["export", "embed", "eval", "verify"])
def test_an_existing_output_is_refused_without_force_before_any_work(pack: Path, tmp_path: Path, command: str) -> None:
    # The checkpoint does not exist: an error about the output shows it was checked first.
    args, target = _commands(pack, tmp_path / "missing.pt", tmp_path / "out")[command]
    target.parent.mkdir(parents=True)
    target.write_bytes(b"old")
    _one_line_error(*_cli(*args), f"{target} exists; pass --force to replace it")
    assert target.read_bytes() == b"old"
    _one_line_error(*_cli(*args, "--force"), "no such checkpoint")  # --force passes the output check


def test_the_packer_follows_the_same_rule(demo_tree: Path, tmp_path: Path) -> None:
    (tmp_path / "p.h5").write_bytes(b"old")
    result = CliRunner().invoke(pack_main, [str(demo_tree), str(tmp_path / "p.h5"), "--workers", "1", "--quiet"])
    _one_line_error(result.exit_code, result.output, "exists; pass --force to replace it")
    result = CliRunner().invoke(pack_main, [str(demo_tree), str(tmp_path / "p.h5"), "--workers", "1", "--quiet",
                                            "--force"])
    assert result.exit_code == 0 and len(PackReader(tmp_path / "p.h5")) == 72


@pytest.mark.parametrize("command", ["export", "embed", "eval", "verify"])
def test_an_output_folder_that_cannot_be_made_is_one_line_before_any_work(pack: Path, tmp_path: Path,
                                                                          command: str) -> None:
    (tmp_path / "blocker").write_text("a file where a folder would go")
    args, _ = _commands(pack, tmp_path / "missing.pt", tmp_path / "blocker" / "sub")[command]
    _one_line_error(*_cli(*args), "cannot create folder", str(tmp_path / "blocker" / "sub"))


@pytest.mark.parametrize("command", ["export", "embed", "eval", "verify"])
def test_a_read_only_output_folder_is_one_line_before_any_work(pack: Path, tmp_path: Path, command: str) -> None:
    disk = tmp_path / "ro"
    disk.mkdir()
    mounted = os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(disk)], capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        args, _ = _commands(pack, tmp_path / "missing.pt", disk)[command]
        _one_line_error(*_cli(*args), f"{disk}: folder is not writable")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_an_error_names_the_file_asked_for_never_its_temporary(tmp_path: Path) -> None:
    target = tmp_path / "gone" / "x.h5"  # its folder does not exist: opening the temporary beside it fails
    with pytest.raises(FileNotFoundError) as raised:
        atomic_write_bytes(target, lambda f: f.write(b"x"))
    assert raised.value.filename == str(target)
    code, output = _cli("info", tmp_path)  # and the CLI says it in one line (here: a folder given as a pack)
    _one_line_error(code, output, "is a directory")


@pytest.mark.slow
def test_missing_output_folders_are_made_by_every_command(run: Path, pack: Path, tmp_path: Path) -> None:
    for command, (args, target) in _commands(pack, run / "best.pt", tmp_path / "new" / "dir").items():
        code, output = _cli(*args)
        assert code == 0 and target.stat().st_size > 0, (command, output)
        assert ".tmp" not in "".join(p.name for p in target.parent.iterdir()), command


@pytest.mark.slow
def test_eval_prints_its_figures_before_a_failed_plot_write(run: Path, pack: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.evaluation as evaluation

    def full_disk(matrix, classes, path, title=""):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(evaluation, "plot_confusion", full_disk)
    code, output = _cli("eval", "--checkpoint", run / "best.pt", "--pack", pack, "--topk", "3", "--out",
                        tmp_path / "e", *LOADER)
    lines = output.strip().splitlines()
    assert code == 1 and "top1" in lines[1] and "per class top-1:" in output, output
    assert lines[-1] == f"Error: {tmp_path / 'e' / 'confusion_test.png'}: No space left on device"


# --- epochs from 1, synthetic data marked -----------------------------------------------------------------------------


@pytest.mark.slow
def test_every_file_a_user_reads_counts_epochs_from_one(run: Path, pack: Path, tmp_path: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = summary["best_epoch"]
    assert [r["epoch"] for r in records] == [1, 2] and best in (1, 2)
    assert torch.load(run / "best.pt", weights_only=True)["epoch"] == best - 1  # the checkpoint's key: an index
    assert _json("eval", "--checkpoint", run / "best.pt", "--pack", pack, "--json", *LOADER)["epoch"] == best
    code, output = _cli("export", "--checkpoint", run / "best.pt", "--format", "torchscript", "--out",
                        tmp_path / "m.pt")
    assert code == 0, output
    sidecar = json.loads((tmp_path / "m.pt.json").read_text())
    assert sidecar["epoch"] == best and sidecar["version"] == 2


@pytest.mark.slow
def test_eval_on_synthetic_data_says_so(run: Path, pack: Path) -> None:
    eval_args = ["eval", "--checkpoint", run / "best.pt", "--pack", pack, "--topk", "3"]
    assert _json(*eval_args, "--backend", "synthetic", "--json")["synthetic_data"] is True
    code, output = _cli(*eval_args, "--backend", "synthetic")
    assert code == 0 and output.startswith("SYNTHETIC DATA (random images, not the pack's: the figures measure "
                                           "speed only): "), output
    assert _json(*eval_args, "--json", *LOADER)["synthetic_data"] is False


# --- closed sets of a model trained on a pack split by class ----------------------------------------------------------


@pytest.fixture(scope="module")
def face_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """8 identities split by class (4 to train on, 2 in each of val and test), one epoch of an arcface head."""
    root = tmp_path_factory.mktemp("faces")
    from tools.make_demo_dataset import make_demo_dataset

    make_demo_dataset(root / "src", classes=8, per_class=6, seed=0, min_size=32, max_size=40, png_every=0)
    result = CliRunner().invoke(pack_main, [str(root / "src"), str(root / "p.h5"), "--split-by", "class", "--val-ratio",
                                            "0.25", "--test-ratio", "0.25", "--workers", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    out = root / "r"
    code, output = _cli("run", "--pack", root / "p.h5", *RUN, "--head", "arcface", "--embedding-dim", "16",
                        "--monitor", "val_auc", "--epochs", "1", "--out", out)
    assert code == 0, output
    return root / "p.h5", out


@pytest.mark.slow
def test_predict_offers_only_the_identities_it_trained_on(face_run: tuple[Path, Path]) -> None:
    pack, out = face_run
    reader = PackReader(pack)
    trained = reader.classes_in("train")
    assert len(trained) == 4 and len(reader.classes) == 8
    assert torch.load(out / "best.pt", weights_only=True)["trained_classes"] == trained
    result = CliRunner().invoke(trainer_main, ["predict", "--checkpoint", str(out), str(pack.parent / "src"),
                                               "--topk", "99", "--json"])
    assert result.exit_code == 0, result.output
    assert "cover only the 4 classes it trained on, of the 8 classes in its head" in result.output
    rows = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert len(rows) == 48
    for row in rows:
        assert [t["class"] for t in row["top"]] != [] and {t["class"] for t in row["top"]} == set(trained)
        assert sum(t["probability"] for t in row["top"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_eval_on_the_train_split_lists_only_the_trained_identities(face_run: tuple[Path, Path]) -> None:
    pack, out = face_run
    trained = PackReader(pack).classes_in("train")
    result = _json("eval", "--checkpoint", out / "best.pt", "--pack", pack, "--split", "train", "--json", *LOADER)
    assert list(result["per_class"]) == trained and all(v["num_samples"] == 6 for v in result["per_class"].values())
    assert result["closed_set_classes"] == 4 and result["num_classes"] == 8
    assert result["top4"] == 1.0  # k = the 4 classes it can predict: every image is in its top 4
    code, output = _cli("eval", "--checkpoint", out / "best.pt", "--pack", pack, "--split", "train", *LOADER)
    assert code == 0 and "cover only the 4 classes it trained on" in output


# --- model files named, folders and paths taken as the user has them --------------------------------------------------


@pytest.fixture(scope="module")
def torchscript_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ts") / "model.pt"
    traced = torch.jit.trace(torch.nn.Conv2d(3, 2, 1), torch.zeros(1, 3, 4, 4))
    torch.jit.save(traced, str(path))
    return path


@pytest.mark.parametrize("args, words", [
    (["predict", "--checkpoint", "{ts}", "{tmp}"],
     ["a TorchScript export (trainer export), not a checkpoint",
      "predict takes the best.pt it came from, or an ONNX export (.onnx)"]),
    (["eval", "--checkpoint", "{ts}", "--pack", "{pack}"], ["a TorchScript export",
                                                             "give the best.pt or last.pt of the run it came from"]),
    (["eval", "--checkpoint", "{tmp}", "--pack", "{pack}"], ["is a folder without best.pt", "best.pt or last.pt"]),
    (["run", "--pack", "{pack}", "--weights", "{ts}"], ["a TorchScript export (trainer export); --weights takes a "
                                                        "state dict or a checkpoint: the best.pt of the run"]),
    (["run", "--pack", "{pack}", "--weights", "{tmp}/m.onnx"], ["an ONNX export (trainer export); --weights takes"]),
])
def test_exported_models_and_folders_are_named_with_what_to_pass(pack: Path, torchscript_file: Path, tmp_path: Path,
                                                                 args: list[str], words: list[str]) -> None:
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07an onnx protobuf")
    fill = {"ts": torchscript_file, "tmp": tmp_path, "pack": pack}
    # A run fails before training (with --epochs 1 should it not); its weights are the ones named above.
    run_args = ["--image-size", "32", "--batch-size", "8", "--workers", "0", "--epochs", "1", "--out", tmp_path / "r"]
    code, output = _cli(*[a.format(**fill) for a in args], *(run_args if args[0] == "run" else []))
    _one_line_error(code, output, *words)
    assert "..." not in output  # nothing cut mid-sentence


@pytest.mark.slow
def test_a_run_folder_stands_for_its_best_checkpoint(run: Path, pack: Path) -> None:
    assert _json("eval", "--checkpoint", run, "--pack", pack, "--json", *LOADER)["checkpoint"] == str(run / "best.pt")


@pytest.mark.slow
def test_weights_of_another_architecture_name_it(run: Path, pack: Path, tmp_path: Path) -> None:
    rest = [a for a in RUN if a not in ("resnet18", "--arch", "none", "--weights")]
    code, output = _cli("run", "--pack", pack, *rest, "--weights", run / "best.pt", "--out", tmp_path / "r")
    _one_line_error(code, output, "a resnet18 checkpoint does not fit --arch mobilenet_v2; pass --arch resnet18")


@pytest.mark.slow
def test_predict_refuses_what_the_packer_rejects(run: Path, tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.full((5, 5, 3), 200, np.uint8)).save(tmp_path / "imgs" / "tiny.png")
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "imgs" / "small.png")
    result = CliRunner().invoke(trainer_main, ["predict", "--checkpoint", str(run / "best.pt"), str(tmp_path / "imgs"),
                                               "--json"])
    assert result.exit_code == 0, result.output
    assert f"skipped: {tmp_path / 'imgs' / 'tiny.png'}: too small (5x5, need 8 px a side)" in result.output
    assert [json.loads(line)["path"] for line in result.output.splitlines() if line.startswith("{")] == [
        str(tmp_path / "imgs" / "small.png")]


@pytest.mark.slow
def test_verify_pairs_take_paths_as_the_user_has_them(run: Path, pack: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    reader = PackReader(pack)
    test = reader.split_indices("test")
    stored, labels = [reader.paths[i] for i in test], reader.labels[test]
    source = pack.parent / "src"
    spellings = {"stored": stored, "absolute": [str((source / p).resolve()) for p in stored],
                 "relative": [os.path.relpath(source / p, tmp_path) for p in stored]}
    monkeypatch.chdir(tmp_path)  # "relative" is relative to the working directory
    figures = {}
    for name, paths in spellings.items():
        rows = [f"{paths[i]},{paths[j]},{int(labels[i] == labels[j])}\n"
                for i in range(len(paths)) for j in range(i + 1, len(paths))]
        (tmp_path / f"{name}.csv").write_text("".join(rows))
        figures[name] = _json("verify", "--checkpoint", run / "best.pt", "--pack", pack, "--pairs",
                              tmp_path / f"{name}.csv", "--json", *LOADER)
    assert figures["stored"]["num_pairs"] == 15 and figures["absolute"] == figures["stored"] == figures["relative"]
    (tmp_path / "bad.csv").write_text(f"{stored[0]},{source / 'nowhere.jpg'},0\n")
    code, output = _cli("verify", "--checkpoint", run / "best.pt", "--pack", pack, "--pairs", tmp_path / "bad.csv",
                        *LOADER)
    _one_line_error(code, output, "1 path is not in the split (test of", "nowhere.jpg")


# --- help -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tool", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "tools").glob("*.py")))
def test_every_tool_answers_dash_h(tool: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools"))  # as when run as a script
    result = CliRunner().invoke(importlib.import_module(f"tools.{tool}").main, ["-h"])
    assert result.exit_code == 0 and result.output.startswith("Usage:"), result.output
