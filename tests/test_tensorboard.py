"""`trainer run --tensorboard`: the event files hold step and epoch scalars and a training batch, read back with
TensorBoard."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_pack

from dali_pipes import PipelineSpec
from trainer.cli import main as trainer_main

EPOCHS = 2


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("tensorboard")
    root = tmp_path_factory.mktemp("tb")
    pack = make_pack(root, classes=3, per_class=8, seed=4)
    out = root / "run"
    result = CliRunner().invoke(trainer_main, ["run", "--pack", str(pack), "--arch", "resnet18", "--weights", "none",
                                               "--image-size", "32", "--workers", "0", "--epochs", str(EPOCHS),
                                               "--batch-size", "4", "--backend", "torch", "--log-every", "1",
                                               "--patience", "0", "--tensorboard", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


@pytest.mark.slow
def test_event_files_hold_step_and_epoch_scalars(tb_run: Path) -> None:
    records = [json.loads(line) for line in (tb_run / "metrics.jsonl").read_text().splitlines()]
    events = _events(tb_run / "tb")
    tags = set(events.Tags()["scalars"])
    assert {"step/loss", "step/lr"} <= tags
    assert {f"epoch/{key}" for key in records[0] if key != "epoch"} <= tags
    assert {"epoch/data_wait_fraction", "epoch/images_per_second"} <= tags
    for key in ("val_loss", "val_top1", "train_loss", "images_per_second"):
        logged = events.Scalars(f"epoch/{key}")
        assert [e.step for e in logged] == list(range(1, EPOCHS + 1))
        assert [e.value for e in logged] == pytest.approx([r[key] for r in records], rel=1e-6)


@pytest.mark.slow
def test_step_losses_average_to_the_epoch_train_loss(tb_run: Path) -> None:
    # --log-every 1 logs every step; train batches are all full (drop_last), so the epoch's
    # train_loss is the plain mean of its step losses.
    records = [json.loads(line) for line in (tb_run / "metrics.jsonl").read_text().splitlines()]
    losses = _events(tb_run / "tb").Scalars("step/loss")
    steps = [e.step for e in losses]
    per_epoch = len(steps) // EPOCHS
    assert steps == list(range(EPOCHS * per_epoch)) and per_epoch >= 2
    for epoch, record in enumerate(records):
        values = [e.value for e in losses[epoch * per_epoch : (epoch + 1) * per_epoch]]
        assert sum(values) / len(values) == pytest.approx(record["train_loss"], rel=1e-5)
    lrs = _events(tb_run / "tb").Scalars("step/lr")
    assert lrs[-1].value == pytest.approx(records[-1]["lr"], rel=1e-6)


@pytest.mark.slow
def test_one_training_batch_is_logged_as_an_image(tb_run: Path) -> None:
    images = _events(tb_run / "tb").Images("train/batch")
    assert len(images) == 1 and images[0].step == 0
    assert images[0].height == 32 and images[0].width % 32 == 0  # a grid of 32 px tiles


def test_unnormalize_inverts_the_spec_normalization() -> None:
    from trainer.tensorboard import unnormalize

    spec = PipelineSpec(image_size=8, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    pixels = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1).expand(2, 3, 8, 8)
    # By hand: (0 - 0.5) / 0.5 = -1, (0.5 - 0.25) / 0.25 = 1, (1 - 0) / 1 = 1.
    normalized = (torch.tensor([-1.0, 1.0, 1.0]).view(1, 3, 1, 1).expand(2, 3, 8, 8)
                  .contiguous(memory_format=torch.channels_last))
    assert torch.equal(unnormalize(normalized, spec), pixels)


def test_loop_calls_on_log_at_the_log_every_syncs_with_that_steps_loss() -> None:
    from torch import nn

    from trainer.loop import StepConfig, train_one_epoch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,))) for _ in range(5)]
    # lr 0: the weights never move, so each step's loss can be computed independently afterwards.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    calls = []
    step = StepConfig(nn.CrossEntropyLoss(), None, torch.amp.GradScaler("cpu", enabled=False), log_every=2,
                      on_log=lambda i, values, images: calls.append((i, values, images)))
    train_one_epoch(model, batches, optimizer, step, device=torch.device("cpu"), set_lr=lambda i: 0.0,
                    set_train_mode=model.train)
    assert [c[0] for c in calls] == [0, 1, 3]  # the epoch's first step, then every 2nd
    for i, values, images in calls:
        assert images is batches[i][0]
        with torch.no_grad():
            expected = nn.functional.cross_entropy(model(batches[i][0]), batches[i][1])
        assert values == {"loss": pytest.approx(float(expected), rel=1e-6), "lr": 0.0}


def test_tensorboard_is_an_option_off_by_default() -> None:
    from trainer.config import RunConfig

    assert RunConfig(pack="p.h5").tensorboard is False
    help_text = CliRunner().invoke(trainer_main, ["run", "--help"]).output
    assert "--tensorboard" in help_text and "OUT/tb/" in help_text


@pytest.mark.slow
def test_only_rank_zero_writes_under_ddp(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    pytest.importorskip("tensorboard")
    pack = make_pack(tmp_path, classes=3, per_class=8, seed=4)
    out = tmp_path / "ddp"
    result = subprocess.run([sys.executable, "-m", "trainer", "run", "--pack", str(pack), "--arch", "resnet18",
                             "--weights", "none", "--image-size", "32", "--workers", "0", "--epochs", "1",
                             "--batch-size", "2", "--backend", "torch", "--log-every", "1", "--tensorboard",
                             "--out", str(out), "--nproc", "2"],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
    events = _events(out / "tb")
    from dali_pipes import PackReader

    steps_per_rank = PackReader(pack).split_counts()["train"] // 2 // 2  # 2 ranks, batch 2, last partial batch dropped
    assert [e.step for e in events.Scalars("step/loss")] == list(range(steps_per_rank))
    assert len(events.Scalars("epoch/val_loss")) == 1


def test_log_every_counts_steps_across_epochs() -> None:
    # 3 steps an epoch, --log-every 5: a per-epoch count would never reach 5. Counted across epochs, the syncs fall
    # on global steps 4, 9, 14 (the 5th, 10th, 15th), besides the first step of each epoch (0, 3, 6, ...).
    from torch import nn

    from trainer.loop import StepConfig, train_one_epoch

    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    calls = []
    step = StepConfig(nn.CrossEntropyLoss(), None, torch.amp.GradScaler("cpu", enabled=False), log_every=5,
                      on_log=lambda i, values, images: calls.append(i))
    for epoch in range(5):
        batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,))) for _ in range(3)]
        train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), step, device=torch.device("cpu"),
                        set_lr=lambda i: 0.1, set_train_mode=model.train, step_offset=3 * epoch)
    assert calls == [0, 3, 4, 6, 9, 12, 14]


@pytest.mark.slow
def test_short_epochs_still_get_step_curves_and_the_batch_image(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    pack = make_pack(tmp_path, classes=3, per_class=8, seed=4)  # 14 train images: 3 steps of 4 an epoch
    out = tmp_path / "run"
    result = CliRunner().invoke(trainer_main, ["run", "--pack", str(pack), "--arch", "resnet18", "--weights", "none",
                                               "--image-size", "32", "--workers", "0", "--epochs", "3", "--batch-size",
                                               "4", "--backend", "torch", "--log-every", "4", "--patience", "0",
                                               "--tensorboard", "--out", str(out)])
    assert result.exit_code == 0, result.output
    events = _events(out / "tb")
    # Each epoch's first step (0, 3, 6), and every 4th step of the run (global steps 3 and 7).
    assert [e.step for e in events.Scalars("step/loss")] == [0, 3, 6, 7]
    assert [e.step for e in events.Images("train/batch")] == [0]
