"""An exponential moving average of the model's weights, as timm's `ModelEmaV3`, updated on the device.

After every optimizer step, each floating-point parameter and buffer of the averaged
copy moves toward the model's: e <- e + (1 - decay) (m - e), one `_foreach_lerp_` over
all of them; integer buffers (BatchNorm's batch counter) are copied. Batch-norm running
statistics are averaged like weights, as timm does by default. The decay is a host
number computed from the update count, so an update queues kernels and never waits.

Warm-up (timm's, after @crowsonkb): at the k-th update the decay is
1 - (1 + (k - 1) / gamma) ** -power, clamped to [min_decay, decay]; the first update
copies the model (decay 0). With gamma 1 and power 2/3 it is 1 - k ** (-2/3): 0.9 from
the 32nd update, 0.99 from the 1,000th, 0.999 from the 31,623rd. Early averages forget
the random initialization quickly; late ones average over many steps.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from trainer.checkpoint import unwrap


def ema_decay(update: int, decay: float, *, warmup: bool = True, gamma: float = 1.0, power: float = 2 / 3,
              min_decay: float = 0.0) -> float:
    """The decay used at the `update`-th update (counting from 1): 0 at the first, then `decay` or its warm-up."""
    steps = update - 1
    if steps <= 0:
        return 0.0
    if not warmup:
        return decay
    return max(min(1.0 - (1.0 + steps / gamma) ** -power, decay), min_decay)


class ModelEma:
    """The averaged copy of a model (`module`, in eval mode, without gradients) and its update count."""

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = True, warmup_gamma: float = 1.0,
                 warmup_power: float = 2 / 3) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        # The plain model under DDP or torch.compile: the copy must not carry their wrappers.
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.updates = 0

    def current_decay(self) -> float:
        """The decay the next update will use."""
        return ema_decay(self.updates + 1, self.decay, warmup=self.warmup, gamma=self.warmup_gamma,
                         power=self.warmup_power)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average toward `model` (wrapped or not) after an optimizer step; queues kernels only."""
        weight = 1.0 - self.current_decay()
        averaged, current, copied, sources = [], [], [], []
        for mine, theirs in zip(_tensors(self.module), _tensors(unwrap(model)), strict=True):
            if mine.is_floating_point():
                averaged.append(mine)
                current.append(theirs)
            else:
                copied.append(mine)
                sources.append(theirs)
        if averaged:
            torch._foreach_lerp_(averaged, current, weight)
        if copied:
            torch._foreach_copy_(copied, sources)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights and the update count (which fixes the next decay), for checkpoints."""
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`: the next update is the one the saved run would have made."""
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters then buffers, in registration order (the same order in the model and its copy)."""
    return [*module.parameters(), *module.buffers()]
