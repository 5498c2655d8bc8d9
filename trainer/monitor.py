"""The monitored figure: which way is better, the one improvement rule, and early stopping.

`Improvement` is the rule `EarlyStopping` (here) and the plateau schedule (`trainer.optim.Plateau`)
both follow: a value counts as better only when it beats the best so far by more than
`min_delta`, and every epoch that does not counts as a bad one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dali_pipes import plural

MONITORS = ("val_loss", "val_top1", "val_auc")  # what --monitor takes; the run's validation says which apply


def monitor_mode(monitor: str) -> str:
    """'min' for losses, 'max' for accuracies and areas."""
    return "min" if monitor.endswith("loss") else "max"


def monitored_value(record: dict[str, Any], monitor: str) -> tuple[float | None, str]:
    """An epoch record's monitored figure and whose it is: the trained weights' ("raw"), or the averaged weights'
    (`<monitor>_ema`, "ema") when they are strictly better."""
    raw, averaged = record[monitor], record.get(monitor + "_ema")
    if raw is None or averaged is None:
        return raw, "raw"
    better = averaged < raw if monitor_mode(monitor) == "min" else averaged > raw
    return (averaged, "ema") if better else (raw, "raw")


@dataclass
class Improvement:
    """The best value of a figure so far, and how many updates in a row brought nothing better."""

    mode: str = "min"  # min: lower is better; max: higher is better
    min_delta: float = 0.0
    best: float | None = None
    bad_epochs: int = 0

    def update(self, value: float) -> bool:
        """Record one value; True when it is a new best (which resets `bad_epochs`)."""
        if self.best is None or (value < self.best - self.min_delta if self.mode == "min"
                                 else value > self.best + self.min_delta):
            self.best, self.bad_epochs = value, 0
            return True
        self.bad_epochs += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        """Plain values for checkpoints."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the keys of `state_dict` that `state` holds."""
        for key in asdict(self):
            if key in state:
                setattr(self, key, state[key])


class EarlyStopping:
    """Tracks the best epoch of the monitored metric, and stops after `patience` epochs without improvement."""

    def __init__(self, monitor: str = "val_loss", patience: int = 5, min_delta: float = 0.0) -> None:
        self.monitor = monitor
        self.patience = patience
        self.tracker = Improvement(monitor_mode(monitor), min_delta)
        self.best_epoch = -1  # 0-based index of the best epoch (-1: none yet)

    @property
    def best(self) -> float | None:
        """The best value so far (None before the first epoch)."""
        return self.tracker.best

    def update(self, value: float, epoch: int) -> bool:
        """Record 0-based `epoch`'s value; True when it is a new best."""
        if self.tracker.update(value):
            self.best_epoch = epoch
            return True
        return False

    def last_is_best(self, epoch: int) -> bool:
        """Without a monitored value nothing ranks the epochs: keep the latest as the best."""
        self.best_epoch = epoch
        return True

    @property
    def should_stop(self) -> bool:
        """True once `patience` epochs in a row brought no improvement (patience 0: never)."""
        return self.patience > 0 and self.tracker.bad_epochs >= self.patience

    def reason(self) -> str:
        """Why training stopped, in words."""
        return (f"{self.monitor} did not improve by more than {self.tracker.min_delta:g} for "
                f"{plural(self.patience, 'epoch')} "
                f"(best {self.best:.4f} at epoch {self.best_epoch + 1})")

    def state_dict(self) -> dict[str, Any]:
        """State for checkpoints: monitor, patience, best_epoch and the tracker's min_delta, best, bad_epochs."""
        return {"monitor": self.monitor, "patience": self.patience, "best_epoch": self.best_epoch,
                **self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict` (also one written without the tracker's `mode`)."""
        self.monitor, self.patience, self.best_epoch = state["monitor"], state["patience"], state["best_epoch"]
        self.tracker.load_state_dict({**state, "mode": monitor_mode(self.monitor)})
