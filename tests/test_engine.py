"""Engine pieces against hand computations: top-k with ties, schedules, early stopping, config."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from trainer.cli import main as trainer_main
from trainer.config import RunConfig, build_config, config_fields, option_name
from trainer.config_files import load_config_file
from trainer.errors import TrainerError
from trainer.loop import resolve_amp
from trainer.monitor import EarlyStopping
from trainer.optim import Plateau, lr_factor
from trainer.scoring import evaluate, topk_credit


def test_topk_on_known_logits() -> None:
    logits = torch.tensor([
        [0.1, 0.9, 0.0, 0.5],   # label 1: rank 0
        [0.8, 0.1, 0.7, 0.2],   # label 2: one above -> top2
        [0.1, 0.2, 0.3, 0.4],   # label 0: three above -> top4
        [0.5, 0.5, 0.5, 0.5],   # label 3: all tied -> credit k/4
        [0.9, 0.9, 0.1, 0.0],   # label 0: tied with one other at the top -> top1 credit 1/2
    ])
    labels = torch.tensor([1, 2, 0, 3, 0])
    got = topk_credit(logits, labels, [1, 2, 3, 4]).sum(1).tolist()
    # Direct: per sample credit at k = clamp((k - above) / (tied + 1), 0, 1).
    expected_per_sample = [
        [1, 1, 1, 1],
        [0, 1, 1, 1],
        [0, 0, 0, 1],
        [0.25, 0.5, 0.75, 1],
        [0.5, 1, 1, 1],
    ]
    expected = [sum(row[j] for row in expected_per_sample) for j in range(4)]
    assert got == pytest.approx(expected)


def test_topk_constant_model_scores_chance() -> None:
    logits = torch.zeros(1000, 10)
    labels = torch.randint(0, 10, (1000,))
    assert (topk_credit(logits, labels, [1, 5]).sum(1) / 1000).tolist() == pytest.approx([0.1, 0.5])


class _Fixed(torch.nn.Module):
    """A 'model' returning preset logits per batch, to test evaluate's arithmetic."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.outputs = iter(outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return next(self.outputs)


def test_evaluate_sums_not_batch_means() -> None:
    torch.manual_seed(0)
    logits = [torch.randn(5, 3), torch.randn(2, 3)]  # unequal batches: averaging means would be wrong
    labels = [torch.tensor([0, 1, 2, 0, 1]), torch.tensor([2, 2])]
    loader = [(torch.zeros(5, 1), labels[0]), (torch.zeros(2, 1), labels[1])]
    result = evaluate(_Fixed(logits), loader, device=torch.device("cpu"), num_classes=3, topk=2)
    all_logits, all_labels = torch.cat(logits), torch.cat(labels)
    assert result["num_samples"] == 7
    assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(all_logits, all_labels).item(), rel=1e-6)
    assert result["top1"] == pytest.approx((all_logits.argmax(1) == all_labels).float().mean().item())
    assert result["per_class_count"] == [2, 2, 3]
    for c in range(3):
        mask = all_labels == c
        assert result["per_class_correct"][c] == pytest.approx((all_logits[mask].argmax(1) == c).sum().item())


def test_evaluate_all_reduce_is_applied() -> None:
    loader = [(torch.zeros(2, 1), torch.tensor([0, 1]))]
    doubled = evaluate(_Fixed([torch.tensor([[2.0, 0.0], [0.0, 2.0]])]), loader, device=torch.device("cpu"),
                       num_classes=2, all_reduce=lambda t: t * 2)
    assert doubled["num_samples"] == 4 and doubled["top1"] == 1.0


@pytest.mark.parametrize("epoch, expected", [(0, 1.0), (9.99, 1.0), (10, 0.1), (25, 0.01)])
def test_step_schedule(epoch: float, expected: float) -> None:
    assert lr_factor("step", epoch, epochs=30, step_size=10, gamma=0.1, warmup_epochs=0) == pytest.approx(expected)


def test_cosine_schedule_with_warmup() -> None:
    f = lambda e: lr_factor("cosine", e, epochs=12, step_size=1, gamma=0.1, warmup_epochs=2)  # noqa: E731
    assert f(1.0) == pytest.approx(0.5)  # halfway through the linear warm-up
    assert f(2.0) == pytest.approx(1.0)
    assert f(7.0) == pytest.approx(0.5)  # halfway through the cosine
    assert f(12.0) == pytest.approx(0.0, abs=1e-12)
    assert f(4.5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2.5 / 10)))


def test_poly_schedule_with_warmup_hand_values() -> None:
    # insightface's PolyScheduler: linear warm-up from 0, then (1 - (t - w) / (T - w)) ** 2; here T 12, w 2 epochs.
    f = lambda e: lr_factor("poly", e, epochs=12, step_size=1, gamma=0.1, warmup_epochs=2)  # noqa: E731
    assert f(0.5) == pytest.approx(0.25) and f(2.0) == pytest.approx(1.0)
    assert f(7.0) == pytest.approx(0.25)  # half the decay span left: 0.5 ** 2
    assert f(4.0) == pytest.approx(0.64) and f(11.0) == pytest.approx(0.01)  # 0.8 ** 2, 0.1 ** 2
    assert f(12.0) == pytest.approx(0.0, abs=1e-12) and f(13.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("poly", 3.0, epochs=4, step_size=1, gamma=0.1, warmup_epochs=0) == pytest.approx(0.0625)


def test_plateau_decays_after_patience() -> None:
    p = Plateau("min", patience=2, gamma=0.5)
    for value in (1.0, 0.9, 0.95, 0.95):
        p.step(value)
    assert p.scale == 0.5
    assert lr_factor("plateau", 3, epochs=9, step_size=2, gamma=0.5, warmup_epochs=0, plateau_scale=p.scale) == 0.5


def test_early_stopping_min_and_max() -> None:
    stop = EarlyStopping("val_loss", patience=2, min_delta=0.01)
    assert stop.update(1.0, 0) and not stop.update(0.995, 1)  # within min_delta: no improvement
    assert not stop.should_stop
    assert not stop.update(1.2, 2) and stop.should_stop and stop.best_epoch == 0
    acc = EarlyStopping("val_top1", patience=1)
    assert acc.update(0.5, 0) and acc.update(0.6, 1) and not acc.update(0.6, 2) and acc.should_stop
    never = EarlyStopping("val_loss", patience=0)
    for e in range(5):
        never.update(1.0, e)
    assert not never.should_stop


@pytest.mark.parametrize("monitor, values, best, bad", [
    ("val_loss", (1.0, 0.95, 0.96, 0.9, 0.91, 0.92), 0.9, 2),
    ("val_top1", (0.2, 0.4, 0.3, 0.4, 0.5, 0.45), 0.5, 1),
])
def test_early_stopping_and_plateau_follow_one_improvement_rule(monitor: str, values: tuple, best: float,
                                                                bad: int) -> None:
    stop = EarlyStopping(monitor, patience=10)
    plateau = Plateau("min" if monitor == "val_loss" else "max", patience=10, gamma=0.5)
    for epoch, value in enumerate(values):
        stop.update(value, epoch)
        plateau.step(value)
    # By hand: the best value, and the epochs after it that were no better (ties are not improvements).
    assert stop.best == plateau.tracker.best == best
    assert stop.tracker.bad_epochs == plateau.tracker.bad_epochs == bad
    assert stop.best_epoch == values.index(best)


def test_stopping_state_written_by_earlier_versions_loads() -> None:
    stop = EarlyStopping("val_top1", patience=3)
    stop.load_state_dict({"monitor": "val_top1", "patience": 3, "min_delta": 0.01, "best": 0.5, "best_epoch": 2,
                          "bad_epochs": 1})
    assert stop.tracker.mode == "max" and stop.best == 0.5
    assert not stop.update(0.505, 4) and stop.tracker.bad_epochs == 2  # within min_delta
    plateau = Plateau()
    plateau.load_state_dict({"mode": "max", "patience": 2, "gamma": 0.5, "scale": 0.5, "best": 0.7, "bad_epochs": 1})
    plateau.step(0.6)
    assert plateau.scale == 0.25 and plateau.tracker.bad_epochs == 0
    again = Plateau()
    again.load_state_dict(plateau.state_dict())
    assert again.state_dict() == plateau.state_dict()


def test_amp_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None and resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) == torch.bfloat16 and resolve_amp("fp16", cpu) == torch.float16


def test_config_file_and_command_line_precedence(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("pack: a.h5\nbatch-size: 8\nlr: 0.01\nchannels_last: false\n")
    cfg = build_config({"lr": 0.5}, load_config_file(path))
    assert (cfg.pack, cfg.batch_size, cfg.lr, cfg.channels_last, cfg.epochs) == ("a.h5", 8, 0.5, False,
                                                                                  RunConfig.epochs)
    json_path = tmp_path / "c.json"
    json_path.write_text(json.dumps({"pack": "b.h5", "optimizer": "sgd"}))
    assert build_config({}, load_config_file(json_path)).optimizer == "sgd"


@pytest.mark.parametrize("content, message", [
    ("pack: a.h5\nbatchsize: 8\n", "unknown config keys: batchsize"),
    ("pack: a.h5\noptimizer: lion\n", "config key 'optimizer'"),
    ("pack: a.h5\nepochs: many\n", "config key 'epochs'"),
    ("pack: a.h5\ncompile: 3\n", "config key 'compile'"),
    ("- just\n- a list\n", "must be a mapping"),
])
def test_bad_config_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(TrainerError, match=message):
        build_config({}, load_config_file(path))


def test_run_options_are_the_issue_contract() -> None:
    names = {option_name(f.name) for f in config_fields()}
    promised = ("--pack --arch --weights --freeze --head --hidden --dropout --activation --optimizer --lr "
                "--weight-decay --momentum --scheduler --step-size --gamma --warmup-epochs --label-smoothing --epochs "
                "--batch-size "
                "--image-size --backend --workers --seed --out --amp --channels-last --compile --monitor --patience "
                "--min-delta --log-every").split()
    assert set(promised) <= names
    help_text = CliRunner().invoke(trainer_main, ["run", "--help"]).output
    for option in promised + ["--config", "--resume", "--no-channels-last"]:
        assert option in help_text
    for arch in ("mobilenet_v2", "resnet18", "resnet50"):
        assert arch in help_text


def test_unknown_config_key_from_cli_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"pack": "x.h5", "nope": 1}')
    result = CliRunner().invoke(trainer_main, ["run", "--config", str(path)])
    assert result.exit_code == 1 and "unknown config keys: nope" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_embeddings_reach_the_host_in_one_copy_not_one_per_batch() -> None:
    import numpy as np
    from sync_audit import counting_host_syncs
    from torch import nn

    from trainer.embedding import embed_batches
    from trainer.scoring import HostGather

    class Tiny(nn.Module):  # its embedding is the input of `fc`: the flattened pixels
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(12, 4)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.fc(images.flatten(1))

    batches = [(k, torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(k))) for k in range(5)]
    with counting_host_syncs() as audit:
        embeddings, keys = embed_batches(Tiny(), batches)
    copies = [call for call in audit.calls if call.startswith("Tensor.cpu")]
    assert len(copies) == 1 and "scoring.py" in copies[0]  # five batches, one copy to the host
    expected = torch.cat([nn.functional.normalize(images.flatten(1), dim=1) for _, images in batches])
    np.testing.assert_allclose(embeddings, expected.numpy(), rtol=1e-6)
    assert keys == list(range(5))
    gather = HostGather(every=2)
    for k in range(5):
        gather.add(torch.full((2,), k))
    assert gather.result().tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert HostGather().result() is None
