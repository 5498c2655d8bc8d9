"""The engine: one train step path and `train_one_epoch`; mixing, accumulation and EMA in the step (scoring:
`trainer.scoring`).

The loop receives an iterable of `(images, labels)` already on the device and never
learns which backend made it, nor which head it trains: a model gives logits, or its own
loss and top-1 hits as a `margin_heads.HeadLoss` (a sharded margin head). Host-device syncs
(`.item()`) happen only every `log_every` optimizer steps (counted across epochs, so short
epochs are logged too), at the first optimizer step of each epoch, and at its end.

Each batch is one micro-step; with `accum_steps` N the optimizer steps at the last batch
of each group of N (`trainer.accumulation`), so the learning rate, `log_every`, the
averaged weights (`trainer.ema`) and stop requests count optimizer steps, while an
epoch's position stays in batches (samples). Mixup and CutMix (`trainer.mixing`) are drawn
per batch from (seed, epoch, batch index), on the host, and applied on the device.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from dali_pipes import BatchLoader, Progress
from trainer.accumulation import gradient_sync, group_length, is_update_step
from trainer.data_wait import DataWaitClock
from trainer.ema import ModelEma
from trainer.errors import TrainerError
from trainer.margin_heads import HeadLoss
from trainer.mixing import MixConfig, draw_mix, mix_batch, soft_target_cross_entropy
from trainer.partial_fc import grad_norm

Batch = tuple[torch.Tensor, torch.Tensor]


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for `--amp`: auto is bf16 on GPUs that have it, fp16 on older GPUs, off on the CPU."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def amp_name(dtype: torch.dtype | None) -> str:
    """How `--amp` names a resolved autocast dtype: bf16, fp16, or off."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}[dtype]


@dataclass
class StepConfig:
    """What every train step needs besides the batch."""

    criterion: nn.Module
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    log_every: int = 20  # optimizer steps between host syncs
    grad_clip: float | None = None
    skip_nonfinite: bool = False
    with_labels: bool = False  # the model takes the labels too (a margin head: see models.takes_labels)
    # Called as on_log(global optimizer step, {"loss": this batch's loss, "lr": ...}, images) at each sync
    # (TensorBoard); the global step counts from the run's first optimizer step, across epochs.
    on_log: Callable[[int, dict[str, float], torch.Tensor], None] | None = None
    accum_steps: int = 1  # batches per optimizer step
    ema: ModelEma | None = None  # updated after every optimizer step
    mix: MixConfig = field(default_factory=MixConfig)  # mixup / CutMix (off by default)
    num_classes: int = 0  # the soft targets' width, when mixing
    label_smoothing: float = 0.0  # folded into the soft targets, when mixing
    seed: int = 0  # of the mixing draws


@dataclass
class EpochState:
    """Running sums of one epoch, kept on the device to avoid syncs; checkpointed mid-epoch."""

    device: torch.device
    loss_sum: torch.Tensor = field(init=False)
    correct: torch.Tensor = field(init=False)
    first_bad_step: torch.Tensor = field(init=False)  # -1, or the first step whose loss was not finite
    samples: int = 0
    steps: int = 0
    skipped_steps: int = 0
    data_wait: float = 0.0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self.correct = torch.zeros((), device=self.device, dtype=torch.float64)
        self.first_bad_step = torch.full((), -1, device=self.device, dtype=torch.int64)

    def state_dict(self) -> dict[str, Any]:
        """Plain values for a mid-epoch checkpoint."""
        return {"loss_sum": float(self.loss_sum), "correct": float(self.correct), "samples": self.samples,
                "steps": self.steps, "skipped_steps": self.skipped_steps, "data_wait": self.data_wait,
                "seconds": self.seconds}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device) -> "EpochState":
        """Continue an epoch from `state_dict`."""
        epoch = cls(device)
        epoch.loss_sum.fill_(state["loss_sum"])
        epoch.correct.fill_(state["correct"])
        for key in ("samples", "steps", "skipped_steps", "data_wait", "seconds"):
            setattr(epoch, key, state[key])
        return epoch


@dataclass
class EpochResult:
    """What `train_one_epoch` hands back: metrics, or where it was interrupted."""

    metrics: dict[str, float]
    interrupted: bool
    next_step: int
    state: EpochState


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               step: StepConfig, *, targets: torch.Tensor | None = None, group: int = 1, first: bool = True,
               update: bool = True) -> tuple[torch.Tensor, torch.Tensor | HeadLoss, bool]:
    """Forward and backward for one batch, and the optimizer step (with the EMA update) when `update`.

    The loss is the model's own (a `HeadLoss`: a sharded margin head), `step.criterion`
    against `labels`, or the soft-target cross-entropy against `targets` (a mixed batch;
    never with a margin head). Accumulation: the gradients are cleared first only when
    `first` (the group's first batch) and the loss is divided by `group` (the group's
    length), so a group's summed gradient is that of one batch of all its samples.
    Returns (loss, the model's output: logits or a `HeadLoss`) still on the device, and
    whether the update was skipped (only with `skip_nonfinite`, which costs one host sync
    per step to decide).
    """
    with torch.autocast(images.device.type, dtype=step.amp_dtype or torch.float32, enabled=step.amp_dtype is not None):
        output = model(images, labels) if step.with_labels else model(images)
        if isinstance(output, HeadLoss):
            loss = output.loss
        else:
            loss = step.criterion(output, labels) if targets is None else soft_target_cross_entropy(output, targets)
    output = HeadLoss(loss.detach(), output.correct) if isinstance(output, HeadLoss) else output.detach()
    if first:
        optimizer.zero_grad(set_to_none=True)
    step.scaler.scale(loss / group if group > 1 else loss).backward()
    if not update:
        return loss.detach(), output, False
    if step.grad_clip or step.skip_nonfinite:
        step.scaler.unscale_(optimizer)  # clip and check the true gradients, not the scaled ones
        # Under DDP the gradients are already all-reduced here (a sharded head's norm is, inside), so every rank
        # clips alike and takes the same decision.
        norm = grad_norm(model)
    if step.grad_clip:
        nn.utils.clip_grads_with_norm_(model.parameters(), step.grad_clip, norm)
    if step.skip_nonfinite and not (torch.isfinite(loss) and torch.isfinite(norm)):
        optimizer.zero_grad(set_to_none=True)
        if step.scaler.is_enabled():
            step.scaler.update()
        return loss.detach(), output, True
    step.scaler.step(optimizer)
    step.scaler.update()
    if step.ema is not None:
        step.ema.update(model)
    return loss.detach(), output, False


def top1_correct(output: torch.Tensor | HeadLoss, labels: torch.Tensor) -> torch.Tensor:
    """How many samples of a batch the model's top-1 got right: the argmax of logits, or a `HeadLoss`'s own hits."""
    return output.correct.sum() if isinstance(output, HeadLoss) else (output.argmax(1) == labels).sum()


def nonfinite_check_every(device: torch.device, log_every: int) -> int:
    """Steps between checks for a non-finite loss: every step on the CPU, where reading it costs nothing,
    every `log_every` steps elsewhere, where each read is a host sync."""
    return 1 if device.type == "cpu" else log_every


def train_one_epoch(model: nn.Module, loader: Iterable[Batch], optimizer: torch.optim.Optimizer, step: StepConfig, *,
                    device: torch.device, set_lr: Callable[[int], float], set_train_mode: Callable[[], None],
                    progress: Progress | None = None, first_step: int = 0, resume_state: EpochState | None = None,
                    stop_requested: Callable[[int], bool] | None = None, epoch: int = 0,
                    batches: int | None = None, step_offset: int = 0,
                    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> EpochResult:
    """One pass over `loader` (which starts at batch `first_step` of epoch `epoch`, of `batches`, default its len()).

    `set_lr(u)` is called before each batch of optimizer step u and returns the rate it
    set. After each optimizer step, `stop_requested(u)` may end the epoch early (a
    signal): the result then says `interrupted` and carries the sums so far, for a
    mid-epoch checkpoint. A non-finite loss stops training with the step named (checked
    every step on the CPU, every `log_every` steps on a GPU, where each check is a host
    sync), unless `skip_nonfinite`, which skips such optimizer steps and counts them.

    `step_offset` is the run's count of optimizer steps before this epoch: `log_every`
    counts across epochs. Under DDP, `all_reduce` sums the epoch's figures over the ranks
    at its end (train_loss, train_top1, train_samples and skipped_samples are then every
    rank's); the running figures of the progress line between syncs are this process's,
    and say so ("rank 0": only rank 0 draws it).
    """
    set_train_mode()
    state = resume_state or EpochState(device)
    batches = len(loader) if batches is None else batches  # type: ignore[arg-type]
    accum = step.accum_steps
    check_every = nonfinite_check_every(device, step.log_every)
    # An epoch resumed after its last batch trains nothing: its rate is still that of its last optimizer step.
    lr = set_lr((first_step - 1) // accum) if first_step > 0 else float("nan")
    logged = False  # the first optimizer step of this pass is logged, so every epoch has a point
    start = time.perf_counter()
    prior_seconds = state.seconds  # of a resumed epoch's earlier session
    clock = DataWaitClock(device, state.data_wait)
    running: dict[str, float | None] = {"loss": None, "top1": None}  # shown as `-` until the first sync
    label = {"scope": "rank 0 " if all_reduce is not None else ""}  # "" once the figures are every rank's
    if progress is not None:
        progress.set_postfix(lambda: progress_postfix(running, state.data_wait, prior_seconds + time.perf_counter()
                                                      - start, label["scope"]))
    i = first_step - 1
    interrupted = False
    for i, (images, labels) in enumerate(loader, start=first_step):
        clock.batch_arrived()
        update, optimizer_step = is_update_step(i, accum, batches), i // accum
        lr = set_lr(optimizer_step)
        images, targets, top1_labels = _mixed(images, labels, step, epoch, i)
        with gradient_sync(model, update):
            loss, output, skipped = train_step(model, optimizer, images, labels, step, targets=targets,
                                               group=group_length(i, accum, batches),
                                               first=i % accum == 0 or i == first_step, update=update)
        n = labels.shape[0]
        state.steps += 1
        if skipped:
            state.skipped_steps += 1
        elif not (step.skip_nonfinite and not update and not torch.isfinite(loss)):  # its update will be skipped
            first_bad = (state.first_bad_step < 0) & ~torch.isfinite(loss)
            state.first_bad_step = torch.where(first_bad, i, state.first_bad_step)
            state.loss_sum += loss.double() * n
            state.correct += top1_correct(output, top1_labels)
            state.samples += n
        if state.steps % check_every == 0:
            _raise_if_nonfinite(state)
        if update and (not logged or (step_offset + optimizer_step + 1) % step.log_every == 0):
            logged = True
            running = _running(state, loss)  # the only other host sync inside the epoch
            state.data_wait = clock.settle()
            if step.on_log is not None:
                step.on_log(step_offset + optimizer_step, {"loss": running["step_loss"], "lr": lr}, images)
        if progress is not None:
            progress.update(n)
        clock.step_queued()
        # Only after an update: a mid-epoch checkpoint never holds half a group's gradients.
        if update and stop_requested is not None and stop_requested(optimizer_step):
            interrupted = True
            break
    state.data_wait = clock.settle()
    state.seconds += time.perf_counter() - start
    _raise_if_nonfinite(state)
    if interrupted:
        return EpochResult({}, True, i + 1, state)
    if state.samples == 0:
        raise TrainerError("the training loader yielded no usable batch; lower --batch-size")
    final = _epoch_figures(state, loader, all_reduce)
    running.update(final)  # the closing progress line shows the epoch's figures, as the epoch line does
    label["scope"] = ""
    metrics = {
        "train_loss": final["loss"],
        "train_top1": final["top1"],
        "lr": lr,
        "train_samples": final["samples"],
        "skipped_samples": final["skipped"],
        "skipped_steps": state.skipped_steps,
        "epoch_seconds": state.seconds,
        "images_per_second": state.samples / max(state.seconds, 1e-9),
        "data_wait_fraction": state.data_wait / max(state.seconds, 1e-9),
    }
    return EpochResult(metrics, False, i + 1, state)


def _mixed(images: torch.Tensor, labels: torch.Tensor, step: StepConfig, epoch: int,
           index: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(images, soft targets or None, the labels train top-1 counts against) of batch `index`, mixed when asked."""
    if not step.mix.enabled:
        return images, None, labels
    height, width = images.shape[-2:]
    draw = draw_mix(step.mix, step.seed, epoch, index, height, width)
    return mix_batch(images, labels, step.num_classes, draw, step.label_smoothing)


def progress_postfix(running: dict[str, float | None], data_wait: float, seconds: float, scope: str = "") -> str:
    """Data wait, running loss and top-1 for the progress line, from host values only (`-`: none yet).

    `scope` says whose figures they are when not the epoch's of every rank ("rank 0 ").
    """
    loss, top1 = running["loss"], running["top1"]
    return (f"data wait {100 * data_wait / max(seconds, 1e-9):.0f}%  {scope}loss "
            f"{'-' if loss is None else f'{loss:.4f}'} top1 {'-' if top1 is None else f'{top1:.3f}'}")


def _raise_if_nonfinite(state: EpochState) -> None:
    bad = int(state.first_bad_step)
    if bad >= 0:
        raise TrainerError(f"non-finite loss at step {bad} of this epoch: training stopped, the last good checkpoints "
                           "are untouched (lower --lr, or pass --skip-nonfinite to skip such steps)")


def _epoch_figures(state: EpochState, loader: Iterable[Batch],
                   all_reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> dict[str, float]:
    """The epoch's loss, top-1, samples and unreadable samples, summed over the ranks by `all_reduce` (one sync)."""
    skipped = float(len(loader.skipped)) if isinstance(loader, BatchLoader) else 0.0
    counts = torch.tensor([float(state.samples), skipped], dtype=torch.float64, device=state.loss_sum.device)
    totals = torch.cat([state.loss_sum.view(1), state.correct.view(1), counts])
    if all_reduce is not None:  # on the device the sums live on, as `scoring.evaluate` reduces them
        totals = all_reduce(totals)
    totals = totals.cpu()
    n = float(totals[2])
    return {"loss": float(totals[0]) / n, "top1": float(totals[1]) / n, "samples": int(totals[2]),
            "skipped": int(totals[3])}


def _running(state: EpochState, step_loss: torch.Tensor | None = None) -> dict[str, float]:
    # The current step's loss rides along in the same device-to-host copy.
    extra = [step_loss.detach().double()] if step_loss is not None else []
    sums = torch.stack([state.loss_sum, state.correct, *extra]).cpu()
    running = {"loss": float(sums[0]) / max(state.samples, 1), "top1": float(sums[1]) / max(state.samples, 1)}
    if extra:
        running["step_loss"] = float(sums[2])
    return running
