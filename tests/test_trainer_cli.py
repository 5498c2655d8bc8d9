"""`trainer run | eval | predict` end to end on small packs, through the real command line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner
from conftest import make_pack

from dali_pipes import PackOptions, PackReader, pack_folder
from tools.make_demo_dataset import make_demo_dataset
from trainer.cli import main as trainer_main

FAST = ["--weights", "none", "--image-size", "32", "--workers", "0", "--log-every", "2"]


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(trainer_main, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def learn_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 40 images: enough for a tiny model to learn in a few epochs."""
    return make_pack(tmp_path_factory.mktemp("learn"), classes=4, per_class=40, seed=1, max_size=80, workers=2)


@pytest.fixture(scope="module")
def trained(learn_pack: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "r"
    code, output = _run("run", "--pack", str(learn_pack), "--arch", "resnet18", *FAST, "--epochs", "8",
                        "--batch-size", "16", "--optimizer", "adam", "--lr", "0.002", "--scheduler", "cosine",
                        "--backend", "torch", "--out", str(out), "--patience", "0", "--seed", "0")
    assert code == 0, output
    return out


@pytest.mark.slow
def test_run_learns_and_writes_everything(trained: Path) -> None:
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 9))  # counted from 1, as the console does
    required = {"epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "epoch_seconds",
                "images_per_second", "data_wait_fraction"}
    assert all(required <= set(r) for r in records)
    # Chance is 0.25. Best val top-1 measured over seeds 0-3 at 1 and 2 threads: 0.75 to 0.84 (of 32 images).
    assert max(r["val_top1"] for r in records) >= 0.6
    summary = json.loads((trained / "summary.json").read_text())
    assert {"best_epoch", "stopped_early", "stop_reason", "test_loss", "test_top1", "test_top5", "epochs_run",
            "train_seconds"} <= set(summary)
    assert summary["epochs_run"] == 8 and not summary["stopped_early"]
    best = min(records, key=lambda r: r["val_loss"])
    assert summary["best_epoch"] == best["epoch"]
    config = json.loads((trained / "config.json").read_text())
    assert config["arch"] == "resnet18" and config["image_size"] == 32
    assert (trained / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_checkpoint_contents_and_plain_torchvision_load(trained: Path, learn_pack: Path) -> None:
    ckpt = torch.load(trained / "best.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "early_stopping", "rng", "config", "classes",
                "arch", "head", "spec"):
        assert key in ckpt, key
    assert ckpt["classes"] == PackReader(learn_pack).classes
    assert ckpt["spec"]["image_size"] == 32 and ckpt["spec"]["mean"] == [0.485, 0.456, 0.406]
    torchvision.models.resnet18(num_classes=4).load_state_dict(ckpt["model"])


@pytest.mark.slow
def test_eval_matches_the_run_summary(trained: Path, learn_pack: Path) -> None:
    code, output = _run("eval", "--checkpoint", str(trained / "best.pt"), "--pack", str(learn_pack), "--topk", "3",
                        "--json", "--backend", "torch", "--workers", "0", "--out", str(trained / "eval"))
    assert code == 0, output
    result = json.loads(output)
    summary = json.loads((trained / "summary.json").read_text())
    assert result["num_samples"] == len(PackReader(learn_pack).split_indices("test"))
    assert result["top1"] == pytest.approx(summary["test_top1"])
    assert result["loss"] == pytest.approx(summary["test_loss"], rel=1e-5)
    assert result["epoch"] == summary["best_epoch"]  # both count from 1
    assert {"top1", "top2", "top3", "per_class"} <= set(result) and "top4" not in result
    assert sum(v["num_samples"] for v in result["per_class"].values()) == result["num_samples"]
    assert (trained / "eval" / "confusion_test.png").exists()


@pytest.mark.slow
def test_eval_topk_above_classes_is_clamped_with_a_warning(trained: Path, learn_pack: Path) -> None:
    result = CliRunner().invoke(trainer_main, ["eval", "--checkpoint", str(trained / "best.pt"), "--pack",
                                               str(learn_pack), "--topk", "9", "--backend", "torch", "--workers", "0"])
    assert result.exit_code == 0 and "using 4" in result.output and "top4 1.0000" in result.output


@pytest.mark.slow
def test_predict_files_and_folders(trained: Path, learn_pack: Path, tmp_path: Path) -> None:
    reader = PackReader(learn_pack)
    (tmp_path / "imgs").mkdir()
    for i in reader.split_indices("test")[:3]:
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(bytes(reader.image_bytes(i)))
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"nope")
    result = CliRunner().invoke(trainer_main, ["predict", "--checkpoint", str(trained / "best.pt"),
                                               str(tmp_path / "imgs"), "--topk", "2", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert len(lines) == 3 and all(len(r["top"]) == 2 for r in lines)
    assert "skipped" in result.output and "broken.jpg" in result.output
    # --topk above the 4 classes lists them all: a distribution, whose first two are the top-2 above.
    result = CliRunner().invoke(trainer_main, ["predict", "--checkpoint", str(trained / "best.pt"),
                                               str(tmp_path / "imgs"), "--topk", "9", "--json"])
    full = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [r["path"] for r in full] == [r["path"] for r in lines]
    for top2, every in zip(lines, full):
        probabilities = [t["probability"] for t in every["top"]]
        assert len(probabilities) == 4 and sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert probabilities == sorted(probabilities, reverse=True) and all(0 <= p <= 1 for p in probabilities)
        assert top2["top"] == every["top"][:2]


@pytest.mark.slow
def test_resume_ends_with_the_same_metrics(learn_pack: Path, tmp_path: Path) -> None:
    common = ["--pack", str(learn_pack), "--arch", "resnet18", *FAST, "--batch-size", "16", "--optimizer", "adamw",
              "--scheduler", "step", "--step-size", "2", "--gamma", "0.5", "--backend", "torch", "--head", "mlp",
              "--hidden", "16"]
    code, output = _run("run", *common, "--epochs", "3", "--out", str(tmp_path / "full"))
    assert code == 0, output
    code, output = _run("run", *common, "--epochs", "2", "--out", str(tmp_path / "part"))
    assert code == 0, output
    code, output = _run("run", "--resume", str(tmp_path / "part"), "--epochs", "3")
    assert code == 0, output
    full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    part = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert len(full) == len(part) == 3
    for a, b in zip(full, part):
        for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr"):
            assert round(a[key], 4) == round(b[key], 4), (a["epoch"], key)
    s_full = json.loads((tmp_path / "full" / "summary.json").read_text())
    s_part = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert round(s_full["test_top1"], 4) == round(s_part["test_top1"], 4)


@pytest.mark.slow
def test_early_stopping_is_recorded(learn_pack: Path, tmp_path: Path) -> None:
    # With lr 0 alone the batch norms' running statistics still move, and val top-1 rose at epoch 2 for seeds 1
    # and 2 of 0-3 (at 1 and 2 threads). Frozen blocks keep them: the model cannot change, so val top-1 cannot
    # improve (measured: equal at epochs 1 and 2 for seeds 0-3 at 1 and 2 threads).
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pt")
    code, output = _run("run", "--pack", str(learn_pack), "--arch", "resnet18", *FAST, "--weights",
                        str(tmp_path / "r18.pt"), "--freeze", "5", "--batch-size", "16", "--epochs", "8", "--lr", "0",
                        "--patience", "1", "--monitor", "val_top1", "--backend", "torch", "--out", str(tmp_path / "r"))
    assert code == 0, output
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["stopped_early"] and summary["epochs_run"] == 2
    assert "val_top1 did not improve" in summary["stop_reason"]
    assert "early stopping" in output


@pytest.mark.parametrize("args, message", [
    (["--arch", "resnet19"], "unknown architecture"),
    (["--freeze", "6", "--arch", "resnet18"], "beyond the 5 blocks"),
    (["--batch-size", "1000"], "larger than the"),
    (["--backend", "synthetic", "--device", "cuda:7"], "CUDA is not available"),
    (["--arch", "inception_v3", "--image-size", "32"], "torchvision gives it a minimum input of 75 px; pass "
                                                       "--image-size 75 or more"),
])
def test_bad_run_options_are_one_line(demo_pack: Path, tmp_path: Path, args: list[str], message: str) -> None:
    if "cuda" in " ".join(args) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, output = _run("run", "--pack", str(demo_pack), *FAST, "--batch-size", "8", "--out", str(tmp_path / "r"),
                        *args)
    assert code == 1 and message in output, output
    assert len(output.strip().splitlines()) == 1


def test_resume_with_nothing_to_resume(tmp_path: Path) -> None:
    code, output = _run("run", "--resume", str(tmp_path))
    assert code == 1 and "nothing to resume" in output


def test_one_class_pack_is_refused(tmp_path: Path) -> None:
    make_demo_dataset(tmp_path / "src", classes=1, per_class=10, min_size=16, max_size=24)
    pack_folder(tmp_path / "src", tmp_path / "p.h5", PackOptions(), workers=1, show_progress=False)
    code, output = _run("run", "--pack", str(tmp_path / "p.h5"), *FAST, "--out", str(tmp_path / "r"))
    assert code == 1 and "at least 2" in output


def _help(command: str) -> dict[str, str]:
    """Option -> its help text, from `trainer COMMAND --help` (continuation lines joined)."""
    code, output = _run(command, "--help")
    assert code == 0, output
    options: dict[str, str] = {}
    current = None
    for line in output.split("Options:", 1)[1].splitlines():
        stripped = line.strip()
        if stripped.startswith("--"):
            current = stripped.split()[0]
            options[current] = stripped[len(current):].strip()
        elif current and stripped:
            options[current] += " " + stripped
    return {name: " ".join(text.split()) for name, text in options.items()}


def test_loader_options_read_the_same_in_every_command() -> None:
    helps = {command: _help(command) for command in ("eval", "embed", "verify")}
    for option in ("--split", "--batch-size", "--workers", "--device"):
        texts = {command: h[option] for command, h in helps.items()}
        assert len(set(texts.values())) == 1, (option, texts)
    for h in helps.values():
        assert "one per core" not in h["--workers"] and "usable cores // LOCAL_WORLD_SIZE" in h["--workers"]
        assert h["--split"].startswith("[train|val|test]") and "Split of the pack" in h["--split"]
        assert "Images per batch" in h["--batch-size"]
    assert "synthetic: random images" in helps["eval"]["--backend"]
    assert "[required]" in helps["eval"]["--pack"] and "[required]" in helps["verify"]["--pack"]
    run_help = _help("run")
    assert "[required, unless --config or --resume gives it]" in run_help["--pack"]
    assert run_help["--workers"] == helps["eval"]["--workers"] and run_help["--device"].startswith(
        helps["eval"]["--device"].split("[")[0])


def test_python_dash_m_trainer_works() -> None:
    result = subprocess.run([sys.executable, "-m", "trainer", "--help"], capture_output=True, text=True, check=True)
    for command in ("run", "eval", "predict", "info"):
        assert command in result.stdout
