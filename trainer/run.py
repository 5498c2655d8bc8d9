"""`trainer run`: build the parts from a `RunConfig`, train epoch by epoch, checkpoint, test.

This module wires things together; the step, the epoch and the evaluation live in
`trainer.loop`, and the data in `dali_pipes`, which this module reaches only through
`build_loader`.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dali_pipes import PackReader, PipelineSpec, build_loader
from trainer.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state, unwrap
from trainer.config import RunConfig
from trainer.distributed import DistContext
from trainer.errors import RunInterrupted, TrainerError
from trainer.loop import EarlyStopping, EpochResult, EpochState, StepConfig, evaluate, resolve_amp, train_one_epoch
from trainer.metrics import read_metrics, write_json, write_metrics
from trainer.models import build_model, freeze_blocks, set_train_mode
from trainer.optim import Plateau, build_optimizer, lr_factor, set_lr
from trainer.plots import plot_curves
from trainer.progress import Progress
from trainer.signals import StopSignals
from trainer.tensorboard import open_tensorboard

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
    position: dict[str, Any] | None = None  # mid-epoch resume point: epoch, step, partial sums


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
    # Temporaries of a write that was killed (kill -9, power loss) belong to no one now.
    for stale in out.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    (out / ".best.pt.link").unlink(missing_ok=True)
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
    train_counts = np.bincount(reader.labels[reader.split_indices("train")], minlength=reader.num_classes)
    missing = [reader.classes[i] for i in np.flatnonzero(train_counts == 0)]
    if missing:
        raise TrainerError(f"{reader.path}: class {missing[0]!r}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''} "
                           "has no training image; add images to its train folder or repack without given splits")
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
    state.position = ckpt.get("position")
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
            + (f"  skipped {r['skipped_samples']}" if r.get("skipped_samples") else "")
            + ("  * best" if best else ""))


def topk_keys(result: dict[str, Any], prefix: str, topk: int, num_classes: int) -> dict[str, float]:
    """prefix_top1..prefix_topK for K = max(topk, 5); k >= num_classes is 1.0 by definition."""
    return {f"{prefix}_top{k}": result[f"top{k}"] if k <= num_classes else 1.0 for k in range(1, max(topk, REPORTED_TOPK) + 1)}


@dataclass
class RunContext:
    """What stays fixed during a run: configuration, placement, data, and the step."""

    cfg: RunConfig
    ctx: DistContext
    device: torch.device
    reader: PackReader
    spec: PipelineSpec
    out: Path
    amp_dtype: torch.dtype | None
    loader_args: dict[str, Any]
    say: Callable[[str], None]


def fit(cfg: RunConfig, ctx: DistContext, device: torch.device, *, resume: bool = False,
        echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train as `cfg` says; returns the summary also written to summary.json.

    SIGINT or SIGTERM ends the current step, writes a resumable mid-epoch last.pt and
    raises `RunInterrupted` (exit status 130 or 143).
    """
    reader = PackReader(cfg.pack)
    check_pack(reader, cfg.batch_size, ctx.world_size)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels once
    spec = PipelineSpec(image_size=cfg.image_size)
    amp_dtype = resolve_amp(cfg.amp, device)
    loader_args = dict(backend=cfg.backend, batch_size=cfg.batch_size, device=device, num_workers=cfg.workers, seed=cfg.seed,
                       rank=ctx.rank, world_size=ctx.world_size, spec=spec, dtype=torch.float32)
    run = RunContext(cfg, ctx, device, reader, spec, Path(cfg.out), amp_dtype, loader_args, echo if ctx.is_main else (lambda _: None))
    state = build_state(cfg, reader.num_classes, device, distributed=ctx.enabled)
    if resume:
        restore(state, load_checkpoint(run.out / "last.pt"), run.out)
        where = f"epoch {state.next_epoch + 1}, step {state.position['step']}" if state.position else f"epoch {state.next_epoch + 1}"
        run.say(f"resuming {run.out} at {where}")
    if ctx.is_main:
        write_json(run.out / "config.json", cfg.to_dict())
    start = time.perf_counter()
    with StopSignals() as signals:
        stopped_early, stop_reason = _train(run, state, signals)
    run.say(f"stopped: {stop_reason}")
    summary = _finish(cfg, ctx, state, reader, run.out, device, amp_dtype, loader_args)
    summary.update(stopped_early=stopped_early, stop_reason=stop_reason, epochs_run=len(state.records),
                   train_seconds=sum(r["epoch_seconds"] for r in state.records),
                   skipped_steps=sum(r.get("skipped_steps", 0) for r in state.records),
                   wall_seconds_this_session=time.perf_counter() - start)
    if ctx.is_main:
        write_json(run.out / "summary.json", summary)
        plot_curves(state.records, run.out / "curves.png", title=f"{cfg.arch} on {Path(cfg.pack).name}")
        run.say(f"test loss {summary['test_loss']:.4f} top1 {summary['test_top1']:.3f} top5 {summary['test_top5']:.3f} "
                f"(best epoch {summary['best_epoch'] + 1}); wrote {run.out}/summary.json, metrics.jsonl, curves.png, best.pt, last.pt")
    return summary


def _train(run: RunContext, state: TrainingState, signals: StopSignals) -> tuple[bool, str]:
    """The epoch loop; returns (stopped early, why training stopped)."""
    cfg, ctx = run.cfg, run.ctx
    if state.early.should_stop:
        return True, "early stopping: " + state.early.reason()
    train_model = _wrap(state.model, cfg, ctx, run.device)
    train_loader = build_loader(run.reader, "train", train=True, **run.loader_args)
    val_loader = build_loader(run.reader, "val", train=False, **run.loader_args)
    run.say(f"training {cfg.arch} on {run.reader.path} ({run.reader.num_classes} classes, {train_loader.num_samples * ctx.world_size} "
            f"train images per epoch) with backend {train_loader.backend} on {run.device}, amp {run.amp_dtype or 'off'}, "
            f"world size {ctx.world_size}, global batch {cfg.batch_size * ctx.world_size} -> {run.out}")
    step = StepConfig(nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), run.amp_dtype, state.scaler, cfg.log_every,
                      skip_nonfinite=cfg.skip_nonfinite)
    stop_requested = _stop_check(signals, ctx, cfg.log_every)
    tb = open_tensorboard(cfg.tensorboard and ctx.is_main, run.out / "tb", run.spec, len(train_loader))
    for epoch in range(state.next_epoch, cfg.epochs):
        epoch_step = dataclasses.replace(step, on_log=tb.step_hook(epoch)) if tb is not None else step
        outcome = _train_epoch(run, state, train_model, train_loader, epoch_step, epoch, stop_requested)
        if outcome.interrupted:
            _save_position(run, state, epoch, outcome)
            raise RunInterrupted(f"stopped by {signals.name} at epoch {epoch + 1}, step {outcome.next_step}; "
                                 f"continue with: trainer run --resume {run.out}", signals.exit_code)
        record = _validate(run, state, train_model, val_loader, epoch, outcome, len(getattr(train_loader, "skipped", ())))
        improved = state.early.update(record[cfg.monitor], epoch)
        if cfg.scheduler == "plateau":
            state.plateau.step(record[cfg.monitor])
        state.records.append(record)
        if tb is not None:
            tb.log_epoch(epoch + 1, record)
        state.position = None
        if ctx.is_main:
            write_metrics(run.out / "metrics.jsonl", state.records)
            save_checkpoint(run.out / "last.pt", checkpoint_payload(cfg, state, epoch, run.reader.classes, run.spec))
            if improved:
                link_best(run.out)
        ctx.barrier()
        run.say(epoch_line(epoch, cfg.epochs, record, improved))
        if state.early.should_stop:
            return True, "early stopping: " + state.early.reason()
    return False, f"reached --epochs {cfg.epochs}"


def _stop_check(signals: StopSignals, ctx: DistContext, log_every: int) -> Callable[[int], bool]:
    if not ctx.enabled:
        return lambda _step: signals.received is not None

    # Ranks must stop at the same step, so they agree every `log_every` steps (one tiny all-reduce).
    def agreed(step_index: int) -> bool:
        if (step_index + 1) % log_every:
            return False
        flag = torch.tensor([1.0 if signals.received is not None else 0.0])
        return bool(ctx.all_reduce(flag.to(ctx_device(ctx))).item() > 0)

    return agreed


def ctx_device(ctx: DistContext) -> torch.device:
    """The device collectives run on: the rank's GPU under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _save_position(run: RunContext, state: TrainingState, epoch: int, outcome: EpochResult) -> None:
    """A mid-epoch last.pt: the last completed epoch's state plus where this epoch stopped."""
    if not run.ctx.is_main:
        return
    payload = checkpoint_payload(run.cfg, state, epoch - 1, run.reader.classes, run.spec)
    payload["position"] = {"epoch": epoch, "step": outcome.next_step, "partial": outcome.state.state_dict()}
    save_checkpoint(run.out / "last.pt", payload)


def _wrap(model: nn.Module, cfg: RunConfig, ctx: DistContext, device: torch.device) -> nn.Module:
    wrapped = model
    if ctx.enabled:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def _train_epoch(run: RunContext, state: TrainingState, train_model: nn.Module, train_loader: Any, step: StepConfig,
                 epoch: int, stop_requested: Callable[[int], bool]) -> EpochResult:
    cfg = run.cfg
    position = state.position if state.position and state.position["epoch"] == epoch else None
    first_step = position["step"] if position else 0
    train_loader.set_epoch(epoch, first_step)
    steps = len(train_loader)  # a whole epoch's batches, also when resumed mid-epoch

    def set_lr_at(i: int) -> float:
        lr = cfg.lr * lr_factor(cfg.scheduler, epoch + i / steps, epochs=cfg.epochs, step_size=cfg.step_size, gamma=cfg.gamma,
                                warmup_epochs=cfg.warmup_epochs, plateau_scale=state.plateau.scale)
        set_lr(state.optimizer, lr)
        return lr

    # Live on a terminal; in a log, one plain line when the epoch ends (Progress decides).
    progress = Progress(train_loader.num_samples * run.ctx.world_size, f"epoch {epoch + 1}/{cfg.epochs}", enabled=run.ctx.is_main,
                        scale=run.ctx.world_size)
    resume_state = EpochState.from_state_dict(position["partial"], run.device) if position else None
    outcome = train_one_epoch(train_model, train_loader, state.optimizer, step, device=run.device, set_lr=set_lr_at,
                              set_train_mode=lambda: set_train_mode(state.model, state.frozen), progress=progress,
                              first_step=first_step, resume_state=resume_state, stop_requested=stop_requested)
    progress.close()
    return outcome


def _validate(run: RunContext, state: TrainingState, train_model: nn.Module, val_loader: Any, epoch: int,
              outcome: EpochResult, skipped: int) -> dict[str, Any]:
    """The epoch's record: train figures and `skipped` (this rank's unreadable train samples) summed over ranks, val figures."""
    ctx = run.ctx
    train = outcome.metrics
    val_start = time.perf_counter()
    val_loader.set_epoch(epoch)
    ctx.broadcast_buffers(unwrap(train_model))
    val = evaluate(unwrap(train_model), val_loader, device=run.device, num_classes=run.reader.num_classes,
                   topk=max(run.cfg.topk, REPORTED_TOPK), amp_dtype=run.amp_dtype, all_reduce=ctx.all_reduce)
    train_sums = ctx.all_reduce(torch.tensor([train["train_loss"] * train["train_samples"], train["train_top1"] * train["train_samples"],
                                              float(train["train_samples"]), float(skipped)], dtype=torch.float64).to(ctx_device(ctx)))
    n = float(train_sums[2])
    return {
        "epoch": epoch,
        "train_loss": float(train_sums[0]) / n,
        "train_top1": float(train_sums[1]) / n,
        "val_loss": val["loss"],
        **topk_keys(val, "val", run.cfg.topk, run.reader.num_classes),
        "lr": train["lr"],
        "epoch_seconds": train["epoch_seconds"] + (time.perf_counter() - val_start),
        "train_seconds": train["epoch_seconds"],
        "images_per_second": train["images_per_second"] * ctx.world_size,
        "data_wait_fraction": train["data_wait_fraction"],
        "skipped_steps": train["skipped_steps"],
        "skipped_samples": int(train_sums[3]),
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
        "test_skipped_samples": result.get("skipped_samples", 0),
    }
