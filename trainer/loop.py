"""The engine: one train step path, `train_one_epoch`, `evaluate`, top-k.

The loop receives an iterable of `(images, labels)` already on the device and never
learns which backend made it, nor which head it trains: a model gives logits, or its own
loss and top-1 hits as a `models.HeadLoss` (a sharded margin head). Host-device syncs (`.item()`) happen only every
`log_every` steps and at the end of an epoch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from dali_pipes import BatchLoader, Progress
from trainer.data_wait import DataWaitClock
from trainer.errors import TrainerError
from trainer.models import HeadLoss
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


def topk_credit(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """len(ks) x N credit in [0, 1] of each sample being in the top k, ties resolved by their expected value.

    A sample is ranked by how many classes score strictly higher than its true class
    (`above`) and how many others score exactly the same (`tied`). Breaking ties at
    random, the true class lands in the top k with probability
    clamp((k - above) / (tied + 1), 0, 1); that expectation is its credit. So a constant
    model scores exactly k / K, never more. Pass `ks` as a float tensor on the logits'
    device to avoid a host-to-device copy (a sync) per call.
    """
    logits = logits.float()
    true_score = logits.gather(1, labels.view(-1, 1))
    above = (logits > true_score).sum(1).float()
    tied = (logits == true_score).sum(1).float() - 1.0
    ks_t = ks if isinstance(ks, torch.Tensor) else torch.tensor(list(ks), dtype=torch.float32, device=logits.device)
    ks_t = ks_t.view(-1, 1)
    return ((ks_t - above.view(1, -1)) / (tied.view(1, -1) + 1.0)).clamp_(0.0, 1.0)


@dataclass
class StepConfig:
    """What every train step needs besides the batch."""

    criterion: nn.Module
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    log_every: int = 20
    grad_clip: float | None = None
    skip_nonfinite: bool = False
    with_labels: bool = False  # the model takes the labels too (a margin head: see models.takes_labels)
    # Called as on_log(step, {"loss": this step's loss, "lr": ...}, images) at each --log-every sync (TensorBoard).
    on_log: Callable[[int, dict[str, float], torch.Tensor], None] | None = None


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
               step: StepConfig) -> tuple[torch.Tensor, torch.Tensor | HeadLoss, bool]:
    """Forward, backward and update for one batch.

    Returns (loss, the model's output: logits or a `HeadLoss`) still on the device, and whether
    the update was skipped (only with `skip_nonfinite`, which costs one host sync per step to decide).
    """
    with torch.autocast(images.device.type, dtype=step.amp_dtype or torch.float32, enabled=step.amp_dtype is not None):
        output = model(images, labels) if step.with_labels else model(images)
        loss = output.loss if isinstance(output, HeadLoss) else step.criterion(output, labels)
    output = HeadLoss(loss.detach(), output.correct) if isinstance(output, HeadLoss) else output.detach()
    optimizer.zero_grad(set_to_none=True)
    step.scaler.scale(loss).backward()
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
    return loss.detach(), output, False


def top1_correct(output: torch.Tensor | HeadLoss, labels: torch.Tensor) -> torch.Tensor:
    """How many samples of a batch the model's top-1 got right: the argmax of logits, or a `HeadLoss`'s own hits."""
    return output.correct.sum() if isinstance(output, HeadLoss) else (output.argmax(1) == labels).sum()


def train_one_epoch(model: nn.Module, loader: Iterable[Batch], optimizer: torch.optim.Optimizer, step: StepConfig, *,
                    device: torch.device, set_lr: Callable[[int], float], set_train_mode: Callable[[], None],
                    progress: Progress | None = None, first_step: int = 0, resume_state: EpochState | None = None,
                    stop_requested: Callable[[int], bool] | None = None) -> EpochResult:
    """One pass over `loader` (which starts at step `first_step` of the epoch).

    `set_lr(i)` is called before step i and returns the rate it set. After each step,
    `stop_requested(i)` may end the epoch early (a signal): the result then says
    `interrupted` and carries the sums so far, for a mid-epoch checkpoint. A
    non-finite loss stops training with the step named (checked every step on the CPU,
    every `log_every` steps on a GPU, where each check is a host sync), unless
    `skip_nonfinite`, which skips such steps and counts them.
    """
    set_train_mode()
    state = resume_state or EpochState(device)
    check_every = 1 if device.type == "cpu" else step.log_every
    lr = float("nan")
    start = time.perf_counter()
    prior_seconds = state.seconds  # of a resumed epoch's earlier session
    clock = DataWaitClock(device, state.data_wait)
    running: dict[str, float | None] = {"loss": None, "top1": None}  # shown as `-` until the first sync
    if progress is not None:
        progress.set_postfix(
            lambda: progress_postfix(running, state.data_wait, prior_seconds + time.perf_counter() - start))
    i = first_step - 1
    interrupted = False
    for i, (images, labels) in enumerate(loader, start=first_step):
        clock.batch_arrived()
        lr = set_lr(i)
        loss, output, skipped = train_step(model, optimizer, images, labels, step)
        n = labels.shape[0]
        state.steps += 1
        if skipped:
            state.skipped_steps += 1
        else:
            first_bad = (state.first_bad_step < 0) & ~torch.isfinite(loss)
            state.first_bad_step = torch.where(first_bad, i, state.first_bad_step)
            state.loss_sum += loss.double() * n
            state.correct += top1_correct(output, labels)
            state.samples += n
        if state.steps % check_every == 0:
            _raise_if_nonfinite(state)
        if state.steps % step.log_every == 0:
            running = _running(state, loss)  # the only other host sync inside the epoch
            state.data_wait = clock.settle()
            if step.on_log is not None:
                step.on_log(i, {"loss": running["step_loss"], "lr": lr}, images)
        if progress is not None:
            progress.update(n)
        clock.step_queued()
        if stop_requested is not None and stop_requested(i):
            interrupted = True
            break
    state.data_wait = clock.settle()
    state.seconds += time.perf_counter() - start
    _raise_if_nonfinite(state)
    if interrupted:
        return EpochResult({}, True, i + 1, state)
    if state.samples == 0:
        raise TrainerError("the training loader yielded no usable batch; lower --batch-size")
    final = _running(state)
    running.update(final)  # the closing progress line shows the epoch's figures
    metrics = {
        "train_loss": final["loss"],
        "train_top1": final["top1"],
        "lr": lr,
        "train_samples": state.samples,
        "skipped_steps": state.skipped_steps,
        "epoch_seconds": state.seconds,
        "images_per_second": state.samples / max(state.seconds, 1e-9),
        "data_wait_fraction": state.data_wait / max(state.seconds, 1e-9),
    }
    return EpochResult(metrics, False, i + 1, state)


def progress_postfix(running: dict[str, float | None], data_wait: float, seconds: float) -> str:
    """Data wait, running loss and top-1 for the progress line, from host values only (`-`: none yet)."""
    loss, top1 = running["loss"], running["top1"]
    return (f"data wait {100 * data_wait / max(seconds, 1e-9):.0f}%  loss {'-' if loss is None else f'{loss:.4f}'} "
            f"top1 {'-' if top1 is None else f'{top1:.3f}'}")


def _raise_if_nonfinite(state: EpochState) -> None:
    bad = int(state.first_bad_step)
    if bad >= 0:
        raise TrainerError(f"non-finite loss at step {bad} of this epoch: training stopped, the last good checkpoints "
                           "are untouched (lower --lr, or pass --skip-nonfinite to skip such steps)")


def _running(state: EpochState, step_loss: torch.Tensor | None = None) -> dict[str, float]:
    # The current step's loss rides along in the same device-to-host copy.
    extra = [step_loss.detach().double()] if step_loss is not None else []
    sums = torch.stack([state.loss_sum, state.correct, *extra]).cpu()
    running = {"loss": float(sums[0]) / max(state.samples, 1), "top1": float(sums[1]) / max(state.samples, 1)}
    if extra:
        running["step_loss"] = float(sums[2])
    return running


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Batch], *, device: torch.device, num_classes: int, topk: int = 5,
             amp_dtype: torch.dtype | None = None,
             all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
             keep_predictions: bool = False) -> dict[str, Any]:
    """Loss and top-1..top-k accuracy over every sample `loader` yields.

    Sums, never per-batch means, are accumulated, and `all_reduce` (for DDP) adds them
    across ranks before dividing, so the figures are exact whatever the sharding.
    Returns loss, top1..top{k}, num_samples, per_class_correct / per_class_count lists,
    `skipped_samples` (unreadable images the loader left out, all ranks together) when
    the loader keeps a `skipped` list, and with `keep_predictions`, this rank's
    `targets` and `predictions` (argmax) tensors.
    """
    model.eval()
    k = max(1, min(topk, num_classes))
    ks = list(range(1, k + 1))
    ks_t = torch.arange(1, k + 1, device=device, dtype=torch.float32)  # made on the device once, not per batch
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros(len(ks), device=device, dtype=torch.float64)
    class_correct = torch.zeros(num_classes, device=device, dtype=torch.float64)
    class_count = torch.zeros(num_classes, device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    targets, predictions = [], []
    for images, labels in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        loss_sum += criterion(logits, labels).double()
        credit = topk_credit(logits, labels, ks_t).double()
        correct += credit.sum(1)
        class_correct.index_add_(0, labels, credit[0])
        class_count.index_add_(0, labels, torch.ones_like(credit[0]))
        count += labels.shape[0]
        if keep_predictions:
            targets.append(labels.cpu())
            predictions.append(logits.argmax(1).cpu())
    # The skip count rides along in the same all_reduce (every rank has the same backend).
    keeps_skips = isinstance(loader, BatchLoader)  # a plain iterable of batches has no skip log
    skipped = torch.tensor([float(len(loader.skipped) if keeps_skips else 0)], device=device, dtype=torch.float64)
    totals = torch.cat([loss_sum.view(1), correct, class_correct, class_count, count.view(1), skipped])
    if all_reduce is not None:
        totals = all_reduce(totals)
    totals = totals.cpu()
    n = float(totals[-2])
    if n == 0:
        raise TrainerError("evaluation saw no samples")
    result: dict[str, Any] = {"num_samples": int(n), "loss": float(totals[0]) / n}
    if keeps_skips:
        result["skipped_samples"] = int(totals[-1])
    for j, kk in enumerate(ks):
        result[f"top{kk}"] = float(totals[1 + j]) / n
    result["per_class_correct"] = totals[1 + len(ks) : 1 + len(ks) + num_classes].tolist()
    result["per_class_count"] = [int(c) for c in totals[1 + len(ks) + num_classes : -2].tolist()]
    if keep_predictions:
        result["targets"] = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.int64)
        result["predictions"] = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.int64)
    return result

