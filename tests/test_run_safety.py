"""What a new user tripped on: defaults, safe resume, progress in logs, epochs from 1, nothing left behind."""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_pack
from torch import nn

import trainer.loop as loop
import trainer.run as run_module
from dali_pipes import Progress
from trainer.checkpoint import read_payload
from trainer.cli import main as trainer_main
from trainer.config import build_config
from trainer.loop import StepConfig, progress_postfix, train_one_epoch
from trainer.models import HeadConfig
from trainer.plots import plot_curves
from trainer.resume import incompatibility, schedule
from trainer.signals import StopSignals

# 3 classes x 20 images, 20% val and test: 36 train images, 4 steps of 8 an epoch.
RUN = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "8", "--backend", "torch",
       "--workers", "0", "--log-every", "1", "--scheduler", "cosine", "--patience", "0"]
LR = 1e-3


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pack(tmp_path_factory.mktemp("safety"), classes=3, per_class=20, seed=3)


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(trainer_main, list(args))
    return result.exit_code, result.output


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- defaults -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer, expected", [("adam", 0.0), ("adamw", 0.05), ("sgd", 1e-4)])
def test_weight_decay_default_follows_the_optimizer(optimizer: str, expected: float) -> None:
    cfg = build_config({"pack": "p.h5", "optimizer": optimizer})
    # config.json holds the value used
    assert cfg.weight_decay == expected and cfg.to_dict()["weight_decay"] == expected
    assert build_config({"pack": "p.h5", "optimizer": optimizer, "weight_decay": 0.3}).weight_decay == 0.3
    assert build_config({"pack": "p.h5"}, {"optimizer": optimizer}).weight_decay == expected


def test_weight_decay_defaults_are_in_the_help() -> None:
    code, output = _run("run", "--help")
    assert code == 0
    text = " ".join(output.split())
    assert "adam 0" in text and "adamw 0.05" in text and "sgd 1e-4" in text and "--log-seconds" in text


def test_freeze_with_random_weights_is_one_line_and_leaves_no_folder(pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    code, output = _run("run", "--pack", str(pack), *RUN, "--freeze", "2", "--out", str(out))
    assert code == 1 and len(output.strip().splitlines()) == 1, output
    assert "--weights none" in output and "drop --freeze" in output
    assert not out.exists()  # failed before training: nothing left behind


def test_a_run_failing_before_training_leaves_no_folder(pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs" / "resnet18-now"
    code, output = _run("run", "--pack", str(pack), *RUN, "--batch-size", "1000", "--out", str(out))
    assert code == 1 and "larger than" in output
    assert not out.exists()


# --- progress -------------------------------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_contents_in_a_log() -> None:
    clock, stream = _Clock(), io.StringIO()
    progress = Progress(100, "epoch 1/3", stream=stream, steps=10, log_interval=30.0, clock=clock)
    progress.set_postfix(lambda: "data wait 5%  loss - top1 -")
    for _ in range(10):
        clock.now += 10.0
        progress.update(10)
    progress.close()
    lines = stream.getvalue().splitlines()
    # Steps end at 110, 120, ... 200 s: a line once 30 s have passed since the last (130, 160, 190 s), then the close.
    assert [line.split(" ")[3] for line in lines] == ["3/10", "6/10", "9/10", "10/10"]
    assert "\r" not in stream.getvalue()
    # At 130 s: 30 images in 30 s -> 1 img/s... 10 img per 10 s = 1 img/s; 70 left -> 70 s.
    assert lines[0] == "epoch 1/3: step 3/10 30/100  30.0% 1 img/s data wait 5%  loss - top1 - 30.0s ETA 1:10"
    assert lines[-1].endswith("100.0s ETA 0:00")


def test_progress_on_a_terminal_redraws_with_an_eta() -> None:
    clock, stream = _Clock(), _Tty()
    progress = Progress(40, "epoch 1/1", stream=stream, steps=4, interval=0.0, clock=clock)
    clock.now += 2.0
    progress.update(10)  # 10 images in 2 s: 30 left -> 6 s
    assert stream.getvalue() == "\repoch 1/1: step 1/4 10/40  25.0% 5 img/s 2.0s ETA 0:06\x1b[K"


def test_running_figures_show_a_dash_until_they_exist() -> None:
    assert progress_postfix({"loss": None, "top1": None}, 1.0, 10.0) == "data wait 10%  loss - top1 -"
    assert progress_postfix({"loss": 0.5, "top1": 0.25}, 0.0, 10.0) == "data wait 0%  loss 0.5000 top1 0.250"


def _logged_epoch(steps: int, log_every: int, lr: float = 0.0, scale: int = 1, **loop_args):
    """One epoch of a linear model over `steps` seeded batches of 4, a progress line at every step.

    Returns the model, the batches, the lines and the loop's result. With lr 0 the weights
    never move, so any step's figures can be computed again afterwards.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,))) for _ in range(steps)]
    stream = io.StringIO()
    progress = Progress(4 * steps * scale, "epoch 1/1", stream=stream, steps=steps, log_interval=0.0, scale=scale)
    step = StepConfig(nn.CrossEntropyLoss(), None, torch.amp.GradScaler("cpu", enabled=False), log_every=log_every)
    result = train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=lr), step,
                             device=torch.device("cpu"), set_lr=lambda i: lr, set_train_mode=model.train,
                             progress=progress, **loop_args)
    progress.close()
    return model, batches, stream.getvalue().splitlines(), result


def test_progress_lines_add_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    # Lines every step (log_interval 0) must still read the figures synced every log_every steps, never sync more.
    syncs = []
    real, real_end = loop._running, loop._epoch_figures
    monkeypatch.setattr(loop, "_running", lambda state, *rest: syncs.append(state.steps) or real(state, *rest))
    monkeypatch.setattr(loop, "_epoch_figures",
                        lambda state, *rest: syncs.append(state.steps) or real_end(state, *rest))
    _, _, lines, _ = _logged_epoch(10, log_every=4, lr=0.1)
    assert syncs == [1, 4, 8, 10]  # at the epoch's first step, every 4 steps, and once at the epoch's end
    assert len(lines) == 10 and all("loss - top1 -" not in line for line in lines)


def test_log_lines_of_an_epoch_shorter_than_log_every_show_its_figures() -> None:
    # 3 steps an epoch with --log-every 20: the first step's sync gives every line of the epoch a figure.
    model, batches, lines, _ = _logged_epoch(3, log_every=20)
    with torch.no_grad():
        first = float(nn.functional.cross_entropy(model(batches[0][0]), batches[0][1]))
    assert len(lines) == 3 and f"loss {first:.4f}" in lines[0] and all("loss - " not in line for line in lines)


def test_ddp_progress_figures_are_labelled_until_they_are_every_ranks() -> None:
    # A second rank stands in as fixed sums that `all_reduce` adds: loss sum 20, 2 correct, 8 samples, 1 skipped.
    other = torch.tensor([20.0, 2.0, 8.0, 1.0], dtype=torch.float64)
    model, batches, lines, result = _logged_epoch(4, log_every=2, scale=2, all_reduce=lambda t: t + other)
    with torch.no_grad():
        own = [nn.functional.cross_entropy(model(x), y, reduction="sum") for x, y in batches]
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    expected_loss = (float(sum(own)) + 20.0) / 24
    assert result.metrics["train_loss"] == pytest.approx(expected_loss, rel=1e-9)
    assert result.metrics["train_top1"] == pytest.approx((correct + 2) / 24, rel=1e-9)
    assert result.metrics["train_samples"] == 24 and result.metrics["skipped_samples"] == 1
    assert all("rank 0 loss" in line for line in lines[:-1])
    # The closing line shows the epoch's figures of every rank, as the epoch line does.
    assert "rank 0" not in lines[-1] and f"loss {expected_loss:.4f}" in lines[-1]


# --- curves ---------------------------------------------------------------------------------------------------------


def test_curves_have_an_lr_panel_and_mark_the_best_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.plots as plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig))
    records = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.0 / e, "train_top1": 0.1 * e, "val_top1": 0.1 * e,
                "val_top5": 1.0, "lr": 0.1 / e} for e in (1, 2, 3)]
    plot_curves(records, tmp_path / "c.png", best_epoch=2)
    axes = figures[0].axes
    lr_axis = next(ax for ax in axes if ax.get_ylabel() == "learning rate")
    xs, ys = lr_axis.lines[0].get_data()
    assert list(xs) == [1, 2, 3] and list(ys) == pytest.approx([0.1, 0.05, 0.1 / 3])
    for ax in axes:  # a vertical line at x = 2 on every panel
        assert any(list(line.get_xdata()) == [2, 2] for line in ax.lines), ax.get_title()


# --- resume ---------------------------------------------------------------------------------------------------------


class _StopAfter(StopSignals):
    """A SIGTERM that arrives during training step `steps` + 1 (asked once per step in one process)."""

    steps = 0

    def __init__(self) -> None:
        super().__init__()
        self._asked = 0

    @property
    def received(self) -> int | None:  # type: ignore[override]
        self._asked += 1
        return signal.SIGTERM if self._asked > self.steps else None

    @received.setter
    def received(self, value: int | None) -> None:
        pass


def _stopped_run(pack: Path, out: Path, steps: int, monkeypatch: pytest.MonkeyPatch, *extra: str) -> str:
    monkeypatch.setattr(_StopAfter, "steps", steps)
    with monkeypatch.context() as m:
        m.setattr(run_module, "StopSignals", _StopAfter)
        code, output = _run("run", "--pack", str(pack), *RUN, "--epochs", "2", "--out", str(out), *extra)
    assert code == 143, output
    return output


@pytest.mark.slow
def test_resume_mid_epoch_with_another_batch_size(pack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "r"
    output = _stopped_run(pack, out, 6, monkeypatch)  # epoch 2 stops after 3 of its 4 steps: 24 samples
    assert "at epoch 2, step 3" in output
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["position"]["samples"] == 24 and ckpt["position"]["batch_size"] == 8
    # Batch 16: 2 steps an epoch; 24 samples round down to step 1 (sample 16). Before: "start_batch 3 outside 0..2".
    code, output = _run("run", "--resume", str(out), "--batch-size", "16")
    assert code == 0, output
    lines = [line for line in output.splitlines() if line.startswith("resuming")]
    assert len(lines) == 1 and "epoch 2, step 1 (sample 16 of the epoch" in lines[0] and "after 24 samples" in lines[0]
    assert [r["epoch"] for r in _metrics(out)] == [1, 2]


@pytest.mark.slow
def test_an_old_checkpoint_still_resumes(pack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "r"
    _stopped_run(pack, out, 5, monkeypatch)  # epoch 2 after 2 steps
    # Rewrite last.pt and metrics.jsonl as the previous version wrote them: epochs from 0, position in steps.
    ckpt = torch.load(out / "last.pt", weights_only=True)
    for key in ("metrics_epoch_base",):
        del ckpt[key]
    del ckpt["scheduler"]["epochs"]
    ckpt["position"] = {k: ckpt["position"][k] for k in ("epoch", "step", "partial")}
    ckpt["metrics"]["epoch"] = 0
    torch.save(ckpt, out / "last.pt")
    records = _metrics(out)
    (out / "metrics.jsonl").write_text("".join(json.dumps({**r, "epoch": r["epoch"] - 1}) + "\n" for r in records))
    code, output = _run("run", "--resume", str(out))
    assert code == 0, output
    assert "resuming" in output and "epoch 2, step 2" in output
    assert [r["epoch"] for r in _metrics(out)] == [1, 2]
    assert json.loads((out / "summary.json").read_text())["best_epoch"] in (1, 2)


@pytest.fixture(scope="module")
def finished(pack: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "r"
    code, output = _run("run", "--pack", str(pack), *RUN, "--backend", "auto", "--epochs", "2", "--lr", str(LR),
                        "--out", str(out))
    assert code == 0, output
    assert output.count("backend auto -> torch") == 1  # said once, by the trainer
    # 36 training images in batches of 8: 32 trained, 4 (11%) left out each epoch, and said so.
    assert "each epoch leaves out 4 of the 36 training images (11%" in output
    return out


@pytest.mark.slow
def test_epochs_count_from_one_everywhere(finished: Path) -> None:
    records = _metrics(finished)
    assert [r["epoch"] for r in records] == [1, 2]
    summary = json.loads((finished / "summary.json").read_text())
    assert summary["best_epoch"] == min(records, key=lambda r: r["val_loss"])["epoch"]
    assert json.loads((finished / "config.json").read_text())["weight_decay"] == 0.05  # adamw's default, resolved


@pytest.mark.slow
def test_a_resume_that_does_not_fit_is_refused_before_torchrun(finished: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.cli as cli

    launched = []
    monkeypatch.setattr(cli, "launch_torchrun", lambda *args: launched.append(args) or 0)
    code, output = _run("run", "--resume", str(finished), "--epochs", "3", "--arch", "mobilenet_v2", "--nproc", "2")
    assert code == 1 and "--arch mobilenet_v2 differs from the checkpoint's resnet18" in output, output
    assert len(output.strip().splitlines()) == 1 and launched == []


@pytest.mark.slow
@pytest.mark.parametrize("args, names", [
    (["--arch", "mobilenet_v2"], "--arch mobilenet_v2 differs from the checkpoint's resnet18"),
    (["--head", "mlp"], "--head mlp differs from the checkpoint's linear"),
    (["--hidden", "64", "--head", "mlp"], "--head mlp differs"),
    (["--monitor", "val_top1"], "--monitor val_top1 differs from the checkpoint's val_loss"),
])
def test_resume_with_another_model_names_the_difference(finished: Path, args: list[str], names: str) -> None:
    code, output = _run("run", "--resume", str(finished), "--epochs", "3", *args)
    assert code == 1 and names in output and len(output.strip().splitlines()) == 1, output


def test_a_resume_says_what_another_epoch_count_does_to_the_schedule() -> None:
    cfg = lambda epochs, scheduler="cosine": build_config({"pack": "p.h5", "epochs": epochs, "lr": 0.1,  # noqa: E731
                                                          "scheduler": scheduler})
    assert schedule(cfg(4), 4, reschedule=False) == (4, None)
    assert schedule(cfg(6, "step"), 4, reschedule=False) == (4, None)  # a step schedule has no length
    assert schedule(cfg(6), 4, reschedule=True) == (6, None)
    length, longer = schedule(cfg(6), 4, reschedule=False)
    assert length == 4
    assert longer.startswith("the cosine schedule keeps its planned 4 epochs (lr 0.00e+00 after epoch 4)")
    length, shorter = schedule(cfg(2), 4, reschedule=False)
    # Cosine at epoch 2 of 4: lr 0.1 * (1 + cos(pi / 2)) / 2 = 0.05.
    assert length == 4 and "--reschedule" in shorter
    assert shorter.startswith("the run stops after epoch 2, before its cosine schedule of 4 epochs ends "
                              "(lr 5.00e-02 there)")
    # Poly keeps its length too: at epoch 2 of 4, 0.1 * (1 - 2 / 4) ** 2 = 0.025.
    length, shorter = schedule(cfg(2, "poly"), 4, reschedule=False)
    assert length == 4 and shorter.startswith("the run stops after epoch 2, before its poly schedule of 4 epochs "
                                              "ends (lr 2.50e-02 there)")


def test_every_head_field_is_compared_on_resume() -> None:
    cfg = build_config({"pack": "p.h5", "arch": "resnet18", "head": "arcface"})
    head = HeadConfig.from_run(cfg)
    ckpt = read_payload({"model": {}, "arch": "resnet18", "head": head.to_dict(), "spec": {}, "classes": ["a", "b"],
                         "epoch": 0, "early_stopping": {"monitor": "val_loss"}})
    assert incompatibility(ckpt, cfg, head, ["a", "b"]) is None
    changed = {"type": "cosface", "hidden": 8, "dropout": 0.5, "activation": "leaky_relu", "embedding_dim": 8,
               "margin": 0.25, "scale": 8.0, "subcenters": 3}
    assert set(changed) == {f.name for f in dataclasses.fields(HeadConfig)}  # a new field needs a line here
    for name, value in changed.items():
        option = "--head" if name == "type" else "--" + name.replace("_", "-")
        other = dataclasses.replace(head, **{name: value})
        assert incompatibility(ckpt, cfg, other, ["a", "b"]) == (
            f"{option} {value} differs from the checkpoint's {getattr(head, name)}")


@pytest.mark.slow
def test_resume_on_a_pack_with_other_classes_names_them(finished: Path, tmp_path: Path) -> None:
    other = make_pack(tmp_path, classes=4, per_class=10, seed=4)
    code, output = _run("run", "--resume", str(finished), "--epochs", "3", "--pack", str(other))
    assert code == 1 and "the pack's 4 classes differ from the checkpoint's 3" in output, output
    assert len(output.strip().splitlines()) == 1


TIMINGS = ("epoch_seconds", "train_seconds", "images_per_second", "data_wait_fraction")


@pytest.mark.slow
def test_a_stop_on_an_epochs_last_step_resumes_as_if_uninterrupted(finished: Path, pack: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # A real SIGINT, sent by the run to itself during its 4th step, the last of epoch 1 (4 steps an epoch): the
    # handler sees it before the step ends, so the stop lands exactly there, whatever the machine's speed.
    real_step, steps = loop.train_step, []

    def step_then_interrupt(*args, **kwargs):
        result = real_step(*args, **kwargs)
        steps.append(1)
        if len(steps) == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    out = tmp_path / "r"
    args = ["--pack", str(pack), *RUN, "--backend", "auto", "--epochs", "2", "--lr", str(LR)]  # `finished`'s run
    with monkeypatch.context() as m:
        m.setattr(loop, "train_step", step_then_interrupt)
        code, output = _run("run", *args, "--out", str(out))
    assert code == 130 and "stopped by SIGINT at epoch 1, step 4" in output, output
    assert torch.load(out / "last.pt", weights_only=True)["position"]["step"] == 4
    code, output = _run("run", "--resume", str(out))
    assert code == 0 and "resuming" in output and "epoch 1, step 4" in output, output
    resumed, uninterrupted = _metrics(out), _metrics(finished)
    assert [r["epoch"] for r in resumed] == [1, 2] and all(r["lr"] is not None for r in resumed)
    for ours, theirs in zip(resumed, uninterrupted):
        assert set(ours) == set(theirs)
        for key in set(ours) - set(TIMINGS):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6), (ours["epoch"], key)
    summaries = [json.loads((run / "summary.json").read_text()) for run in (out, finished)]
    for key in ("best_epoch", "test_loss", "test_top1", "epochs_run"):
        assert summaries[0][key] == pytest.approx(summaries[1][key], rel=1e-6), key


@pytest.mark.slow
def test_resuming_a_finished_run_does_nothing(finished: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in finished.iterdir()}
    code, output = _run("run", "--resume", str(finished))
    assert code == 0, output
    assert "is finished (2 epochs, reached --epochs 2); nothing to do" in output and "resuming" not in output
    assert {p.name: p.stat().st_mtime_ns for p in finished.iterdir()} == before  # no file touched


@pytest.mark.slow
@pytest.mark.parametrize("reschedule", [False, True])
def test_larger_epochs_keep_the_schedule_unless_rescheduled(finished: Path, tmp_path: Path, reschedule: bool) -> None:
    import shutil

    out = tmp_path / "r"
    shutil.copytree(finished, out)
    code, output = _run("run", "--resume", str(out), "--epochs", "3", *(["--reschedule"] if reschedule else []))
    assert code == 0, output
    records = _metrics(out)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    # `lr` is the rate of an epoch's last step, at fractional epoch e - 1 + 3/4 (4 steps an epoch).
    cosine = lambda t, length: LR * 0.5 * (1 + math.cos(math.pi * min(t / length, 1.0)))  # noqa: E731
    assert records[1]["lr"] == pytest.approx(cosine(1.75, 2))
    if reschedule:
        assert records[2]["lr"] == pytest.approx(cosine(2.75, 3))
        assert "keeps its planned" not in output
    else:
        assert records[2]["lr"] == pytest.approx(0.0, abs=1e-12)  # the 2-epoch schedule has ended
        assert "the cosine schedule keeps its planned 2 epochs" in output and "--reschedule" in output


# --- fail fast ------------------------------------------------------------------------------------------------------


def test_nproc_checks_run_before_torchrun(pack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.cli as cli

    launched = []
    monkeypatch.setattr(cli, "launch_torchrun", lambda *args: launched.append(args) or 0)
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "last.pt").write_bytes(b"a run")
    (tmp_path / "m.onnx").write_bytes(b"an export")
    checks = [(["--batch-size", "1000"], "larger than the 18 training images per process"),
              (["--arch", "resnet19"], "unknown architecture"),
              (["--freeze", "2"], "drop --freeze"),
              (["--sync-bn", "--device", "cpu"], "--sync-bn needs CUDA devices"),
              (["--monitor", "val_auc"], "--monitor val_auc needs a pack split by class"),
              (["--weights", str(tmp_path / "m.onnx")], "an ONNX export (trainer export); --weights takes"),
              (["--out", str(tmp_path / "held")], "already holds a run; continue it with --resume")]
    if not torch.cuda.is_available():
        checks.append((["--device", "cuda"], "CUDA is not available on this machine"))
    for args, message in checks:
        code, output = _run("run", "--pack", str(pack), *RUN, "--nproc", "2", "--out", str(tmp_path / "r"), *args)
        assert code == 1 and message in output and len(output.strip().splitlines()) == 1, output
    assert launched == []
    code, output = _run("run", "--pack", str(pack), *RUN, "--nproc", "2", "--out", str(tmp_path / "r"))
    assert code == 0 and len(launched) == 1, output


def test_a_model_that_cannot_take_the_image_size_fails_before_training(pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    code, output = _run("run", "--pack", str(pack), *RUN, "--arch", "vit_b_16", "--out", str(out))
    assert code == 1 and len(output.strip().splitlines()) == 1, output
    assert "--arch vit_b_16 does not run at --image-size 32" in output and "224" in output
    assert not out.exists()


def test_grad_clip_reaches_the_step(pack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.errors import TrainerError

    seen = []

    def record(*args, **kwargs):
        seen.append(args[3].grad_clip)
        raise TrainerError("recorded")

    monkeypatch.setattr(run_module, "train_one_epoch", record)
    code, output = _run("run", "--pack", str(pack), *RUN, "--grad-clip", "0.5", "--out", str(tmp_path / "r"))
    assert code == 1 and "recorded" in output and seen == [0.5]
    assert build_config({"pack": "p.h5"}).grad_clip is None


@pytest.mark.parametrize("text, where", [("arch: resnet18\nlr: [0.1\nepochs: 3\n", "line 3"),
                                         ("arch: resnet18\n  lr: 1\n", "line 2")])
def test_yaml_errors_keep_their_line(tmp_path: Path, text: str, where: str) -> None:
    (tmp_path / "c.yaml").write_text(text)
    code, output = _run("run", "--config", str(tmp_path / "c.yaml"), "--pack", "p.h5")
    assert code == 1 and where in output and len(output.strip().splitlines()) == 1, output


@pytest.mark.slow
def test_synthetic_runs_say_so(pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    code, output = _run("run", "--pack", str(pack), *RUN, "--backend", "synthetic", "--epochs", "1", "--out", str(out))
    assert code == 0, output
    first = next(line for line in output.splitlines() if "training resnet18" in line)
    assert first.startswith("SYNTHETIC DATA")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["synthetic_data"] is True and summary["backend"] == "synthetic"


@pytest.mark.slow
def test_a_pack_without_val_split_trains_and_says_so(tmp_path: Path) -> None:
    no_val = make_pack(tmp_path, classes=3, per_class=12, seed=5, val_ratio=0.0, test_ratio=0.25)
    out = tmp_path / "r"
    code, output = _run("run", "--pack", str(no_val), *RUN, "--epochs", "2", "--patience", "1", "--out", str(out))
    assert code == 0, output
    assert "has no val split: no early stopping, and best.pt is the last epoch" in output
    records = _metrics(out)
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["val_loss"] is None and r["val_top1"] is None for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_epoch"] == 2 and summary["test_split"] == "test" and summary["test_samples"] == 9
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == 1  # the last epoch's index
    code, output = _run("run", "--pack", str(no_val), *RUN, "--scheduler", "plateau", "--out", str(tmp_path / "p"))
    assert code == 1 and "--scheduler plateau needs a val split" in output


def _tensors(value) -> list[torch.Tensor]:
    """Every tensor inside nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def test_a_checkpoint_holds_cpu_tensors_only_and_loads_without_map_location(tmp_path: Path) -> None:
    # On the CPU every tensor is there anyway; tests/test_cuda.py checks the same on a GPU, where the model,
    # the optimizer state and the generator states start on the device.
    from trainer.checkpoint import make_payload, save_checkpoint

    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    payload = make_payload(model=model, optimizer=optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False),
                           scheduler={"name": "cosine"}, early_stopping={}, epoch=0, config={"arch": "tiny"}, head={},
                           classes=["a", "b", "c"], spec={}, metrics={"val_loss": 1.0})
    tensors = _tensors(payload)
    assert len(tensors) >= len(model.state_dict()) + 2 * len(list(model.parameters()))  # weights, moments, rng
    assert all(t.device.type == "cpu" for t in tensors)
    save_checkpoint(tmp_path / "c.pt", payload)
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)  # no map_location: nothing needs moving
    assert loaded["format"] == "dali-trainer-checkpoint"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["model"][key], value)
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
