"""The margin arithmetic every margin head shares: the true class's harder cosine, and sub-centre cosines.

Pure functions on tensors, used by `models.MarginHead` (all centres on one process) and by
`partial_fc.PartialFC` (centres sharded over ranks), so both heads train the same objective.
"""
from __future__ import annotations

import math

import torch

MARGIN_HEADS = ("arcface", "cosface")


def margin_target(true: torch.Tensor, kind: str, margin: float) -> torch.Tensor:
    """The true class's cosine made harder: cos(theta + m) (arcface) or cos(theta) - m (cosface).

    ArcFace's cos(theta + m) turns back up past theta = pi - m; there it uses
    cos(theta) - m sin(m) instead (as insightface did), so the target stays monotonic.
    """
    if kind == "arcface":
        # cos(theta + m) from the sine, without acos's infinite gradient at +-1 (the clamp keeps 1 - cos^2 >= 0).
        sine = (1.0 - true * true).clamp_min(0.0).sqrt()
        shifted = true * math.cos(margin) - sine * math.sin(margin)
        return torch.where(true > math.cos(math.pi - margin), shifted, true - margin * math.sin(margin))
    if kind == "cosface":
        return true - margin
    raise ValueError(f"unknown margin head {kind!r}; use one of {', '.join(MARGIN_HEADS)}")


def subcenter_cosines(cosines_kc: torch.Tensor, k: int) -> torch.Tensor:
    """N x C cosines from N x (C * k) cosines to k sub-centres per class: each class's closest sub-centre.

    Columns are class-major (class c's sub-centres are columns c * k ... c * k + k - 1), as sub-centre
    ArcFace (Deng et al., 2020) lays out its C * k centres. k = 1 returns the input itself.
    """
    if k == 1:
        return cosines_kc
    return cosines_kc.unflatten(1, (-1, k)).max(dim=2).values  # saves N x C indices, not the N x Ck input
