"""The training mechanics through the trainer itself: accumulation, EMA, mixing, progressive sizes, TTA, recipes."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import make_pack
from torch import nn

from dali_pipes import PipelineSpec
from trainer.accumulation import optimizer_steps
from trainer.checkpoint import read_payload
from trainer.cli import main as trainer_main
from trainer.config import build_config
from trainer.config_files import load_config, load_config_file, shipped_recipes
from trainer.ema import ModelEma
from trainer.loop import StepConfig, train_one_epoch
from trainer.resume import restore_state
from trainer.run import train_image_size
from trainer.state import build_state

RECIPES = Path(__file__).resolve().parents[1] / "trainer" / "recipes"


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(trainer_main, list(args))
    return result.exit_code, result.output


# --- accumulation and EMA through train_one_epoch --------------------------------------------------------------------


def no_batch_norm_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def train(batch_size: int, accum_steps: int, epochs: int = 2) -> tuple[nn.Module, ModelEma, list[float], list[dict]]:
    """The trainer's epoch loop over 48 fixed samples; the rate falls linearly over the run's optimizer steps."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 3, 8, 8, generator=generator), torch.randint(0, 5, (48,), generator=generator)
    batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, 48, batch_size)]
    model = no_batch_norm_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    step = StepConfig(nn.CrossEntropyLoss(), None, torch.amp.GradScaler("cpu", enabled=False), log_every=1,
                      accum_steps=accum_steps, ema=ModelEma(model, 0.9))
    updates, rates, results = optimizer_steps(len(batches), accum_steps), [], []
    for epoch in range(epochs):
        def set_lr(u: int) -> float:
            rate = 0.1 * (1 - (epoch * updates + u) / (epochs * updates))
            for group in optimizer.param_groups:
                group["lr"] = rate
            rates.append(rate)
            return rate

        result = train_one_epoch(model, batches, optimizer, step, device=torch.device("cpu"), set_lr=set_lr,
                                 set_train_mode=model.train, epoch=epoch)
        results.append(result.metrics)
    return model, step.ema, rates, results


def test_two_accumulated_batches_of_b_equal_one_batch_of_2b() -> None:
    large, large_ema, large_rates, large_metrics = train(8, 1)
    small, small_ema, small_rates, small_metrics = train(4, 2)
    for a, b in zip(large.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert large_ema.updates == small_ema.updates == 12  # every optimizer step: 6 an epoch, 2 epochs
    for a, b in zip(large_ema.module.parameters(), small_ema.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert large_rates == small_rates[::2] == small_rates[1::2]  # the schedule counts optimizer steps
    for a, b in zip(large_metrics, small_metrics):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5) and a["train_samples"] == b["train_samples"]
    plain, *_ = train(4, 1)
    assert not torch.allclose(next(plain.parameters()), next(large.parameters()), atol=1e-4)  # the test can fail


# --- EMA across resume ----------------------------------------------------------------------------------------------


def test_a_checkpoint_without_averaged_weights_starts_them_from_its_model() -> None:
    cfg = build_config({"pack": "p.h5", "arch": "resnet18", "weights": "none", "ema": 0.99})
    old = build_state(dataclasses.replace(cfg, ema=0.0), 3, torch.device("cpu"))
    with torch.no_grad():
        for p in old.model.parameters():
            p.add_(1.0)  # trained weights, unlike the fresh model below
    payload = old.payload(cfg, ["a", "b", "c"], PipelineSpec(), 0)
    assert "ema" not in payload and payload["model_weights"] == "raw"
    state = build_state(cfg, 3, torch.device("cpu"))
    restore_state(state, read_payload(payload), [])
    assert state.ema.updates == 0
    for a, b in zip(state.ema.module.state_dict().values(), old.model.state_dict().values()):
        assert torch.equal(a, b)
    with_ema = state.payload(cfg, ["a", "b", "c"], PipelineSpec(), 0, weights="ema")
    assert with_ema["model_weights"] == "ema" and with_ema["ema"]["updates"] == 0


# --- options and their checks ---------------------------------------------------------------------------------------


def test_pairs_from_the_command_line_and_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("pack: p.h5\ncrop-scale: [0.35, 1]\ncolor_jitter: 0.4,0.4,0.2\n"
                                     "ramp-epochs: [2, 5]\n")
    cfg = build_config({"crop_ratio": (0.5, 2.0)}, load_config_file(tmp_path / "c.yaml"))
    assert cfg.crop_scale == (0.35, 1.0) and cfg.color_jitter == (0.4, 0.4, 0.2) and cfg.ramp_epochs == (2, 5)
    assert cfg.crop_ratio == (0.5, 2.0) and isinstance(cfg.ramp_epochs[0], int)
    # config.json writes them as lists; a resume or a torchrun child reads them back the same.
    again = build_config({}, json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize("args, message", [
    (["--crop-scale", "0.5"], "expected 2 comma-separated numbers"),
    (["--crop-scale", "0,1"], "--crop-scale must satisfy 0 < MIN <= MAX <= 1"),
    (["--crop-ratio", "2,1"], "--crop-ratio must satisfy"),
    (["--color-jitter", "0.1,-0.2,0"], "--color-jitter needs three strengths >= 0"),
    (["--random-erasing", "1.5"], "--random-erasing is a probability"),
    (["--progressive", "256", "--image-size", "224"], "--progressive 256 is the smallest training size"),
    (["--progressive", "128", "--ramp-epochs", "5,3"], "--ramp-epochs START,END needs 1 <= START <= END"),
    (["--ema", "1"], "--ema is a decay below 1"),
    (["--mixup", "0.2", "--head", "arcface"], "--mixup and --cutmix mix two classes in one image"),
    (["--cutmix", "1", "--head", "cosface"], "margin head (cosface) cannot take"),
    (["--config", "nonesuch"], "no such file, nor a shipped recipe of that name (recipes: face, fast, seed"),
])
def test_bad_values_are_one_line(args: list[str], message: str) -> None:
    code, output = _run("run", "--pack", "p.h5", *args)
    assert code in (1, 2) and message in output and len(output.strip().splitlines()) == 1, output


def test_progressive_sizes_by_hand() -> None:
    cfg = build_config({"pack": "p.h5", "image_size": 192, "progressive": 128, "epochs": 5})
    # Epochs 1..5 (the default ramp, 1,5): 128 + 64 (e - 1) / 4 = 128, 144, 160, 176, 192 -> multiples of 32, in range.
    assert [train_image_size(cfg, e) for e in range(5)] == [128, 128, 160, 192, 192]
    ramp = cfg.replace(ramp_epochs=(2, 3))
    assert [train_image_size(ramp, e) for e in range(5)] == [128, 128, 192, 192, 192]
    assert train_image_size(cfg.replace(progressive=None), 0) == 192


# --- recipes --------------------------------------------------------------------------------------------------------


def test_recipes_are_listed_with_their_first_comment_line() -> None:
    code, output = _run("recipes")
    assert code == 0
    listed = dict(line.split(maxsplit=1) for line in output.strip().splitlines())
    files = sorted(RECIPES.glob("*.yaml"))
    assert sorted(listed) == [path.stem for path in files] and {"seed", "fast"} <= set(listed)
    for path in files:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and listed[path.stem] == first[2:], path.name
    assert shipped_recipes() == listed


def test_config_names_a_shipped_recipe_and_the_command_line_wins() -> None:
    fast = yaml.safe_load((RECIPES / "fast.yaml").read_text())
    cfg = build_config({"pack": "p.h5", "epochs": 3}, load_config("fast"))
    assert cfg.recipe == "fast" and cfg.epochs == 3
    for key, value in fast.items():
        if key != "epochs":
            got = getattr(cfg, key.replace("-", "_"))
            assert (list(got) if isinstance(got, tuple) else got) == value, key
    seed = build_config({"pack": "p.h5"}, load_config("seed"))
    assert (seed.optimizer, seed.scheduler, seed.crop_scale, seed.tta, seed.recipe) == ("adam", "step", None, "none",
                                                                                        "seed")


# --- a whole run: recipe, progressive sizes, EMA, TTA ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pack(tmp_path_factory.mktemp("mechanics"), classes=3, per_class=10, seed=6)


@pytest.mark.slow
def test_a_fast_recipe_run_records_sizes_averages_and_tta(pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    # The synthetic backend: the mechanics, not the pixels, are under test here.
    code, output = _run("run", "--pack", str(pack), "--config", "fast", "--backend", "synthetic", "--arch", "resnet18",
                        "--weights", "none", "--image-size", "64", "--progressive", "16", "--eval-image-size", "32",
                        "--epochs", "3", "--batch-size", "4", "--accum-steps", "2", "--mixup", "0.2", "--cutmix", "1",
                        "--workers", "0", "--out", str(out))
    assert code == 0, output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["image_size"] for r in records] == [16, 32, 64]  # 16 + 48 (e - 1) / 2 = 40 -> 32 at epoch 2
    assert all(isinstance(r["val_top1_ema"], float) and "val_loss_ema" in r for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tta"] == "flip" and summary["best_weights"] in ("raw", "ema")
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"] == "fast" and config["label_smoothing"] == 0.1 and config["epochs"] == 3
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["model_weights"] == summary["best_weights"] and best["spec"]["image_size"] == 32
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["model_weights"] == "raw" and last["ema"]["updates"] == 3 * 2  # 18 images: 4 batches, 2 updates
    # eval with the checkpoint's own --tta gives the run's test figures.
    code, output = _run("eval", "--checkpoint", str(out / "best.pt"), "--pack", str(pack), "--backend", "synthetic",
                        "--batch-size", "4", "--workers", "0", "--topk", "3", "--json")
    assert code == 0, output
    result = json.loads(output)
    assert result["tta"] == "flip" and result["top1"] == pytest.approx(summary["test_top1"])
