"""How a run validates and tests: the one place that knows closed-set accuracy from verification.

A pack split by image is validated closed-set (loss, top-k); a pack split by class holds
identities the head never saw in val and test, so it is validated by verification (AUC,
accuracy, EER, rank-1 of embeddings), which needs the embedding only, never the head.
`choose_validation` picks one object per run; the orchestrator asks it for the epoch's
figures, the test figures, the monitor check, the lines it prints and the curves
`plots.plot_curves` draws, and never looks at metric keys itself.

`validate(model, epoch, suffix=...)` measures any set of weights: a second set (averaged
weights, say) is validated by the same call with its own `suffix` on every key. Validation
and test see each image as `tta` says (`trainer.tta`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from torch import nn

from dali_pipes import BatchLoader, PackReader, split_kind
from trainer.distributed import DistContext
from trainer.embedding import split_embeddings, verification_figures
from trainer.errors import TrainerError
from trainer.models import unsharded
from trainer.plots import CURVE_COLORS, Curve
from trainer.scoring import evaluate
from trainer.tta import with_tta

REPORTED_TOPK = 5  # metrics always carry val_top5 / test_top5, whatever --topk says
VERIFICATION_KEYS = ("auc", "accuracy", "eer", "rank1")  # the scalars an epoch record holds


class Validation(ABC):
    """What every kind of validation offers; `ClosedSetValidation` and `VerificationValidation` fill it in.

    `eval_loader(split)` builds this rank's evaluation loader of a split; each split's loader
    is built once per run, on first use.
    """

    monitors: tuple[str, ...] = ()  # the --monitor values this validation measures

    def __init__(self, reader: PackReader, eval_loader: Callable[[str], BatchLoader], *, ctx: DistContext,
                 device: torch.device, amp_dtype: torch.dtype | None, topk: int, seed: int, tta: str = "none") -> None:
        self.reader, self.ctx, self.device, self.amp_dtype = reader, ctx, device, amp_dtype
        self.topk, self.seed, self.tta = topk, seed, tta
        self._eval_loader = eval_loader
        self._loaders: dict[str, BatchLoader] = {}

    def loader(self, split: str) -> BatchLoader:
        """This rank's evaluation loader of `split`, built on first use."""
        if split not in self._loaders:
            self._loaders[split] = self._eval_loader(split)
        return self._loaders[split]

    @property
    def validates(self) -> bool:
        """Whether there is anything to validate on (a val split): else epochs are not ranked and never stop early."""
        return True

    @property
    def test_split(self) -> str:
        """The split the best weights are tested on: test, or val when the pack has no test split."""
        return "test" if self.reader.split_counts()["test"] > 0 else "val"

    @classmethod
    def check_monitor(cls, reader: PackReader, monitor: str) -> None:
        """Refuse a --monitor this kind of validation does not measure on `reader`'s pack, with the fix."""
        if monitor not in cls.monitors:
            raise TrainerError(cls.monitor_error(reader, monitor))

    @classmethod
    @abstractmethod
    def monitor_error(cls, reader: PackReader, monitor: str) -> str:
        """The one line that says why `monitor` does not fit `reader`'s pack and what does."""

    @abstractmethod
    def validate(self, model: nn.Module, epoch: int, suffix: str = "") -> dict[str, Any]:
        """The epoch's val figures of `model`, each key ending in `suffix` (the same on every rank)."""

    @abstractmethod
    def test(self, model: nn.Module) -> dict[str, Any]:
        """The test figures of `model` on `test_split`, as summary.json holds them."""

    @abstractmethod
    def val_text(self, record: dict[str, Any], suffix: str = "") -> str:
        """The val part of the epoch line, from the keys ending in `suffix`."""

    @abstractmethod
    def test_line(self, summary: dict[str, Any]) -> str:
        """The test figures, as the run's last line says them."""

    @abstractmethod
    def curves(self) -> list[Curve]:
        """The validation curves of curves.png (the train curves and the learning rate are always drawn)."""

    def epoch_line(self, record: dict[str, Any], epochs: int, best: bool) -> str:
        """The one summary line printed after each epoch (`record` is its metrics.jsonl line)."""
        r = record
        averaged = f"  |  ema {self.val_text(r, '_ema')}" if any(key.endswith("_ema") for key in r) else ""
        return (f"epoch {r['epoch']}/{epochs}  train loss {r['train_loss']:.4f} top1 {r['train_top1']:.3f}  |  "
                f"{self.val_text(r)}{averaged}  |  lr {r['lr']:.2e}  {r['images_per_second']:,.0f} img/s  "
                f"data wait {100 * r['data_wait_fraction']:.0f}%  {r['epoch_seconds']:.1f}s"
                + (f"  skipped {r['skipped_samples']}" if r.get("skipped_samples") else "")
                + ("  * best" if best else ""))


def topk_keys(result: dict[str, Any], prefix: str, topk: int, num_classes: int, suffix: str = "") -> dict[str, Any]:
    """prefix_top1..prefix_topK (+ suffix) for K = max(topk, 5); k >= num_classes is 1.0 by definition.

    All None when nothing was measured (`result["loss"]` None: no val split).
    """
    ks = range(1, max(topk, REPORTED_TOPK) + 1)
    if result["loss"] is None:
        return {f"{prefix}_top{k}{suffix}": None for k in ks}
    return {f"{prefix}_top{k}{suffix}": result[f"top{k}"] if k <= num_classes else 1.0 for k in ks}


class ClosedSetValidation(Validation):
    """Loss and top-k accuracy over the classes of the head (a pack split by image)."""

    monitors = ("val_loss", "val_top1")

    @property
    def validates(self) -> bool:
        return self.reader.split_counts()["val"] > 0

    @classmethod
    def monitor_error(cls, reader: PackReader, monitor: str) -> str:
        return (f"--monitor {monitor} needs a pack split by class (tools/pack_dataset.py --split-by class); "
                f"{reader.path} is split by image: use val_loss or val_top1")

    def _evaluate(self, model: nn.Module, split: str, epoch: int) -> dict[str, Any]:
        loader = self.loader(split)
        loader.set_epoch(epoch)
        # Logits over every class: a sharded head's centres are gathered on every rank for the evaluation.
        return evaluate(with_tta(unsharded(model), self.tta), loader, device=self.device,
                        num_classes=self.reader.num_classes,
                        topk=max(self.topk, REPORTED_TOPK), amp_dtype=self.amp_dtype, all_reduce=self.ctx.all_reduce)

    def validate(self, model: nn.Module, epoch: int, suffix: str = "") -> dict[str, Any]:
        result = self._evaluate(model, "val", epoch) if self.validates else {"loss": None}
        return {f"val_loss{suffix}": result["loss"],
                **topk_keys(result, "val", self.topk, self.reader.num_classes, suffix)}

    def test(self, model: nn.Module) -> dict[str, Any]:
        result = self._evaluate(model, self.test_split, 0)
        return {"test_loss": result["loss"], **topk_keys(result, "test", self.topk, self.reader.num_classes),
                "test_samples": result["num_samples"], "test_skipped_samples": result.get("skipped_samples", 0)}

    def val_text(self, record: dict[str, Any], suffix: str = "") -> str:
        if record[f"val_loss{suffix}"] is None:
            return "val -"
        return (f"val loss {record[f'val_loss{suffix}']:.4f} top1 {record[f'val_top1{suffix}']:.3f} "
                f"top5 {record[f'val_top5{suffix}']:.3f}")

    def test_line(self, summary: dict[str, Any]) -> str:
        return (f"test loss {summary['test_loss']:.4f} top1 {summary['test_top1']:.3f} "
                f"top5 {summary['test_top5']:.3f}")

    def curves(self) -> list[Curve]:
        if not self.validates:
            return []
        k = max(self.topk, REPORTED_TOPK)
        color = CURVE_COLORS[0]
        return [Curve("val_loss", "val", "loss", color), Curve("val_top1", "val top-1", "accuracy", color),
                Curve(f"val_top{k}", f"val top-{k}", "accuracy", color, "^", "--")]


class VerificationValidation(Validation):
    """Verification of embeddings over identities the head never trained on (a pack split by class)."""

    monitors = ("val_auc",)

    @classmethod
    def monitor_error(cls, reader: PackReader, monitor: str) -> str:
        return (f"{reader.path} is split by class (val holds identities without a class in the head): "
                f"pass --monitor val_auc, validation is by verification there")

    def _figures(self, model: nn.Module, split: str) -> dict[str, Any]:
        embeddings, labels = split_embeddings(model, self.reader, split, ctx=self.ctx, amp_dtype=self.amp_dtype,
                                              loader=self.loader(split), tta=self.tta)
        return verification_figures(embeddings, labels, seed=self.seed, device=self.device)[0]

    def validate(self, model: nn.Module, epoch: int, suffix: str = "") -> dict[str, Any]:
        figures = self._figures(model, "val")
        return {f"val_{key}{suffix}": figures[key] for key in VERIFICATION_KEYS}

    def test(self, model: nn.Module) -> dict[str, Any]:
        return {f"test_{key}": value for key, value in self._figures(model, self.test_split).items()}

    def val_text(self, record: dict[str, Any], suffix: str = "") -> str:
        return (f"val auc {record[f'val_auc{suffix}']:.4f} accuracy {record[f'val_accuracy{suffix}']:.3f} "
                f"eer {record[f'val_eer{suffix}']:.3f}")

    def test_line(self, summary: dict[str, Any]) -> str:
        return (f"test verification auc {summary['test_auc']:.4f} accuracy {summary['test_accuracy']:.3f} "
                f"eer {summary['test_eer']:.3f}")

    def curves(self) -> list[Curve]:
        return [Curve("val_auc", "val verification AUC", "accuracy", CURVE_COLORS[1]),
                Curve("val_accuracy", "val verification accuracy", "accuracy", CURVE_COLORS[2], "^", "--")]


def validation_kind(reader: PackReader) -> type[Validation]:
    """The kind of validation `reader`'s pack gets: by verification when it is split by class, else closed-set."""
    return VerificationValidation if split_kind(reader.labels, reader.splits) == "class" else ClosedSetValidation


def choose_validation(reader: PackReader, monitor: str, eval_loader: Callable[[str], BatchLoader], *,
                      ctx: DistContext, device: torch.device, amp_dtype: torch.dtype | None, topk: int,
                      seed: int, tta: str = "none") -> Validation:
    """The run's validation, chosen once from how `reader`'s pack is split; refuses a `monitor` it does not measure."""
    kind = validation_kind(reader)
    kind.check_monitor(reader, monitor)
    return kind(reader, eval_loader, ctx=ctx, device=device, amp_dtype=amp_dtype, topk=topk, seed=seed, tta=tta)
