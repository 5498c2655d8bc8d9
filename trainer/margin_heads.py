"""The margin heads (ArcFace, CosFace, with sub-centres), whole or sharded over the ranks (Partial FC), and the
model that puts one on a backbone.

`MarginHead` holds every class centre; `ShardedMarginHead` holds this rank's rows and, in
training, returns its own loss as a `HeadLoss`, the one interface through which the loop
learns that a head computed its loss. `trainer.models` builds them from a `HeadConfig`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from trainer.errors import TrainerError
from trainer.margins import MARGIN_HEADS, centre_cosines, margin_target, subcenter_cosines
from trainer.partial_fc import PartialFC, initial_centres


def margin_logits(cosines: torch.Tensor, labels: torch.Tensor, kind: str, margin: float, scale: float) -> torch.Tensor:
    """scale * cosines, with the true class's cosine made harder by `margins.margin_target`."""
    true = cosines.gather(1, labels.view(-1, 1))
    return scale * cosines.scatter(1, labels.view(-1, 1), margin_target(true, kind, margin))


def embedding_layer(in_features: int | None, embedding_dim: int) -> nn.Module:
    """A margin head's embedding: linear -> batch norm on a torchvision backbone's features; nothing (an identity)
    on a face backbone (`in_features` None), whose output is already the embedding."""
    if in_features is None:
        return nn.Identity()
    return nn.Sequential(nn.Linear(in_features, embedding_dim), nn.BatchNorm1d(embedding_dim))


class MarginHead(nn.Module):
    """[features -> linear -> batch norm] = the embedding; logits = scale * cosine to each L2-normalized class centre.

    `in_features` None: the input is the embedding already (a face backbone's). With `subcenters` K
    the centres are C * K rows, class-major, and a class's cosine is its closest sub-centre's
    (sub-centre ArcFace); K = 1 is the plain head. The centres start as `partial_fc.initial_centres`
    of `seed`, the rows a `ShardedMarginHead` of the same seed starts from; given `centres` are
    taken as they are. The margin is applied to the true class only in training and only when
    labels are given.
    """

    def __init__(self, in_features: int | None, num_classes: int, kind: str, embedding_dim: int = 512,
                 margin: float = 0.5, scale: float = 64.0, subcenters: int = 1, seed: int = 0,
                 centres: torch.Tensor | None = None) -> None:
        super().__init__()
        if kind not in MARGIN_HEADS:
            raise TrainerError(f"unknown margin head {kind!r}; use one of {', '.join(MARGIN_HEADS)}")
        self.kind, self.margin, self.scale, self.subcenters = kind, margin, scale, subcenters
        self.embedding = embedding_layer(in_features, embedding_dim)
        # Unit-scale centres: they are normalized anyway, and at a tiny scale Adam's steps (about lr per
        # coordinate) would swing their directions wildly.
        self.centres = nn.Parameter(initial_centres(0, num_classes, subcenters, embedding_dim, seed)
                                    if centres is None else centres)

    def cosines(self, embedding: torch.Tensor) -> torch.Tensor:
        """Cosine of each embedding to each class (its closest sub-centre), in float32 (an angle margin needs it)."""
        with torch.autocast(embedding.device.type, enabled=False):
            return subcenter_cosines(centre_cosines(embedding.float(), self.centres.float()), self.subcenters)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cosines = self.cosines(self.embedding(features))
        if labels is None or not self.training:
            return self.scale * cosines
        return margin_logits(cosines, labels, self.kind, self.margin, self.scale)


class HeadLoss(NamedTuple):
    """What a head that computes its own loss returns in training instead of logits (`ShardedMarginHead`).

    The loop takes `loss` as the step's loss and counts `correct` for the train top-1, as it would
    count the argmax of logits.
    """

    loss: torch.Tensor  # scalar: the mean loss of the batch (a sharded head: of every rank's batch)
    correct: torch.Tensor  # N booleans, one per sample of this rank's batch: its true class scored highest


class ShardedMarginHead(PartialFC):
    """A `MarginHead` with its centres sharded over the ranks and negatives sampled: Partial FC (`PartialFC`).

    The same parameters in the same order as `MarginHead` (`centres`, this rank's rows, then
    `embedding.*`), so the optimizer's state lines up whatever the world size. Called with labels in
    training it returns a `HeadLoss` whose `correct` is the train top-1 among the classes that took
    part (all of them at sample rate 1), the margin included, as `MarginHead`'s logits count it.
    It gives no logits: evaluate through `unsharded`.
    """

    def __init__(self, in_features: int | None, num_classes: int, kind: str, embedding_dim: int = 512,
                 margin: float = 0.5, scale: float = 64.0, subcenters: int = 1, seed: int = 0,
                 sample_rate: float = 1.0) -> None:
        super().__init__(embedding_dim, num_classes, kind=kind, margin=margin, scale=scale, sample_rate=sample_rate,
                         subcenters=subcenters, seed=seed)
        self.embedding = embedding_layer(in_features, embedding_dim)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> HeadLoss:  # type: ignore[override]
        if labels is None:
            raise TypeError("a sharded margin head computes a loss from labels and has no logits; evaluate the model "
                            "through models.unsharded")
        loss, hits = self.loss_and_hits(self.embedding(features), labels)
        rows = labels.shape[0]  # every rank's batch has as many rows: this rank's are its block of the global batch
        return HeadLoss(loss, hits[self.rank * rows:(self.rank + 1) * rows])


class MarginModel(nn.Module):
    """A backbone (torchvision's, its last linear layer an identity, or a face backbone), then a margin head
    (`MarginHead` or `ShardedMarginHead`); called as model(images, labels)."""

    def __init__(self, backbone: nn.Module, head: MarginHead | ShardedMarginHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | HeadLoss:
        return self.head(self.backbone(images), labels)
