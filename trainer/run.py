"""`trainer run`: build the parts from a `RunConfig`, train epoch by epoch, checkpoint, test.

Read top to bottom: `fit` opens the pack, chooses the validation and builds the training
state (or restores it), `_train` runs the epochs, `_train_epoch` one of them (at the size
`train_image_size` gives it), `_epoch_record` makes its metrics.jsonl line (the averaged
weights validated beside the trained ones), `_save_best` keeps the better of the two in
best.pt, and `_finish` tests the best weights. Each part lives in the
module that owns it: the step and the epoch in `trainer.loop`, validation in
`trainer.validation`, resume in `trainer.resume`, the training state in `trainer.state`, what a
checkpoint holds in `trainer.checkpoint`, the checks in `trainer.checks`, and the data in
`dali_pipes`, which this module reaches only through `build_loader`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dali_pipes import BatchLoader, DecodedCache, PackReader, PipelineSpec, Progress, build_loader, choose_backend
from trainer.accumulation import optimizer_steps
from trainer.checkpoint import load_checkpoint, read_payload, save_checkpoint, unwrap
from trainer.checks import check_forward, check_pack, dropped_note
from trainer.config import RunConfig
from trainer.distributed import DistContext, data_parallel, stop_check
from trainer.errors import RunInterrupted
from trainer.loop import EpochResult, StepConfig, amp_name, resolve_amp, train_one_epoch
from trainer.metrics import SYNTHETIC_NOTE, write_json, write_metrics
from trainer.mixing import MixConfig
from trainer.models import set_train_mode, takes_labels
from trainer.monitor import monitored_value
from trainer.optim import lr_factor, set_lr
from trainer.partial_fc import set_step, sharded
from trainer.plots import plot_curves
from trainer.resume import Position, epoch_start, finished_summary, restore_run, stop_message, stopped_at
from trainer.run_cache import cache_backend, need_cache, open_cache
from trainer.run_folder import link_best
from trainer.schedules import progressive_size
from trainer.sharded_state import load_everywhere
from trainer.signals import StopSignals
from trainer.state import TrainingState, build_state
from trainer.tensorboard import open_tensorboard
from trainer.validation import Validation, choose_validation


@dataclass
class RunContext:
    """What stays fixed during a run: configuration, placement, data, and where it writes."""

    cfg: RunConfig
    ctx: DistContext
    device: torch.device
    reader: PackReader
    spec: PipelineSpec
    out: Path
    amp_dtype: torch.dtype | None
    backend: str  # the concrete backend, resolved once
    say: Callable[[str], None]
    cache: DecodedCache | None = None  # --cache: every split's decoded pixels

    def loader(self, split: str, train: bool) -> BatchLoader:
        """This rank's loader of `split`."""
        return build_loader(self.reader, split, train=train, backend=self.backend, batch_size=self.cfg.batch_size,
                            device=self.device, num_workers=self.cfg.workers, seed=self.cfg.seed, rank=self.ctx.rank,
                            world_size=self.ctx.world_size, spec=self.spec, dtype=torch.float32, cache=self.cache)

    def eval_loader(self, split: str) -> BatchLoader:
        """This rank's evaluation loader of `split` (every sample once, no augmentation)."""
        return self.loader(split, train=False)


def pipeline_spec(cfg: RunConfig) -> PipelineSpec:
    """The run's preprocessing: evaluation at --eval-image-size, and the training augmentations asked for.

    The checkpoints store it, so `eval`, `predict` and `export` see images as validation did;
    training takes it at the size of each epoch (`train_image_size`).
    """
    return PipelineSpec(image_size=cfg.eval_image_size or cfg.image_size, rotation_degrees=cfg.rotation,
                        mean=cfg.mean, std=cfg.std, crop_scale=cfg.crop_scale, crop_ratio=cfg.crop_ratio,
                        color_jitter=cfg.color_jitter, random_erasing=cfg.random_erasing)


def train_image_size(cfg: RunConfig, epoch: int) -> int:
    """The training image size of 0-based `epoch`: --image-size, or with --progressive its ramp (epochs from 1)."""
    if cfg.progressive is None:
        return cfg.image_size
    start, end = cfg.ramp_epochs or (1, cfg.epochs)
    return progressive_size(epoch + 1, cfg.progressive, cfg.image_size, start, end)


def fit(cfg: RunConfig, ctx: DistContext, device: torch.device, *, resume: bool = False, reschedule: bool = False,
        echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train as `cfg` says; returns the summary also written to summary.json.

    SIGINT or SIGTERM ends the current step, writes a resumable mid-epoch last.pt and
    raises `RunInterrupted` (exit status 130 or 143). Resuming a finished run does no
    work and returns its summary.
    """
    reader = PackReader(cfg.pack)
    check_pack(reader, cfg.batch_size, ctx.world_size, cfg.scheduler)
    cache = need_cache(cfg, reader, ctx.world_size, device)  # refused here, before anything is allocated
    tune_backends(device)
    backend, note = choose_backend(cfg.backend, device) if cache is None else cache_backend(cfg)
    run = RunContext(cfg, ctx, device, reader, pipeline_spec(cfg), Path(cfg.out), resolve_amp(cfg.amp, device),
                     backend, echo if ctx.is_main else (lambda _: None))
    if cache is not None:
        run.say(cache.line)
    validation = choose_validation(reader, cfg.monitor, run.eval_loader, ctx=ctx, device=device,
                                   amp_dtype=run.amp_dtype, topk=cfg.topk, seed=cfg.seed, tta=cfg.tta)
    state = build_state(cfg, reader.num_classes, device, distributed=ctx.enabled, amp_dtype=run.amp_dtype)
    check_forward(state.model, cfg, device)
    position = None
    if resume:
        resumed = restore_run(state, run.out, cfg, reader.classes, ctx.world_size, reschedule)
        position = resumed.position
        finished = finished_summary(run.out, state, cfg, ctx, position, run.say)
        if finished is not None:
            return finished
        for line in resumed.lines:
            run.say(line)
    if note:
        run.say(note)
    if ctx.is_main:
        write_json(run.out / "config.json", cfg.to_dict())
    if cache is not None:
        run.cache = open_cache(cache, ctx, reader, run.say, workers=cfg.workers)
    start = time.perf_counter()
    with StopSignals() as signals:
        stopped_early, stop_reason = _train(run, state, validation, position, signals)
    run.say(f"stopped: {stop_reason}")
    summary = _finish(run, state, validation)
    summary.update(stopped_early=stopped_early, stop_reason=stop_reason, epochs_run=len(state.records),
                   train_seconds=sum(r["epoch_seconds"] for r in state.records),
                   skipped_steps=sum(r.get("skipped_steps", 0) for r in state.records),
                   wall_seconds_this_session=time.perf_counter() - start)
    if ctx.is_main:
        write_json(run.out / "summary.json", summary)
        plot_curves(state.records, run.out / "curves.png", validation.curves(),
                    title=f"{cfg.arch} on {Path(cfg.pack).name}", best_epoch=summary["best_epoch"])
        run.say(f"{validation.test_line(summary)} (best epoch {summary['best_epoch']}); wrote {run.out}/summary.json, "
                "metrics.jsonl, curves.png, best.pt, last.pt")
    return summary


def _train(run: RunContext, state: TrainingState, validation: Validation, position: Position | None,
           signals: StopSignals) -> tuple[bool, str]:
    """The epoch loop, from `state.next_epoch` (and `position` inside it); returns (stopped early, why it stopped)."""
    cfg, ctx = run.cfg, run.ctx
    if state.early.should_stop:
        return True, "early stopping: " + state.early.reason()
    train_model = wrap_model(state.model, cfg, ctx, run.device)
    train_loader = run.loader("train", train=True)
    synthetic = f"{SYNTHETIC_NOTE}: " if run.backend == "synthetic" else ""
    used = train_loader.num_samples * ctx.world_size
    run.say(f"{synthetic}training {cfg.arch} on {run.reader.path} ({run.reader.num_classes} classes, {used} "
            f"train images per epoch) with backend {train_loader.backend} on {run.device}, "
            f"amp {amp_name(run.amp_dtype)}, world size {ctx.world_size}, "
            f"global batch {cfg.batch_size * ctx.world_size} -> {run.out}")
    dropped = dropped_note(run.reader.split_counts()["train"], used, cfg.batch_size, ctx.world_size)
    if dropped:
        run.say(dropped)
    if not validation.validates:
        run.say(f"{run.reader.path} has no val split: no early stopping, and best.pt is the last epoch")
    tb = open_tensorboard(cfg.tensorboard and ctx.is_main, run.out / "tb", run.spec,
                          optimizer_steps(len(train_loader), cfg.accum_steps))
    step = StepConfig(nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), run.amp_dtype, state.scaler,
                      cfg.log_every, grad_clip=cfg.grad_clip, skip_nonfinite=cfg.skip_nonfinite,
                      with_labels=takes_labels(state.model), on_log=tb.on_log if tb is not None else None,
                      accum_steps=cfg.accum_steps, ema=state.ema,
                      mix=MixConfig(cfg.mixup, cfg.cutmix, cfg.mix_prob), num_classes=run.reader.num_classes,
                      label_smoothing=cfg.label_smoothing, seed=cfg.seed)
    stop_requested = stop_check(ctx, signals, cfg.log_every)
    for epoch in range(state.next_epoch, cfg.epochs):
        outcome = _train_epoch(run, state, train_model, train_loader, step, epoch, position, stop_requested)
        if outcome.interrupted:  # the last completed epoch's state, and where this one stopped
            stop = stopped_at(epoch, outcome.next_step, outcome.state.state_dict(), cfg.batch_size, ctx.world_size)
            _save_last(run, state, epoch - 1, stop)
            raise RunInterrupted(stop_message(signals.name, epoch, outcome.next_step, run.out), signals.exit_code)
        record = _epoch_record(run, state, train_model, validation, epoch, outcome, train_loader)
        value, weights = monitored_value(record, cfg.monitor)
        improved = state.early.update(value, epoch) if validation.validates else state.early.last_is_best(epoch)
        if cfg.scheduler == "plateau":
            state.plateau.step(record[cfg.monitor])
        state.records.append(record)
        if tb is not None:
            tb.log_epoch(epoch + 1, record)
        if ctx.is_main:
            write_metrics(run.out / "metrics.jsonl", state.records)
        _save_last(run, state, epoch)
        if ctx.is_main and improved:
            _save_best(run, state, epoch, weights)
        ctx.barrier()
        run.say(validation.epoch_line(record, cfg.epochs, improved) + ("  (ema)" if improved and weights == "ema"
                                                                       else ""))
        if state.early.should_stop:
            return True, "early stopping: " + state.early.reason()
    return False, f"reached --epochs {cfg.epochs}"


def tune_backends(device: torch.device) -> None:
    """Backend settings for training on `device` (also what tools/bench_train.py measures with)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels once


def wrap_model(model: nn.Module, cfg: RunConfig, ctx: DistContext, device: torch.device,
               compile_backend: str = "inductor") -> nn.Module:
    """The model as the training steps call it: under DDP with several processes, compiled with `--compile`
    (by `compile_backend`: tools/bench_train.py's smoke run asks for torch.compile's "eager" one)."""
    wrapped = model
    if ctx.enabled:
        # A sharded head's centres differ per rank: DDP neither broadcasts nor averages them (it replicates the rest).
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(sharded(model)))
        wrapped = data_parallel(model, device, sync_bn=cfg.sync_bn)
    if cfg.compile:
        wrapped = torch.compile(wrapped, backend=compile_backend)
    return wrapped


def _save_last(run: RunContext, state: TrainingState, epoch: int, position: Position | None = None) -> None:
    """last.pt after epoch index `epoch` completed (and `position` into the next, for a mid-epoch stop).

    Every rank calls it; rank 0 writes, after a sharded head gathered its centres there from every rank.
    """
    if not (run.ctx.is_main or state.sharded):
        return
    payload = state.payload(run.cfg, run.reader.classes, run.spec, epoch, position.to_dict() if position else None,
                            trained_classes=run.reader.classes_in("train"))
    if run.ctx.is_main:
        save_checkpoint(run.out / "last.pt", payload)


def _save_best(run: RunContext, state: TrainingState, epoch: int, weights: str) -> None:
    """best.pt after epoch index `epoch`: last.pt itself, or with `weights` "ema" its averaged weights as `model`."""
    if weights == "raw":
        link_best(run.out)
        return
    payload = state.payload(run.cfg, run.reader.classes, run.spec, epoch,
                            trained_classes=run.reader.classes_in("train"), weights=weights)
    save_checkpoint(run.out / "best.pt", payload)


def _train_epoch(run: RunContext, state: TrainingState, train_model: nn.Module, train_loader: BatchLoader,
                 step: StepConfig, epoch: int, position: Position | None,
                 stop_requested: Callable[[int], bool]) -> EpochResult:
    cfg, world_size = run.cfg, run.ctx.world_size
    steps = len(train_loader)  # a whole epoch's batches, also when resumed mid-epoch
    first_step, resume_state = epoch_start(position, epoch, steps, cfg.batch_size, world_size, run.device)
    train_loader.set_epoch(epoch, first_step, image_size=train_image_size(cfg, epoch))
    updates = optimizer_steps(steps, cfg.accum_steps)  # the schedule counts optimizer steps
    set_step(state.model, epoch * steps + first_step)  # a resumed Partial FC head samples as it would have

    def set_lr_at(u: int) -> float:
        lr = cfg.lr * lr_factor(cfg.scheduler, epoch + u / updates, epochs=state.schedule_epochs,
                                step_size=cfg.step_size, gamma=cfg.gamma, warmup_epochs=cfg.warmup_epochs,
                                plateau_scale=state.plateau.scale)
        set_lr(state.optimizer, lr)
        return lr

    # Live on a terminal; in a log, a plain line every --log-seconds and when the epoch ends (Progress decides).
    progress = Progress(train_loader.num_samples * world_size, f"epoch {epoch + 1}/{cfg.epochs}",
                        enabled=run.ctx.is_main, scale=world_size, steps=steps, first_step=first_step,
                        first_count=first_step * cfg.batch_size * world_size, log_interval=cfg.log_seconds)
    outcome = train_one_epoch(train_model, train_loader, state.optimizer, step, device=run.device, set_lr=set_lr_at,
                              set_train_mode=lambda: set_train_mode(state.model, state.frozen), progress=progress,
                              first_step=first_step, resume_state=resume_state, stop_requested=stop_requested,
                              epoch=epoch, batches=steps, step_offset=epoch * updates,
                              all_reduce=run.ctx.all_reduce if run.ctx.enabled else None)
    progress.close()
    return outcome


def _epoch_record(run: RunContext, state: TrainingState, train_model: nn.Module, validation: Validation, epoch: int,
                  outcome: EpochResult, train_loader: BatchLoader) -> dict[str, Any]:
    """The epoch's metrics.jsonl line: the train figures (every rank's: `train_one_epoch` sums them), the training
    image size, and the val figures of the trained weights and (keys ending in _ema) the averaged ones."""
    ctx, train = run.ctx, outcome.metrics
    val_start = time.perf_counter()
    ctx.broadcast_buffers(unwrap(train_model))
    val = validation.validate(unwrap(train_model), epoch)
    if state.ema is not None:
        ctx.broadcast_buffers(state.ema.module)  # each rank averaged its own batch-norm statistics
        val.update(validation.validate(state.ema.module, epoch, suffix="_ema"))
    return {
        "epoch": epoch + 1,  # metrics count epochs from 1, as the console does
        "train_loss": train["train_loss"],
        "train_top1": train["train_top1"],
        "image_size": train_loader.spec.image_size,
        **val,
        "lr": train["lr"],
        "epoch_seconds": train["epoch_seconds"] + (time.perf_counter() - val_start),
        "train_seconds": train["epoch_seconds"],
        "images_per_second": train["images_per_second"] * ctx.world_size,
        "data_wait_fraction": train["data_wait_fraction"],
        "skipped_steps": train["skipped_steps"],
        "skipped_samples": train["skipped_samples"],
    }


def _finish(run: RunContext, state: TrainingState, validation: Validation) -> dict[str, Any]:
    """Test the best weights (on the val split when there is no test split): summary.json's figures.

    Only rank 0 reads best.pt (other nodes may not share its folder) and sends the
    weights to every rank (a sharded head's centres: each rank its rows).
    """
    model = unwrap(state.model)
    best = read_payload(load_checkpoint(run.out / "best.pt", map_location=run.device)) if run.ctx.is_main else None
    load_everywhere(model, best.model if best is not None else None)
    weights = best.model_weights if best is not None else None
    return {
        "best_epoch": state.early.best_epoch + 1,  # counted from 1, as in metrics.jsonl
        "best_" + run.cfg.monitor: state.early.best,
        "best_weights": run.ctx.broadcast_object(weights),  # raw, or ema: the averaged weights validated better
        "test_split": validation.test_split,
        "tta": run.cfg.tta,  # how the test (and validation) saw each image
        "backend": run.backend,
        "synthetic_data": run.backend == "synthetic",  # random images: the figures measure speed only
        **validation.test(model),
    }
