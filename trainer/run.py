"""`trainer run`: build the parts from a `RunConfig`, train epoch by epoch, checkpoint, test.

This module wires things together; the step, the epoch and the evaluation live in
`trainer.loop`, and the data in `dali_pipes`, which this module reaches only through
`build_loader`.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dali_pipes import PackReader, PipelineSpec, build_loader
from trainer.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state, unwrap
from trainer.config import RunConfig
from trainer.distributed import DistContext
from trainer.errors import TrainerError
from trainer.loop import EarlyStopping, StepConfig, evaluate, resolve_amp, train_one_epoch
from trainer.metrics import read_metrics, write_json, write_metrics
from trainer.models import build_model, freeze_blocks, set_train_mode
from trainer.optim import Plateau, build_optimizer, lr_factor, set_lr
from trainer.plots import plot_curves
from trainer.progress import Progress

REPORTED_TOPK = 5  # metrics always carry val_top5 / test_top5, whatever --topk says


@dataclass
class TrainingState:
    """Everything that changes during training and goes into a checkpoint."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    early: EarlyStopping
    plateau: Plateau
    frozen: list[nn.Module]
    records: list[dict[str, Any]] = field(default_factory=list)
    next_epoch: int = 0


def default_out_dir(arch: str) -> Path:
    """runs/<arch>-<timestamp>."""
    return Path("runs") / f"{arch}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def prepare_out_dir(out: Path, resume: bool) -> Path:
    """Check (and make) the run folder; a folder holding a run is only reused with --resume."""
    if out.exists() and not out.is_dir():
        raise TrainerError(f"--out {out} is a file; give a folder")
    if resume:
        if not (out / "last.pt").is_file():
            raise TrainerError(f"--resume {out}: nothing to resume (no last.pt there)")
    elif (out / "last.pt").exists():
        raise TrainerError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainerError(f"cannot create run folder {out} ({exc.strerror})") from None
    if not os.access(out, os.W_OK):
        raise TrainerError(f"run folder {out} is not writable")
    return out


def check_pack(reader: PackReader, batch_size: int, world_size: int) -> None:
    """Refuse packs a classifier cannot train on, with the fix."""
    if reader.num_classes < 2:
        raise TrainerError(f"{reader.path}: {reader.num_classes} class; a classifier needs at least 2 class folders")
    counts = reader.split_counts()
    if counts["train"] == 0:
        raise TrainerError(f"{reader.path}: the train split is empty; repack with lower --val-ratio/--test-ratio")
    if counts["val"] == 0:
        raise TrainerError(f"{reader.path}: the val split is empty; repack with --val-ratio above 0 (or give a val/ folder)")
    per_rank = counts["train"] // world_size
    if batch_size > per_rank:
        raise TrainerError(f"--batch-size {batch_size} is larger than the {per_rank} training images per process; lower it")


def build_state(cfg: RunConfig, num_classes: int, device: torch.device, distributed: bool = False) -> TrainingState:
    """Model (with head, weights, frozen blocks), optimizer, scaler and stopping state."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, num_classes, weights=cfg.weights, head=cfg.head, hidden=cfg.hidden,
                        dropout=cfg.dropout, activation=cfg.activation)
    if cfg.sync_bn and distributed:
        if device.type != "cuda":
            raise TrainerError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU kernel); drop it on the CPU")
        # Same parameters and state-dict keys; converted before freezing so frozen blocks hold the new modules.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    frozen = freeze_blocks(model, cfg.freeze)
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, device)
    amp_dtype = resolve_amp(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    early = EarlyStopping(cfg.monitor, cfg.patience, cfg.min_delta)
    plateau = Plateau("min" if cfg.monitor.endswith("loss") else "max", cfg.step_size, cfg.gamma)
    return TrainingState(model, optimizer, scaler, early, plateau, frozen)


def checkpoint_payload(cfg: RunConfig, state: TrainingState, epoch: int, classes: list[str], spec: PipelineSpec) -> dict[str, Any]:
    """The checkpoint after `epoch` completed: plain containers and tensors only."""
    return {
        "model": unwrap(state.model).state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": {"name": cfg.scheduler, "plateau": state.plateau.state_dict()},
        "scaler": state.scaler.state_dict(),
        "epoch": epoch,
        "early_stopping": state.early.state_dict(),
        "rng": rng_state(),
        "config": cfg.to_dict(),
        "classes": list(classes),
        "arch": cfg.arch,
        "head": {"type": cfg.head, "hidden": cfg.hidden, "dropout": cfg.dropout, "activation": cfg.activation},
        "spec": spec.to_dict(),
        "metrics": state.records[-1] if state.records else {},
    }


def restore(state: TrainingState, ckpt: dict[str, Any], out: Path) -> None:
    """Continue from a checkpoint: weights, optimizer, scaler, schedules, RNG, metrics so far."""
    unwrap(state.model).load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scaler.load_state_dict(ckpt["scaler"])
    state.early.load_state_dict(ckpt["early_stopping"])
    state.plateau.load_state_dict(ckpt["scheduler"]["plateau"])
    set_rng_state(ckpt["rng"])
    state.next_epoch = ckpt["epoch"] + 1
    # Lines written after the checkpoint (a crash between the two writes) are dropped.
    state.records = [r for r in read_metrics(out / "metrics.jsonl") if r["epoch"] <= ckpt["epoch"]]


def link_best(out: Path) -> None:
    """best.pt := last.pt, atomically, without writing the bytes twice (a hard link where possible)."""
    tmp = out / ".best.pt.link"
    tmp.unlink(missing_ok=True)
    try:
        os.link(out / "last.pt", tmp)
    except OSError:
        import shutil

        shutil.copyfile(out / "last.pt", tmp)
    os.replace(tmp, out / "best.pt")


def epoch_line(epoch: int, epochs: int, r: dict[str, Any], best: bool) -> str:
    """The one summary line printed after each epoch."""
    return (f"epoch {epoch + 1}/{epochs}  train loss {r['train_loss']:.4f} top1 {r['train_top1']:.3f}  |  "
            f"val loss {r['val_loss']:.4f} top1 {r['val_top1']:.3f} top5 {r['val_top5']:.3f}  |  lr {r['lr']:.2e}  "
            f"{r['images_per_second']:,.0f} img/s  data wait {100 * r['data_wait_fraction']:.0f}%  {r['epoch_seconds']:.1f}s"
            + ("  * best" if best else ""))


def topk_keys(result: dict[str, Any], prefix: str, topk: int, num_classes: int) -> dict[str, float]:
    """prefix_top1..prefix_topK for K = max(topk, 5); k >= num_classes is 1.0 by definition."""
    return {f"{prefix}_top{k}": result[f"top{k}"] if k <= num_classes else 1.0 for k in range(1, max(topk, REPORTED_TOPK) + 1)}


def fit(cfg: RunConfig, ctx: DistContext, device: torch.device, *, resume: bool = False,
        echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train as `cfg` says; returns the summary also written to summary.json."""
    say = echo if ctx.is_main else (lambda _line: None)
    reader = PackReader(cfg.pack)
    check_pack(reader, cfg.batch_size, ctx.world_size)
    out = Path(cfg.out)
    spec = PipelineSpec(image_size=cfg.image_size)
    state = build_state(cfg, reader.num_classes, device, distributed=ctx.enabled)
    if resume:
        restore(state, load_checkpoint(out / "last.pt"), out)
        say(f"resuming {out} after epoch {state.next_epoch}")
    if ctx.is_main:
        write_json(out / "config.json", cfg.to_dict())
    train_model = _wrap(state.model, cfg, ctx, device)
    amp_dtype = resolve_amp(cfg.amp, device)
    loader_args = dict(backend=cfg.backend, batch_size=cfg.batch_size, device=device, num_workers=cfg.workers, seed=cfg.seed,
                       rank=ctx.rank, world_size=ctx.world_size, spec=spec, dtype=torch.float32)
    train_loader = build_loader(reader, "train", train=True, **loader_args)
    val_loader = build_loader(reader, "val", train=False, **loader_args)
    say(f"training {cfg.arch} on {reader.path} ({reader.num_classes} classes, {train_loader.num_samples * ctx.world_size} train images "
        f"per epoch) with backend {train_loader.backend} on {device}, amp {amp_dtype or 'off'}, world size {ctx.world_size}, "
        f"global batch {cfg.batch_size * ctx.world_size} -> {out}")
    step = StepConfig(nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), amp_dtype, state.scaler, cfg.log_every)
    start = time.perf_counter()
    stop_reason = f"reached --epochs {cfg.epochs}"
    stopped_early = state.early.should_stop
    if stopped_early:
        stop_reason = "early stopping: " + state.early.reason()
    epoch = state.next_epoch
    while epoch < cfg.epochs and not stopped_early:
        record = _run_epoch(cfg, ctx, state, train_model, train_loader, val_loader, step, epoch, reader.num_classes, device, amp_dtype)
        improved = state.early.update(record[cfg.monitor], epoch)
        if cfg.scheduler == "plateau":
            state.plateau.step(record[cfg.monitor])
        state.records.append(record)
        if ctx.is_main:
            write_metrics(out / "metrics.jsonl", state.records)
            save_checkpoint(out / "last.pt", checkpoint_payload(cfg, state, epoch, reader.classes, spec))
            if improved:
                link_best(out)
        ctx.barrier()
        say(epoch_line(epoch, cfg.epochs, record, improved))
        if state.early.should_stop:
            stopped_early, stop_reason = True, "early stopping: " + state.early.reason()
        epoch += 1
    say(f"stopped: {stop_reason}")
    summary = _finish(cfg, ctx, state, reader, out, device, amp_dtype, loader_args)
    summary.update(stopped_early=stopped_early, stop_reason=stop_reason, epochs_run=len(state.records),
                   train_seconds=sum(r["epoch_seconds"] for r in state.records), wall_seconds_this_session=time.perf_counter() - start)
    if ctx.is_main:
        write_json(out / "summary.json", summary)
        plot_curves(state.records, out / "curves.png", title=f"{cfg.arch} on {Path(cfg.pack).name}")
        say(f"test loss {summary['test_loss']:.4f} top1 {summary['test_top1']:.3f} top5 {summary['test_top5']:.3f} "
            f"(best epoch {summary['best_epoch'] + 1}); wrote {out}/summary.json, metrics.jsonl, curves.png, best.pt, last.pt")
    return summary


def _wrap(model: nn.Module, cfg: RunConfig, ctx: DistContext, device: torch.device) -> nn.Module:
    wrapped = model
    if ctx.enabled:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def _run_epoch(cfg: RunConfig, ctx: DistContext, state: TrainingState, train_model: nn.Module, train_loader: Any,
               val_loader: Any, step: StepConfig, epoch: int, num_classes: int, device: torch.device,
               amp_dtype: torch.dtype | None) -> dict[str, Any]:
    train_loader.set_epoch(epoch)
    val_loader.set_epoch(epoch)
    steps = len(train_loader)

    def set_lr_at(i: int) -> float:
        scale = state.plateau.scale
        lr = cfg.lr * lr_factor(cfg.scheduler, epoch + i / steps, epochs=cfg.epochs, step_size=cfg.step_size, gamma=cfg.gamma,
                                warmup_epochs=cfg.warmup_epochs, plateau_scale=scale)
        set_lr(state.optimizer, lr)
        return lr

    interactive = ctx.is_main and sys.stderr.isatty()
    progress = Progress(train_loader.num_samples * ctx.world_size, f"epoch {epoch + 1}/{cfg.epochs}", enabled=interactive)
    train = train_one_epoch(train_model, train_loader, state.optimizer, step, device=device, set_lr=set_lr_at,
                            set_train_mode=lambda: set_train_mode(state.model, state.frozen), progress=progress)
    progress.close()
    val_start = time.perf_counter()
    ctx.broadcast_buffers(unwrap(train_model))
    val = evaluate(unwrap(train_model), val_loader, device=device, num_classes=num_classes, topk=max(cfg.topk, REPORTED_TOPK),
                   amp_dtype=amp_dtype, all_reduce=ctx.all_reduce)
    train_sums = ctx.all_reduce(torch.tensor([train["train_loss"] * train["train_samples"], train["train_top1"] * train["train_samples"],
                                              float(train["train_samples"])], dtype=torch.float64))
    n = float(train_sums[2])
    return {
        "epoch": epoch,
        "train_loss": float(train_sums[0]) / n,
        "train_top1": float(train_sums[1]) / n,
        "val_loss": val["loss"],
        **topk_keys(val, "val", cfg.topk, num_classes),
        "lr": train["lr"],
        "epoch_seconds": train["epoch_seconds"] + (time.perf_counter() - val_start),
        "train_seconds": train["epoch_seconds"],
        "images_per_second": train["images_per_second"] * ctx.world_size,
        "data_wait_fraction": train["data_wait_fraction"],
    }


def _finish(cfg: RunConfig, ctx: DistContext, state: TrainingState, reader: PackReader, out: Path, device: torch.device,
            amp_dtype: torch.dtype | None, loader_args: dict[str, Any]) -> dict[str, Any]:
    """Evaluate best.pt on the test split (the val split when there is no test split)."""
    best = load_checkpoint(out / "best.pt", map_location=device)
    unwrap(state.model).load_state_dict(best["model"])
    split = "test" if reader.split_counts()["test"] > 0 else "val"
    loader = build_loader(reader, split, train=False, **loader_args)
    result = evaluate(unwrap(state.model), loader, device=device, num_classes=reader.num_classes,
                      topk=max(cfg.topk, REPORTED_TOPK), amp_dtype=amp_dtype, all_reduce=ctx.all_reduce)
    return {
        "best_epoch": int(best["epoch"]),
        "best_" + cfg.monitor: state.early.best,
        "test_split": split,
        "test_loss": result["loss"],
        **topk_keys(result, "test", cfg.topk, reader.num_classes),
        "test_samples": result["num_samples"],
    }
