"""Scoring a model on batches: `evaluate` (loss, top-1..top-k, per-class counts), the top-k credit rule, and
`HostGather`, which brings device results to the host in a few large copies.

Like the training loop, it takes `(images, labels)` already on the device from any
backend; sums are kept on the device and reach the host once, at the end.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from dali_pipes import BatchLoader
from trainer.errors import TrainerError

Batch = tuple[torch.Tensor, torch.Tensor]


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


class HostGather:
    """Device tensors gathered batch by batch and copied to the host `every` batches, not each one.

    Each copy to the host waits for the GPU; one per batch would stall the loop that many
    times. Concatenated in order by `result`.
    """

    def __init__(self, every: int = 64) -> None:
        self._every = every
        self._pending: list[torch.Tensor] = []
        self._host: list[torch.Tensor] = []

    def add(self, tensor: torch.Tensor) -> None:
        """Keep `tensor` (on any device) for `result`."""
        self._pending.append(tensor)
        if len(self._pending) >= self._every:
            self._copy()

    def _copy(self) -> None:
        if self._pending:
            self._host.append(torch.cat(self._pending).cpu())
            self._pending = []

    def result(self) -> torch.Tensor | None:
        """Everything added, in order, as one CPU tensor (None when nothing was)."""
        self._copy()
        return torch.cat(self._host) if self._host else None


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
    targets, predictions = HostGather(), HostGather()
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
            targets.add(labels)
            predictions.add(logits.argmax(1))
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
        none, kept_targets, kept_predictions = torch.zeros(0, dtype=torch.int64), targets.result(), predictions.result()
        result["targets"] = none if kept_targets is None else kept_targets
        result["predictions"] = none if kept_predictions is None else kept_predictions
    return result
