"""Fault injection, for real: signals, kill -9, non-finite losses, full and read-only disks.

Faults are injected from outside the project's code: real signals to real processes, a
`sitecustomize` module on PYTHONPATH that patches a library call in the child, and small
tmpfs mounts (as root; otherwise a simulated write failure stands in).
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_pack

from trainer.cli import main as trainer_main

REPO = Path(__file__).resolve().parents[1]
RUN = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "8", "--backend", "torch",
       "--workers", "0", "--log-every", "1", "--optimizer", "adamw", "--scheduler", "step", "--head", "mlp",
       "--hidden", "16", "--patience", "0"]
EMA = ["--ema", "0.9"]  # the averaged weights must survive a stop and a kill as exactly as the weights do


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pack(tmp_path_factory.mktemp("faults"), classes=3, per_class=20, seed=3)


def _hook(tmp_path: Path, code: str) -> dict[str, str]:
    folder = tmp_path / "hook"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(textwrap.dedent(code))
    return {"PYTHONPATH": os.pathsep.join([str(folder), str(REPO)])}


def _trainer(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


SIGNAL_AT_STEP = """
    import os, signal, torch
    _calls = {{"n": 0}}
    _forward = torch.nn.CrossEntropyLoss.forward
    def forward(self, *args, **kwargs):
        if self.reduction == "mean":  # training steps only; evaluation sums
            _calls["n"] += 1
            if _calls["n"] == {step}:
                os.kill(os.getpid(), signal.{signal})
        return _forward(self, *args, **kwargs)
    torch.nn.CrossEntropyLoss.forward = forward
"""


@pytest.mark.slow
@pytest.mark.parametrize("signame, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_mid_epoch_writes_a_resumable_position(pack: Path, tmp_path: Path, signame: str, code: int) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    assert _trainer("run", "--pack", str(pack), *RUN, *EMA, "--epochs", "2", "--out", str(full)).returncode == 0
    # 36 training images, batch 8: 4 steps an epoch; step 6 is the 2nd step of epoch 2.
    env = _hook(tmp_path, SIGNAL_AT_STEP.format(step=6, signal=signame))
    stopped = _trainer("run", "--pack", str(pack), *RUN, *EMA, "--epochs", "2", "--out", str(part), env=env)
    assert stopped.returncode == code, stopped.stderr[-2000:]
    assert f"stopped by {signame} at epoch 2, step 2" in stopped.stderr and "--resume" in stopped.stderr
    ckpt = torch.load(part / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["position"]["epoch"] == 1 and ckpt["position"]["step"] == 2
    assert ckpt["ema"]["updates"] == 6  # one update per optimizer step, up to the stop
    resumed = _trainer("run", "--resume", str(part))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _metrics(full), _metrics(part)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_loss_ema", "val_top1_ema"):
            assert round(ra[key], 4) == round(rb[key], 4), (ra["epoch"], key)


@pytest.mark.slow
def test_kill_9_while_training_then_resume(pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "run", "--pack", str(pack), *RUN, *EMA, "--epochs", "5",
                             "--out", str(out)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(0).uniform(0.0, 1.5))
    proc.kill()
    proc.wait()
    for name in ("last.pt", "best.pt"):
        torch.load(out / name, weights_only=True)  # never half-written
    resumed = _trainer("run", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["epoch"] for r in _metrics(out)] == list(range(1, 6))
    assert all(isinstance(r["val_loss_ema"], float) for r in _metrics(out))
    # 4 optimizer steps an epoch: the average went on from the checkpoint's count rather than starting again.
    assert torch.load(out / "last.pt", weights_only=True)["ema"]["updates"] == 5 * 4
    assert not list(out.glob(".*"))  # no temporaries left behind
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 5


NAN_AT_STEP = """
    import torch
    _calls = {"n": 0}
    _forward = torch.nn.CrossEntropyLoss.forward
    def forward(self, *args, **kwargs):
        loss = _forward(self, *args, **kwargs)
        if self.reduction == "mean":
            _calls["n"] += 1
            if _calls["n"] == 6:
                return loss * float("nan")
        return loss
    torch.nn.CrossEntropyLoss.forward = forward
"""


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_the_checkpoints(pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _trainer("run", "--pack", str(pack), *RUN, "--epochs", "3", "--out", str(out),
                      env=_hook(tmp_path, NAN_AT_STEP))
    assert result.returncode == 1
    assert "non-finite loss at step 1 of this epoch" in result.stderr
    assert ("Traceback" not in result.stderr
            and result.stderr.strip().splitlines()[-1].startswith("Error: non-finite loss"))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_skip_nonfinite_skips_and_counts(pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _trainer("run", "--pack", str(pack), *RUN, "--epochs", "2", "--skip-nonfinite", "--out", str(out),
                      env=_hook(tmp_path, NAN_AT_STEP))
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["skipped_steps"] for r in _metrics(out)] == [0, 1]
    summary = json.loads((out / "summary.json").read_text())
    # NaN is written as null, so a number here is a finite loss.
    assert summary["skipped_steps"] == 1 and isinstance(summary["test_loss"], float)
    assert math.isfinite(summary["test_loss"])


def _mount_tmpfs(target: Path, options: str) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    return os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True).returncode == 0


def _umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], capture_output=True)


@pytest.mark.slow
def test_disk_full_keeps_the_previous_checkpoint(pack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = tmp_path / "probe"
    assert _trainer("run", "--pack", str(pack), *RUN, "--epochs", "1", "--out", str(probe)).returncode == 0
    size = (probe / "last.pt").stat().st_size
    disk = tmp_path / "small"
    # Room for one checkpoint and half of a second: the second save runs out of space.
    if _mount_tmpfs(disk, f"size={int(size * 1.5) + (1 << 20)}"):
        try:
            result = _trainer("run", "--pack", str(pack), *RUN, "--epochs", "3", "--out", str(disk / "run"))
            assert result.returncode == 1
            assert "Traceback" not in result.stderr
            message = result.stderr.strip().splitlines()[-1:]  # progress lines of epoch 1 come first
            ckpt = torch.load(disk / "run" / "last.pt", weights_only=True)
            leftovers = [p.name for p in (disk / "run").glob(".*")]
        finally:
            _umount(disk)
    else:  # not root, or no mount here: simulate the failing write instead
        import trainer.checkpoint as checkpoint

        real_write, calls = checkpoint.atomic_write_bytes, {"n": 0}

        def failing_write(path, write):  # the second last.pt cannot be written
            if Path(path).name == "last.pt":
                calls["n"] += 1
                if calls["n"] == 2:
                    raise OSError(28, "No space left on device")
            return real_write(path, write)

        monkeypatch.setattr(checkpoint, "atomic_write_bytes", failing_write)
        result = CliRunner().invoke(trainer_main, ["run", "--pack", str(pack), *RUN, "--epochs", "3",
                                                   "--out", str(disk / "run")])
        assert result.exit_code == 1
        message = result.output.strip().splitlines()[-1:]  # the progress lines precede the error
        ckpt = torch.load(disk / "run" / "last.pt", weights_only=True)
        leftovers = [p.name for p in (disk / "run").glob(".*")]
    assert (len(message) == 1 and "No space left on device" in message[0]
            and "previous checkpoint is intact" in message[0])
    assert ckpt["epoch"] == 0 and leftovers == []


@pytest.mark.slow
def test_read_only_output_folder_is_one_line(pack: Path, tmp_path: Path) -> None:
    disk = tmp_path / "ro"
    if not _mount_tmpfs(disk, "ro,size=64k"):
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        for out in (disk / "run", disk):
            result = _trainer("run", "--pack", str(pack), *RUN, "--epochs", "1", "--out", str(out))
            assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
            assert "not writable" in result.stderr or "cannot create run folder" in result.stderr
    finally:
        _umount(disk)


def test_output_that_is_a_file(pack: Path, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    result = CliRunner().invoke(trainer_main, ["run", "--pack", str(pack), *RUN, "--out", str(tmp_path / "f")])
    assert result.exit_code == 1 and "is a file" in result.output and (tmp_path / "f").read_text() == "x"


def test_existing_run_is_not_overwritten(pack: Path, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"keep")
    result = CliRunner().invoke(trainer_main, ["run", "--pack", str(pack), *RUN, "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "--resume" in result.output
    assert (tmp_path / "run" / "last.pt").read_bytes() == b"keep"


@pytest.mark.parametrize("args, message", [
    (["eval", "--checkpoint", "{ckpt}", "--pack", "{pack}", "--topk", "0"], "0 is not in the range"),
    (["eval", "--checkpoint", "{tmp}/missing.pt", "--pack", "{pack}"], "no such checkpoint"),
    (["eval", "--checkpoint", "{tmp}/not.pt", "--pack", "{pack}"], "not a readable checkpoint"),
    (["eval", "--checkpoint", "{ckpt}", "--pack", "{tmp}/missing.h5"], "no such file"),
    (["predict", "--checkpoint", "{tmp}/not.pt", "{pack}"], "not a readable checkpoint"),
    (["info", "{tmp}/not.pt"], "not a readable HDF5 pack"),
    (["run", "--pack", "{pack}", "--lr", "-1"], "not in the range"),
    (["run", "--pack", "{pack}", "--optimizer", "lion"], "'lion' is not one of"),
])
def test_bad_input_is_one_line_and_exits_non_zero(pack: Path, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "not.pt").write_text("garbage")
    fill = {"pack": str(pack), "tmp": str(tmp_path), "ckpt": str(tmp_path / "not.pt")}
    result = CliRunner().invoke(trainer_main, [a.format(**fill) for a in args])
    assert result.exit_code in (1, 2) and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
