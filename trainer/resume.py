"""Stopping and resuming a run: everything about it, in the order a resume meets it.

1. `resume_values`: the options of the run to continue (its config.json, under what is given now).
2. `restore_run`: read the run folder's last.pt, refuse one that does not fit this run
   (`incompatibility`), restore the training state (`restore_state`), decide the schedule's length
   (`schedule`), and say where training continues.
3. `finished_summary`: a run with nothing left to do returns its summary without work.
4. `epoch_start`: the step, and the running sums, an epoch resumed mid-way starts from.
5. On a stop signal, `stopped_at` records where the epoch stopped (`Position`, saved in a
   mid-epoch last.pt) and `stop_message` tells the user how to continue.

What a checkpoint holds is `trainer.checkpoint`'s; this module decides what it means for a resume.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from dali_pipes import plural
from trainer.checkpoint import Checkpoint, first_difference, load_checkpoint, read_payload, set_rng_state, unwrap
from trainer.config import RunConfig, option_name
from trainer.distributed import DistContext
from trainer.errors import TrainerError
from trainer.loop import EpochState
from trainer.metrics import read_metrics
from trainer.models import HeadConfig
from trainer.optim import PLANNED_SCHEDULERS, lr_factor
from trainer.sharded_state import shard_state
from trainer.state import TrainingState


@dataclass(frozen=True)
class Position:
    """Where a mid-epoch checkpoint stopped: `epoch` (0-based index), after `samples` training images of all ranks.

    `step`, `batch_size` and `world_size` are the run's own figures when it stopped;
    a resume with another batch size or process count starts from `samples`.
    """

    epoch: int
    step: int
    samples: int
    batch_size: int
    world_size: int
    partial: dict[str, Any]  # the epoch's running sums (`loop.EpochState.state_dict`)

    def start_step(self, batch_size: int, world_size: int) -> int:
        """The first step for a run with `batch_size` per process on `world_size` processes (rounded down)."""
        return self.samples // (batch_size * world_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as a checkpoint's `position`."""
        return dataclasses.asdict(self)


def read_position(raw: dict[str, Any] | None, config: Mapping[str, Any], world_size: int) -> Position | None:
    """A checkpoint's `position` (None: it ended on an epoch boundary).

    Older checkpoints counted only steps; their samples follow from the run's batch size and
    `world_size` (the resuming run's), the only process count they could resume with.
    """
    if not raw:
        return None
    if "samples" in raw:
        return Position(**{f.name: raw[f.name] for f in dataclasses.fields(Position)})
    batch_size = int(config.get("batch_size", 1))
    return Position(int(raw["epoch"]), int(raw["step"]), int(raw["step"]) * batch_size * world_size, batch_size,
                    world_size, raw["partial"])


def stopped_at(epoch: int, next_step: int, partial: dict[str, Any], batch_size: int, world_size: int) -> Position:
    """The position of an epoch stopped before step `next_step`, with its running sums `partial`."""
    return Position(epoch, next_step, next_step * batch_size * world_size, batch_size, world_size, partial)


def stop_message(signal_name: str, epoch: int, next_step: int, out: Path) -> str:
    """What a run stopped by a signal says: where it stopped and the command that continues it."""
    return f"stopped by {signal_name} at epoch {epoch + 1}, step {next_step}; continue with: trainer run --resume {out}"


def resume_values(out: Path, file_values: Mapping[str, Any]) -> dict[str, Any]:
    """The option values of the run in `out` to continue: its config.json, then `file_values` (--config) over it."""
    saved = out / "config.json"
    if not saved.is_file():
        raise TrainerError(f"--resume {out}: nothing to resume (no config.json there)")
    return {**json.loads(saved.read_text()), **file_values, "out": str(out)}


def incompatibility(ckpt: Checkpoint, cfg: RunConfig, head: HeadConfig, classes: list[str]) -> str | None:
    """What keeps `ckpt` from going on as a run of `cfg` with `head` on a pack with `classes`, in words (None: fits)."""
    if cfg.arch != ckpt.arch:
        return f"--arch {cfg.arch} differs from the checkpoint's {ckpt.arch}"
    theirs = HeadConfig.from_dict(ckpt.head)
    for f in dataclasses.fields(HeadConfig):
        ours_value, their_value = getattr(head, f.name), getattr(theirs, f.name)
        if ours_value != their_value:
            option = "--head" if f.name == "type" else option_name(f.name)
            return f"{option} {ours_value} differs from the checkpoint's {their_value}"
    monitor = ckpt.early_stopping.get("monitor", cfg.monitor)
    if cfg.monitor != monitor:  # best.pt and early stopping rank epochs by one figure
        return f"--monitor {cfg.monitor} differs from the checkpoint's {monitor}"
    if list(classes) != ckpt.classes:
        return (f"the pack's {plural(len(classes), 'class')} differ from the checkpoint's {len(ckpt.classes)} "
                f"({first_difference(list(classes), ckpt.classes)})")
    return None


def schedule(cfg: RunConfig, planned: int, reschedule: bool) -> tuple[int, str | None]:
    """The schedule length of a resumed run, and a line to say when it differs from --epochs.

    The rule: the schedule keeps the length it was planned for, so a larger --epochs
    adds epochs after it (cosine and poly stay at their end value) instead of moving the learning
    rate back up, and a smaller one stops the run before the schedule ends; `--reschedule`
    plans it over the new --epochs instead.
    """
    if reschedule or planned == cfg.epochs:
        return cfg.epochs, None
    if cfg.scheduler not in PLANNED_SCHEDULERS:  # step, plateau and none do not depend on the run's length
        return planned, None
    stop = min(planned, cfg.epochs)
    lr = cfg.lr * lr_factor(cfg.scheduler, stop, epochs=planned, step_size=cfg.step_size, gamma=cfg.gamma,
                            warmup_epochs=cfg.warmup_epochs)
    if cfg.epochs < planned:
        return planned, (f"the run stops after epoch {cfg.epochs}, before its {cfg.scheduler} schedule of {planned} "
                         f"epochs ends (lr {lr:.2e} there); pass --reschedule to plan it over --epochs {cfg.epochs}")
    return planned, (f"the {cfg.scheduler} schedule keeps its planned {planned} epochs (lr {lr:.2e} after epoch "
                     f"{planned}); pass --reschedule to plan it over --epochs {cfg.epochs}")


def restore_state(state: TrainingState, ckpt: Checkpoint, records: list[dict[str, Any]]) -> None:
    """Continue from a checkpoint: weights, averaged weights, optimizer, scaler, schedules, RNG, and the run's
    `records` so far.

    A run with --ema resumed from a checkpoint without averaged weights (written without
    --ema, or by an older version) starts the average from the checkpoint's weights.

    A sharded head takes its rank's rows of the checkpoint's whole centres and their optimizer state,
    whatever the world size that wrote it.

    `records` are metrics.jsonl's lines; those of a run that counted epochs from 0 are
    renumbered from 1, and lines written after the checkpoint (a crash between the two
    writes) are dropped.
    """
    model_state, optimizer_state = shard_state(unwrap(state.model), state.optimizer, ckpt.model, ckpt.optimizer)
    unwrap(state.model).load_state_dict(model_state)
    if state.ema is not None:  # never with a sharded head (`checks.check_sharded_head`)
        state.ema.load_state_dict(ckpt.ema or {"module": unwrap(state.model).state_dict(), "updates": 0})
    state.optimizer.load_state_dict(optimizer_state)
    state.scaler.load_state_dict(ckpt.scaler)
    state.early.load_state_dict(ckpt.early_stopping)
    state.plateau.load_state_dict(ckpt.scheduler["plateau"])
    set_rng_state(ckpt.rng)
    state.next_epoch = ckpt.epoch + 1
    state.schedule_epochs = ckpt.schedule_epochs
    shift = 1 - ckpt.metrics_epoch_base
    state.records = [{**r, "epoch": r["epoch"] + shift} for r in records if r["epoch"] + shift <= ckpt.epoch + 1]


@dataclass(frozen=True)
class Resumed:
    """What `restore_run` found: where in its epoch training continues (None: at its start), and the lines to say."""

    position: Position | None
    lines: list[str]


def resumable_checkpoint(out: Path, cfg: RunConfig, head: HeadConfig, classes: list[str]) -> Checkpoint:
    """`out`'s last.pt, refused in one line when it does not fit a run of `cfg` with `head` on `classes`."""
    ckpt = read_payload(load_checkpoint(out / "last.pt"))
    mismatch = incompatibility(ckpt, cfg, head, classes)
    if mismatch:
        raise TrainerError(f"--resume {out}: {mismatch}; resume with the run's own options, "
                           "or start a new run with --out")
    return ckpt


def restore_run(state: TrainingState, out: Path, cfg: RunConfig, classes: list[str], world_size: int,
           reschedule: bool) -> Resumed:
    """Restore `state` from `out`'s last.pt, refusing one that does not fit this run."""
    ckpt = resumable_checkpoint(out, cfg, state.head, classes)
    restore_state(state, ckpt, read_metrics(out / "metrics.jsonl"))
    position = read_position(ckpt.position, ckpt.config, world_size)
    state.schedule_epochs, schedule_note = schedule(cfg, ckpt.schedule_epochs, reschedule)
    where = f"epoch {state.next_epoch + 1}"
    if position:
        per_step = cfg.batch_size * world_size
        first = position.start_step(cfg.batch_size, world_size)
        where += f", step {first}"
        if first * per_step != position.samples:
            where += (f" (sample {first * per_step} of the epoch: the checkpoint stopped after {position.samples} "
                      f"samples with batch {position.batch_size} x {plural(position.world_size, 'process')}; now "
                      f"{cfg.batch_size} x {world_size}, rounded down to a step)")
    return Resumed(position, [f"resuming {out} at {where}"] + ([schedule_note] if schedule_note else []))


def finished_summary(out: Path, state: TrainingState, cfg: RunConfig, ctx: DistContext, position: Position | None,
                     say: Callable[[str], None]) -> dict[str, Any] | None:
    """The summary of a run that has nothing left to do (trained and tested), after saying so; else None."""
    done = position is None and (state.next_epoch >= cfg.epochs or state.early.should_stop)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if ctx.is_main and done and summary_path.is_file() else None
    summary = ctx.broadcast_object(summary)  # rank 0 decides: other nodes may not see its folder
    if summary is None:
        return None
    why = ("early stopping: " + state.early.reason()) if state.early.should_stop else f"reached --epochs {cfg.epochs}"
    say(f"{out} is finished ({plural(len(state.records), 'epoch')}, {why}); nothing to do"
        + ("" if state.early.should_stop else "; give a larger --epochs to train on"))
    return summary


def epoch_start(position: Position | None, epoch: int, steps: int, batch_size: int, world_size: int,
                device: torch.device) -> tuple[int, EpochState | None]:
    """The first step of 0-based `epoch` and its running sums so far: (0, None) unless `position` stopped inside it."""
    if position is None or position.epoch != epoch:
        return 0, None
    first_step = min(position.start_step(batch_size, world_size), steps)
    return first_step, EpochState.from_state_dict(position.partial, device)
