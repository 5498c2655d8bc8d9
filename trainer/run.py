"""`trainer run`: build the parts from a `RunConfig`, train epoch by epoch, checkpoint, test.

This module wires things together; the step, the epoch and the evaluation live in
`trainer.loop`, what a checkpoint holds in `trainer.checkpoint`, the checks before
training in `trainer.checks`, the run folder in `trainer.run_folder`, and the data in
`dali_pipes`, which this module reaches only through `build_loader`.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dali_pipes import PackReader, PipelineSpec, Progress, build_loader, choose_backend, split_kind
from trainer.checkpoint import (Checkpoint, Position, load_checkpoint, make_payload, read_payload, save_checkpoint,
                                set_rng_state, unwrap)
from trainer.checks import check_forward, check_freeze, check_pack, dropped_note
from trainer.config import RunConfig
from trainer.distributed import DistContext
from trainer.embedding import validation_by_verification
from trainer.errors import RunInterrupted, TrainerError
from trainer.loop import EarlyStopping, EpochResult, EpochState, StepConfig, evaluate, resolve_amp, train_one_epoch
from trainer.metrics import read_metrics, write_json, write_metrics
from trainer.models import build_model, freeze_blocks, set_train_mode, takes_labels
from trainer.optim import Plateau, build_optimizer, lr_factor, set_lr
from trainer.plots import plot_curves
from trainer.run_folder import link_best
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
    schedule_epochs: int  # the length the learning-rate schedule was planned for (see `resume_schedule`)
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl: "epoch" counts from 1
    next_epoch: int = 0  # 0-based index of the next epoch to train
    position: Position | None = None  # mid-epoch resume point


def build_state(cfg: RunConfig, num_classes: int, device: torch.device, distributed: bool = False,
                amp_dtype: torch.dtype | None | str = "auto") -> TrainingState:
    """Model (with head, weights, frozen blocks), optimizer, scaler and stopping state.

    `amp_dtype` is the run's resolved autocast dtype ("auto": resolve `cfg.amp` here).
    """
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, num_classes, weights=cfg.weights, head=cfg.head, hidden=cfg.hidden,
                        dropout=cfg.dropout, activation=cfg.activation, embedding_dim=cfg.embedding_dim, margin=cfg.margin,
                        scale=cfg.scale)
    if cfg.sync_bn and distributed:
        if device.type != "cuda":
            raise TrainerError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU kernel); drop it on the CPU")
        # Same parameters and state-dict keys; converted before freezing so frozen blocks hold the new modules.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    frozen = freeze_blocks(model, cfg.freeze)
    check_freeze(cfg, frozen)
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, device)
    if isinstance(amp_dtype, str):
        amp_dtype = resolve_amp(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    early = EarlyStopping(cfg.monitor, cfg.patience, cfg.min_delta)
    plateau = Plateau("min" if cfg.monitor.endswith("loss") else "max", cfg.step_size, cfg.gamma)
    return TrainingState(model, optimizer, scaler, early, plateau, frozen, schedule_epochs=cfg.epochs)


def checkpoint_payload(run: "RunContext", state: TrainingState, epoch: int, position: Position | None = None) -> dict[str, Any]:
    """The checkpoint after epoch index `epoch` completed (see `trainer.checkpoint.make_payload`)."""
    return make_payload(model=state.model, optimizer=state.optimizer, scaler=state.scaler,
                        scheduler={"name": run.cfg.scheduler, "plateau": state.plateau.state_dict(), "epochs": state.schedule_epochs},
                        early_stopping=state.early.state_dict(), epoch=epoch, config=run.cfg.to_dict(), classes=run.reader.classes,
                        spec=run.spec.to_dict(), metrics=state.records[-1] if state.records else {}, position=position)


def restore(state: TrainingState, ckpt: Checkpoint, records: list[dict[str, Any]]) -> None:
    """Continue from a checkpoint: weights, optimizer, scaler, schedules, RNG, and the run's `records` so far.

    `records` are metrics.jsonl's lines; those of a run that counted epochs from 0 are
    renumbered from 1, and lines written after the checkpoint (a crash between the two
    writes) are dropped.
    """
    unwrap(state.model).load_state_dict(ckpt.model)
    state.optimizer.load_state_dict(ckpt.optimizer)
    state.scaler.load_state_dict(ckpt.scaler)
    state.early.load_state_dict(ckpt.early_stopping)
    state.plateau.load_state_dict(ckpt.scheduler["plateau"])
    set_rng_state(ckpt.rng)
    state.next_epoch = ckpt.epoch + 1
    state.position = ckpt.position
    state.schedule_epochs = ckpt.schedule_epochs
    shift = 1 - ckpt.metrics_epoch_base
    state.records = [{**r, "epoch": r["epoch"] + shift} for r in records if r["epoch"] + shift <= ckpt.epoch + 1]


def resume_schedule(cfg: RunConfig, planned: int, reschedule: bool) -> tuple[int, str | None]:
    """The schedule length of a resumed run, and a line to say when it differs from --epochs.

    The rule: the schedule keeps the length it was planned for, so a larger --epochs
    adds epochs after it (cosine stays at its end value) instead of moving the learning
    rate back up; `--reschedule` plans it over the new --epochs instead.
    """
    if reschedule or planned == cfg.epochs:
        return cfg.epochs, None
    if cfg.scheduler != "cosine":  # step, plateau and none do not depend on the run's length
        return planned, None
    return planned, (f"the cosine schedule keeps its planned {planned} epochs (lr {cfg.lr * lr_factor('cosine', planned, epochs=planned, step_size=cfg.step_size, gamma=cfg.gamma, warmup_epochs=cfg.warmup_epochs):.2e} "
                     f"after epoch {planned}); pass --reschedule to plan it over --epochs {cfg.epochs}")


def epoch_line(epoch: int, epochs: int, r: dict[str, Any], best: bool) -> str:
    """The one summary line printed after each epoch."""
    if "val_auc" in r:  # a class-split pack: validated by verification
        val = f"val auc {r['val_auc']:.4f} accuracy {r['val_accuracy']:.3f} eer {r['val_eer']:.3f}"
    elif r["val_loss"] is None:
        val = "val -"
    else:
        val = f"val loss {r['val_loss']:.4f} top1 {r['val_top1']:.3f} top5 {r['val_top5']:.3f}"
    return (f"epoch {epoch + 1}/{epochs}  train loss {r['train_loss']:.4f} top1 {r['train_top1']:.3f}  |  "
            f"{val}  |  lr {r['lr']:.2e}  "
            f"{r['images_per_second']:,.0f} img/s  data wait {100 * r['data_wait_fraction']:.0f}%  {r['epoch_seconds']:.1f}s"
            + (f"  skipped {r['skipped_samples']}" if r.get("skipped_samples") else "")
            + ("  * best" if best else ""))


def topk_keys(result: dict[str, Any], prefix: str, topk: int, num_classes: int) -> dict[str, float]:
    """prefix_top1..prefix_topK for K = max(topk, 5); k >= num_classes is 1.0 by definition."""
    if result["loss"] is None:  # nothing was measured (no val split)
        return {f"{prefix}_top{k}": None for k in range(1, max(topk, REPORTED_TOPK) + 1)}
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
    backend: str  # the concrete backend, resolved once
    say: Callable[[str], None]

    def loader(self, split: str, train: bool) -> Any:
        """This rank's loader of `split`."""
        return build_loader(self.reader, split, train=train, backend=self.backend, batch_size=self.cfg.batch_size,
                            device=self.device, num_workers=self.cfg.workers, seed=self.cfg.seed, rank=self.ctx.rank,
                            world_size=self.ctx.world_size, spec=self.spec, dtype=torch.float32)


def fit(cfg: RunConfig, ctx: DistContext, device: torch.device, *, resume: bool = False, reschedule: bool = False,
        echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train as `cfg` says; returns the summary also written to summary.json.

    SIGINT or SIGTERM ends the current step, writes a resumable mid-epoch last.pt and
    raises `RunInterrupted` (exit status 130 or 143). Resuming a finished run does no
    work and returns its summary.
    """
    reader = PackReader(cfg.pack)
    check_pack(reader, cfg.batch_size, ctx.world_size, cfg.scheduler)
    check_monitor(cfg, reader)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels once
    backend, note = choose_backend(cfg.backend, device)
    run = RunContext(cfg, ctx, device, reader, PipelineSpec(image_size=cfg.image_size), Path(cfg.out), resolve_amp(cfg.amp, device),
                     backend, echo if ctx.is_main else (lambda _: None))
    state = build_state(cfg, reader.num_classes, device, distributed=ctx.enabled, amp_dtype=run.amp_dtype)
    check_forward(state.model, cfg, device)
    if resume:
        notes = _resume(run, state, reschedule)
        finished = _finished(run, state)
        if finished is not None:
            return finished
        for line in notes:
            run.say(line)
    if note:
        run.say(note)
    if ctx.is_main:
        write_json(run.out / "config.json", cfg.to_dict())
    start = time.perf_counter()
    with StopSignals() as signals:
        stopped_early, stop_reason = _train(run, state, signals)
    run.say(f"stopped: {stop_reason}")
    summary = _finish(run, state)
    summary.update(stopped_early=stopped_early, stop_reason=stop_reason, epochs_run=len(state.records),
                   train_seconds=sum(r["epoch_seconds"] for r in state.records),
                   skipped_steps=sum(r.get("skipped_steps", 0) for r in state.records),
                   wall_seconds_this_session=time.perf_counter() - start)
    if ctx.is_main:
        write_json(run.out / "summary.json", summary)
        plot_curves(state.records, run.out / "curves.png", title=f"{cfg.arch} on {Path(cfg.pack).name}", best_epoch=summary["best_epoch"])
        figures = (f"test verification auc {summary['test_auc']:.4f} accuracy {summary['test_accuracy']:.3f} eer {summary['test_eer']:.3f}"
                   if "test_auc" in summary else f"test loss {summary['test_loss']:.4f} top1 {summary['test_top1']:.3f} top5 {summary['test_top5']:.3f}")
        run.say(f"{figures} (best epoch {summary['best_epoch']}); wrote {run.out}/summary.json, metrics.jsonl, curves.png, best.pt, last.pt")
    return summary


def _resume(run: RunContext, state: TrainingState, reschedule: bool) -> list[str]:
    """Restore `state` from the run folder's last.pt, refusing one that does not fit this run; returns the lines to say."""
    cfg, ctx = run.cfg, run.ctx
    ckpt = read_payload(load_checkpoint(run.out / "last.pt"), world_size=ctx.world_size)
    mismatch = ckpt.mismatch(cfg.to_dict(), run.reader.classes)
    if mismatch:
        raise TrainerError(f"--resume {run.out}: {mismatch}; resume with the run's own options, or start a new run with --out")
    restore(state, ckpt, read_metrics(run.out / "metrics.jsonl"))
    state.schedule_epochs, schedule_note = resume_schedule(cfg, ckpt.schedule_epochs, reschedule)
    where = f"epoch {state.next_epoch + 1}"
    if state.position:
        pos, per_step = state.position, cfg.batch_size * ctx.world_size
        first = pos.start_step(cfg.batch_size, ctx.world_size)
        where += f", step {first}"
        if first * per_step != pos.samples:
            where += (f" (sample {first * per_step} of the epoch: the checkpoint stopped after {pos.samples} samples with batch "
                      f"{pos.batch_size} x {pos.world_size} processes; now {cfg.batch_size} x {ctx.world_size}, rounded down to a step)")
    return [f"resuming {run.out} at {where}"] + ([schedule_note] if schedule_note else [])


def _finished(run: RunContext, state: TrainingState) -> dict[str, Any] | None:
    """The summary of a run that has nothing left to do (trained and tested), after saying so; else None."""
    done = state.position is None and (state.next_epoch >= run.cfg.epochs or state.early.should_stop)
    summary_path = run.out / "summary.json"
    summary = json.loads(summary_path.read_text()) if run.ctx.is_main and done and summary_path.is_file() else None
    summary = run.ctx.broadcast_object(summary)  # rank 0 decides: other nodes may not see its folder
    if summary is None:
        return None
    why = ("early stopping: " + state.early.reason()) if state.early.should_stop else f"reached --epochs {run.cfg.epochs}"
    run.say(f"{run.out} is finished ({len(state.records)} epochs, {why}); nothing to do"
            + ("" if state.early.should_stop else "; give a larger --epochs to train on"))
    return summary


def _train(run: RunContext, state: TrainingState, signals: StopSignals) -> tuple[bool, str]:
    """The epoch loop; returns (stopped early, why training stopped)."""
    cfg, ctx = run.cfg, run.ctx
    if state.early.should_stop:
        return True, "early stopping: " + state.early.reason()
    train_model = _wrap(state.model, cfg, ctx, run.device)
    train_loader = run.loader("train", train=True)
    validate = validation_for(run)  # None: the pack has no val split
    synthetic = "SYNTHETIC DATA (random images, not the pack's: the figures measure speed only): " if run.backend == "synthetic" else ""
    run.say(f"{synthetic}training {cfg.arch} on {run.reader.path} ({run.reader.num_classes} classes, {train_loader.num_samples * ctx.world_size} "
            f"train images per epoch) with backend {train_loader.backend} on {run.device}, amp {run.amp_dtype or 'off'}, "
            f"world size {ctx.world_size}, global batch {cfg.batch_size * ctx.world_size} -> {run.out}")
    dropped = dropped_note(run.reader.split_counts()["train"], train_loader.num_samples * ctx.world_size, cfg.batch_size, ctx.world_size)
    if dropped:
        run.say(dropped)
    if validate is None:
        run.say(f"{run.reader.path} has no val split: no early stopping, and best.pt is the last epoch")
    step = StepConfig(nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), run.amp_dtype, state.scaler, cfg.log_every,
                      grad_clip=cfg.grad_clip, skip_nonfinite=cfg.skip_nonfinite,
                      with_labels=takes_labels(state.model))
    stop_requested = _stop_check(signals, ctx, cfg.log_every)
    tb = open_tensorboard(cfg.tensorboard and ctx.is_main, run.out / "tb", run.spec, len(train_loader))
    for epoch in range(state.next_epoch, cfg.epochs):
        epoch_step = dataclasses.replace(step, on_log=tb.step_hook(epoch)) if tb is not None else step
        outcome = _train_epoch(run, state, train_model, train_loader, epoch_step, epoch, stop_requested)
        if outcome.interrupted:
            _save_position(run, state, epoch, outcome)
            raise RunInterrupted(f"stopped by {signals.name} at epoch {epoch + 1}, step {outcome.next_step}; "
                                 f"continue with: trainer run --resume {run.out}", signals.exit_code)
        record = _validate(run, state, train_model, validate, epoch, outcome, len(train_loader.skipped))
        improved = state.early.update(record[cfg.monitor], epoch) if validate is not None else _last_is_best(state, epoch)
        if cfg.scheduler == "plateau":
            state.plateau.step(record[cfg.monitor])
        state.records.append(record)
        if tb is not None:
            tb.log_epoch(epoch + 1, record)
        state.position = None
        if ctx.is_main:
            write_metrics(run.out / "metrics.jsonl", state.records)
            save_checkpoint(run.out / "last.pt", checkpoint_payload(run, state, epoch))
            if improved:
                link_best(run.out)
        ctx.barrier()
        run.say(epoch_line(epoch, cfg.epochs, record, improved))
        if state.early.should_stop:
            return True, "early stopping: " + state.early.reason()
    return False, f"reached --epochs {cfg.epochs}"


def _last_is_best(state: TrainingState, epoch: int) -> bool:
    """Without a val split nothing ranks the epochs: the latest is kept as the best."""
    state.early.best_epoch = epoch
    return True


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
    batch_size, world_size = run.cfg.batch_size, run.ctx.world_size
    position = Position(epoch, outcome.next_step, outcome.next_step * batch_size * world_size, batch_size, world_size,
                        outcome.state.state_dict())
    save_checkpoint(run.out / "last.pt", checkpoint_payload(run, state, epoch - 1, position))


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
    position = state.position if state.position and state.position.epoch == epoch else None
    steps = len(train_loader)  # a whole epoch's batches, also when resumed mid-epoch
    first_step = min(position.start_step(cfg.batch_size, run.ctx.world_size), steps) if position else 0
    train_loader.set_epoch(epoch, first_step)

    def set_lr_at(i: int) -> float:
        lr = cfg.lr * lr_factor(cfg.scheduler, epoch + i / steps, epochs=state.schedule_epochs, step_size=cfg.step_size,
                                gamma=cfg.gamma, warmup_epochs=cfg.warmup_epochs, plateau_scale=state.plateau.scale)
        set_lr(state.optimizer, lr)
        return lr

    # Live on a terminal; in a log, a plain line every --log-seconds and when the epoch ends (Progress decides).
    per_step = cfg.batch_size * run.ctx.world_size
    progress = Progress(train_loader.num_samples * run.ctx.world_size, f"epoch {epoch + 1}/{cfg.epochs}", enabled=run.ctx.is_main,
                        scale=run.ctx.world_size, steps=steps, first_step=first_step, first_count=first_step * per_step,
                        log_interval=cfg.log_seconds)
    resume_state = EpochState.from_state_dict(position.partial, run.device) if position else None
    outcome = train_one_epoch(train_model, train_loader, state.optimizer, step, device=run.device, set_lr=set_lr_at,
                              set_train_mode=lambda: set_train_mode(state.model, state.frozen), progress=progress,
                              first_step=first_step, resume_state=resume_state, stop_requested=stop_requested)
    progress.close()
    return outcome


def check_monitor(cfg: RunConfig, reader: PackReader) -> None:
    """A class-split pack is validated by verification (val_auc), any other by closed-set metrics."""
    by_class = split_kind(reader.labels, reader.splits) == "class"
    if by_class and cfg.monitor != "val_auc":
        raise TrainerError(f"{reader.path} is split by class (val holds identities without a class in the head): "
                           f"pass --monitor val_auc, validation is by verification there")
    if not by_class and cfg.monitor == "val_auc":
        raise TrainerError(f"--monitor val_auc needs a pack split by class (tools/pack_dataset.py --split-by class); "
                           f"{reader.path} is split by image: use val_loss or val_top1")


def validation_for(run: RunContext) -> Callable[[nn.Module, int], dict[str, Any]] | None:
    """The run's val metrics, chosen once: verification on a class-split pack, else closed-set loss and top-k (None: no val split)."""
    if split_kind(run.reader.labels, run.reader.splits) == "class":
        def verification(model: nn.Module, epoch: int) -> dict[str, Any]:
            figures = validation_by_verification(model, run.reader, "val", ctx=run.ctx, seed=run.cfg.seed,
                                                 amp_dtype=run.amp_dtype, loader=run.loader("val", train=False), prefix="val")
            return {k: figures[k] for k in ("val_auc", "val_accuracy", "val_eer", "val_rank1")}  # the scalars, for metrics.jsonl

        return verification
    if not run.reader.split_counts()["val"]:
        return None
    val_loader = run.loader("val", train=False)

    def closed_set(model: nn.Module, epoch: int) -> dict[str, Any]:
        val_loader.set_epoch(epoch)
        val = evaluate(model, val_loader, device=run.device, num_classes=run.reader.num_classes,
                       topk=max(run.cfg.topk, REPORTED_TOPK), amp_dtype=run.amp_dtype, all_reduce=run.ctx.all_reduce)
        return {"val_loss": val["loss"], **topk_keys(val, "val", run.cfg.topk, run.reader.num_classes)}

    return closed_set


def _validate(run: RunContext, state: TrainingState, train_model: nn.Module,
              validate: Callable[[nn.Module, int], dict[str, Any]] | None, epoch: int, outcome: EpochResult,
              skipped: int) -> dict[str, Any]:
    """The epoch's record: train figures and `skipped` (this rank's unreadable train samples) summed over ranks, val
    figures (val_loss None without a val split)."""
    ctx = run.ctx
    train = outcome.metrics
    val_start = time.perf_counter()
    ctx.broadcast_buffers(unwrap(train_model))
    if validate is not None:
        val = validate(unwrap(train_model), epoch)
    else:  # no val split: the closed-set keys are there, with nothing measured
        val = {"val_loss": None, **topk_keys({"loss": None}, "val", run.cfg.topk, run.reader.num_classes)}
    train_sums = ctx.all_reduce(torch.tensor([train["train_loss"] * train["train_samples"], train["train_top1"] * train["train_samples"],
                                              float(train["train_samples"]), float(skipped)], dtype=torch.float64).to(ctx_device(ctx)))
    n = float(train_sums[2])
    return {
        "epoch": epoch + 1,  # metrics count epochs from 1, as the console does
        "train_loss": float(train_sums[0]) / n,
        "train_top1": float(train_sums[1]) / n,
        **val,
        "lr": train["lr"],
        "epoch_seconds": train["epoch_seconds"] + (time.perf_counter() - val_start),
        "train_seconds": train["epoch_seconds"],
        "images_per_second": train["images_per_second"] * ctx.world_size,
        "data_wait_fraction": train["data_wait_fraction"],
        "skipped_steps": train["skipped_steps"],
        "skipped_samples": int(train_sums[3]),
    }


def _finish(run: RunContext, state: TrainingState) -> dict[str, Any]:
    """Evaluate the best weights on the test split (the val split when there is no test split).

    Only rank 0 reads best.pt (other nodes may not share its folder) and sends the
    weights to every rank.
    """
    model = unwrap(state.model)
    if run.ctx.is_main:
        model.load_state_dict(read_payload(load_checkpoint(run.out / "best.pt", map_location=run.device)).model)
    run.ctx.broadcast_module(model)
    split = "test" if run.reader.split_counts()["test"] > 0 else "val"
    if split_kind(run.reader.labels, run.reader.splits) == "class":
        figures = validation_by_verification(model, run.reader, split, ctx=run.ctx, seed=run.cfg.seed, amp_dtype=run.amp_dtype,
                                             loader=run.loader(split, train=False), prefix="test")
        return {"best_epoch": state.early.best_epoch + 1, "best_" + run.cfg.monitor: state.early.best, "test_split": split,
                "backend": run.backend, "synthetic_data": run.backend == "synthetic", **figures}
    result = evaluate(model, run.loader(split, train=False), device=run.device, num_classes=run.reader.num_classes,
                      topk=max(run.cfg.topk, REPORTED_TOPK), amp_dtype=run.amp_dtype, all_reduce=run.ctx.all_reduce)
    return {
        "best_epoch": state.early.best_epoch + 1,  # counted from 1, as in metrics.jsonl
        "best_" + run.cfg.monitor: state.early.best,
        "test_split": split,
        "backend": run.backend,
        "synthetic_data": run.backend == "synthetic",  # random images: the figures measure speed only
        "test_loss": result["loss"],
        **topk_keys(result, "test", run.cfg.topk, run.reader.num_classes),
        "test_samples": result["num_samples"],
        "test_skipped_samples": result.get("skipped_samples", 0),
    }
