"""Building classifiers: torchvision's and the face backbones, weights, a head that fits the pack, frozen blocks.

`HeadConfig` describes the head once: `build_model` builds it, a checkpoint stores it under
`head`, and a resume compares it. With a linear head the model's state-dict keys stay
exactly torchvision's, so a checkpoint's `model` loads into
`torchvision.models.<arch>(num_classes=K)` directly.
A margin head (`arcface`, `cosface`) wraps the torchvision model, its last linear layer
made an identity, as `MarginModel`: keys `backbone.*` (torchvision's, less that layer),
`head.embedding.0.*` (linear), `head.embedding.1.*` (batch norm), `head.centres`
(classes x sub-centres rows, class-major, of D). A face backbone (`face_backbones`) ends in
its own embedding, so its margin head has no `head.embedding` and its linear or mlp head
(`FaceClassifier`) reads the embedding.

Trained on several processes, or sampling classes (`--sample-rate`), the margin head is a
`ShardedMarginHead` (Partial FC): the same keys, `head.centres` holding this rank's rows;
in training it returns its own loss as a `HeadLoss`, the one interface through which the
loop learns that a head computed its loss. `unsharded` makes it whole for evaluation. The
margin heads themselves are `trainer.margin_heads`'.
"""
from __future__ import annotations

import dataclasses
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torchvision
from torch import nn

from dali_pipes import plural
from trainer.checkpoint import EXPORTED_KINDS, model_file_kind
from trainer.config import HEAD_TYPES, RunConfig, no_imagenet_weights
from trainer.errors import TrainerError, first_line
from trainer.face_backbones import FACE_ARCHS, face_backbone
from trainer.margin_heads import MarginHead, MarginModel, ShardedMarginHead
from trainer.margins import MARGIN_HEADS

HEAD_ATTRIBUTES = ("fc", "classifier", "head", "heads")
DEFAULT_MARGIN = {"arcface": 0.5, "cosface": 0.35}  # insightface's: additive angle (radians), subtracted cosine


def classification_models() -> list[str]:
    """Names torchvision lists as image-classification models."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


@dataclass(frozen=True)
class HeadConfig:
    """The classifier head `build_model` puts on a backbone, stored as `to_dict()` under a checkpoint's `head` key.

    Fields share the names of `trainer run`'s options (`type` is `--head`), so a field added
    here with a default, beside the `RunConfig` field of the same name, reaches the model, the
    checkpoint and the resume check at once, and checkpoints written without it still load.
    """

    type: str = "linear"  # linear, mlp, or a margin head (MARGIN_HEADS)
    hidden: int = 512  # mlp: hidden units
    dropout: float = 0.2  # mlp; and a face backbone's, before its embedding layer
    activation: str = "relu"  # mlp: relu or leaky_relu
    embedding_dim: int = 512  # margin heads, and face backbones
    margin: float | None = None  # margin heads; None: the type's DEFAULT_MARGIN (resolved on creation)
    scale: float = 64.0  # margin heads: logits are scale * cosine
    subcenters: int = 1  # margin heads: centres per class, a class's cosine its closest one's

    def __post_init__(self) -> None:
        if self.type not in HEAD_TYPES:
            raise TrainerError(f"unknown head {self.type!r}; use one of {', '.join(HEAD_TYPES)}")
        if self.type in MARGIN_HEADS and self.margin is None:  # resolved here, so a checkpoint holds the margin used
            object.__setattr__(self, "margin", DEFAULT_MARGIN[self.type])

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, as a checkpoint stores it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "HeadConfig":
        """A checkpoint's `head` dict; keys it lacks (written before the field existed) take their defaults."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})

    @classmethod
    def from_run(cls, cfg: RunConfig) -> "HeadConfig":
        """The head `cfg` describes: `--head` names the type, the other fields share their option's name."""
        return cls.from_dict({**cfg.to_dict(), "type": cfg.head})


def build_model(arch: str, num_classes: int, *, weights: str = "none", head: HeadConfig = HeadConfig(),
                sample_rate: float | None = None) -> nn.Module:
    """A torchvision `arch` or face backbone with `weights` loaded and `head` on it for `num_classes`.

    weights: "imagenet" (torchvision's default weights, downloaded into the torch cache),
    "none" (random init), or a path to a state dict or one of our checkpoints whose
    backbone keys match (its classifier is dropped when the class count differs).
    A margin head (arcface, cosface) makes a `MarginModel`; with a `sample_rate` its centres are
    sharded over the ranks of the process group (`ShardedMarginHead`, see `sharded_rate`).
    """
    if arch in FACE_ARCHS:
        return _face_model(arch, num_classes, weights, head, sample_rate)
    if arch not in classification_models():
        raise TrainerError(f"unknown architecture {arch!r}; try mobilenet_v2, resnet18, resnet50 "
                           f"(any of: {', '.join(classification_models()[:8])}, ...), or a face backbone "
                           f"({', '.join(FACE_ARCHS)})")
    model = torchvision.models.get_model(arch, weights=None)
    if weights == "imagenet":
        model.load_state_dict(_imagenet_state_dict(arch))
    elif weights != "none":
        _load_backbone(model, Path(weights), arch)
    if head.type in MARGIN_HEADS:
        return margin_model(model, num_classes, head, sample_rate)
    replace_head(model, num_classes, head)
    return model


def sharded_rate(head: HeadConfig, sample_rate: float, distributed: bool) -> float | None:
    """The `build_model` sample rate of a training run: a margin head is sharded (Partial FC) under DDP, where
    each rank then holds about 1 / world of the centres and their optimizer state, or when it samples classes;
    None (the unsharded `MarginHead`) otherwise."""
    return sample_rate if head.type in MARGIN_HEADS and (distributed or sample_rate < 1) else None


class FaceClassifier(nn.Module):
    """A face backbone (its output the embedding) with a linear or mlp classifier `fc` on the embedding."""

    def __init__(self, backbone: nn.Module, fc: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = fc

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(images))


def _face_model(arch: str, num_classes: int, weights: str, head: HeadConfig, sample_rate: float | None) -> nn.Module:
    """A face backbone ending in the `head.embedding_dim` embedding, the head directly on it."""
    if weights == "imagenet":
        raise TrainerError(no_imagenet_weights(arch))
    backbone = face_backbone(arch, head.embedding_dim, head.dropout)
    if weights != "none":
        _load_backbone(backbone, Path(weights))
    if head.type in MARGIN_HEADS:
        return MarginModel(backbone, margin_head(None, num_classes, head, sample_rate))
    model = FaceClassifier(backbone, nn.Linear(head.embedding_dim, num_classes))
    replace_head(model, num_classes, head)
    return model


def _imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except (urllib.error.URLError, OSError, RuntimeError, ConnectionError) as exc:
        reason = str(getattr(exc, "reason", exc)).splitlines()[0][:80]
        raise TrainerError(f"cannot download ImageNet weights for {arch} ({reason}); pass --weights none, "
                           "or --weights PATH to a local file") from None


def _load_backbone(model: nn.Module, path: Path, arch: str) -> None:
    if not path.is_file():
        raise TrainerError(f"--weights {path}: no such file (use imagenet, none, or a path to a state dict or "
                           "checkpoint)")
    kind = model_file_kind(path)
    if kind in EXPORTED_KINDS:
        raise TrainerError(f"--weights {path}: {EXPORTED_KINDS[kind]} (trainer export); --weights takes a state dict "
                           "or a checkpoint: the best.pt of the run it came from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - anything unreadable gets one line
        raise TrainerError(f"--weights {path}: not a readable state dict or checkpoint "
                           f"({first_line(exc, 100)})") from None
    theirs = state.get("arch") if isinstance(state, dict) else None  # one of our checkpoints names its architecture
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if isinstance(state, dict) and any(str(k).startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}  # a margin model's
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TrainerError(f"--weights {path}: not a state dict or one of our checkpoints")
    own = model.state_dict()
    # The classifier is replaced afterwards, so its shape may differ: keep only matching tensors.
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    backbone = [k for k in own if not _is_head_key(k)]
    missing = [k for k in backbone if k not in matching]
    if missing and isinstance(theirs, str) and theirs != arch:
        raise TrainerError(f"--weights {path}: a {theirs} checkpoint does not fit --arch {arch}; pass --arch {theirs}")
    if missing:
        tensors = plural(len(missing), "backbone tensor")
        raise TrainerError(f"--weights {path}: does not fit {type(model).__name__} ({tensors} missing or of another "
                           f"shape, e.g. {missing[0]})")
    model.load_state_dict(matching, strict=False)


def _is_head_key(key: str) -> bool:
    return key.split(".", 1)[0] in HEAD_ATTRIBUTES


def _head_attribute(model: nn.Module) -> str:
    for name in HEAD_ATTRIBUTES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise TrainerError(f"{type(model).__name__}: no classifier found (looked for {', '.join(HEAD_ATTRIBUTES)})")


def _last_linear(module: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    found = None
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear):
            found = name
    if found is None:
        raise TrainerError(f"{type(module).__name__}: classifier has no linear layer to replace")
    parent_name, _, attr = found.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    return parent, attr, getattr(parent, attr)


def mlp_head(in_features: int, num_classes: int, hidden: int, dropout: float, activation: str) -> nn.Sequential:
    """dropout -> linear -> batch norm -> activation -> dropout -> linear."""
    act: nn.Module = nn.LeakyReLU(0.01, inplace=True) if activation == "leaky_relu" else nn.ReLU(inplace=True)
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), act,
                         nn.Dropout(dropout), nn.Linear(hidden, num_classes))


def replace_head(model: nn.Module, num_classes: int, head: HeadConfig) -> None:
    """Fit the classifier to `num_classes`: a new last Linear (linear) or a new MLP (mlp)."""
    attr = _head_attribute(model)
    classifier = getattr(model, attr)
    if isinstance(classifier, nn.Linear):
        parent, name, linear = model, attr, classifier
    else:
        parent, name, linear = _last_linear(classifier)
    if head.type == "linear":
        setattr(parent, name, nn.Linear(linear.in_features, num_classes))
        return
    in_features = next(m for m in classifier.modules() if isinstance(m, nn.Linear)).in_features
    setattr(model, attr, mlp_head(in_features, num_classes, head.hidden, head.dropout, head.activation))


def backbone_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks `--freeze N` counts: MobileNet-style `features[i]`; ResNets [stem, layer1..layer4]."""
    if isinstance(model, (MarginModel, FaceClassifier)):
        model = model.backbone
    if all(hasattr(model, n) for n in ("conv1", "bn1", "layer1", "layer4")):
        stem = nn.ModuleList([model.conv1, model.bn1])
        return [stem, model.layer1, model.layer2, model.layer3, model.layer4]
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        return list(features)
    raise TrainerError("--freeze is supported for models with `features` blocks or ResNet layers, "
                       f"not {type(model).__name__}")


def freeze_blocks(model: nn.Module, count: int) -> list[nn.Module]:
    """Freeze the first `count` backbone blocks; returns them (their batch norms stay in eval mode)."""
    if count == 0:
        return []
    blocks = backbone_blocks(model)
    if count > len(blocks):
        raise TrainerError(f"--freeze {count} is beyond the {plural(len(blocks), 'block')} of this backbone; "
                           f"use 0..{len(blocks)}")
    frozen = blocks[:count]
    for block in frozen:
        for p in block.parameters():
            p.requires_grad_(False)
    return frozen


def set_train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    """model.train(), except frozen blocks, whose batch norms keep their running statistics."""
    model.train()
    for block in frozen:
        block.eval()


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters: decayed (matrices, kernels) and not decayed (biases, norm weights: ndim <= 1)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def margin_head(in_features: int | None, num_classes: int, head: HeadConfig,
                sample_rate: float | None) -> MarginHead | ShardedMarginHead:
    """The margin head `head` describes: sharded over the ranks with a `sample_rate`, else whole.

    Its centres' seed is drawn from torch's global generator, which `build_state` seeded: every rank,
    and a run on any number of ranks, starts from the same centres.
    """
    seed = int(torch.randint(0, 2 ** 62, ()))
    options = {"embedding_dim": head.embedding_dim, "margin": head.margin, "scale": head.scale,
               "subcenters": head.subcenters, "seed": seed}
    if sample_rate is None:
        return MarginHead(in_features, num_classes, head.type, **options)
    return ShardedMarginHead(in_features, num_classes, head.type, sample_rate=sample_rate, **options)


def margin_model(model: nn.Module, num_classes: int, head: HeadConfig, sample_rate: float | None = None) -> MarginModel:
    """Wrap torchvision `model` with a margin head fed by the features its last linear layer used to take."""
    attr = _head_attribute(model)
    classifier = getattr(model, attr)
    parent, name, linear = (model, attr, classifier) if isinstance(classifier, nn.Linear) else _last_linear(classifier)
    setattr(parent, name, nn.Identity())
    return MarginModel(model, margin_head(linear.in_features, num_classes, head, sample_rate))


def unsharded(model: nn.Module) -> nn.Module:
    """`model` with a sharded margin head made whole, for evaluation; any other model as it is.

    The whole model shares the backbone and the embedding and holds every rank's centres: a
    collective (every rank calls it), and a full copy of the centres on each rank while it lives.
    """
    head = model.head if isinstance(model, MarginModel) else None
    if not isinstance(head, ShardedMarginHead):
        return model
    whole = MarginHead(None, head.num_classes, head.kind, head.embedding_dim, head.margin, head.scale, head.subcenters,
                       centres=head.all_centres())
    whole.centres.requires_grad_(False)
    whole.embedding = head.embedding
    return MarginModel(model.backbone, whole).train(model.training)


def takes_labels(model: nn.Module) -> bool:
    """Whether training calls `model(images, labels)` (a margin head) rather than `model(images)`."""
    return isinstance(model, MarginModel)


def embedder(model: MarginModel) -> nn.Sequential:
    """The part of a margin-head model that makes its embedding: the backbone, then the head's embedding layer
    (an identity on a face backbone); the class centres are left out."""
    return nn.Sequential(model.backbone, model.head.embedding)


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Embeddings (not normalized): a margin head's, else the input of the classifier's last linear layer (a face
    backbone's output under a linear head)."""
    if isinstance(model, MarginModel):
        return embedder(model)(images)
    classifier = getattr(model, _head_attribute(model))
    last = classifier if isinstance(classifier, nn.Linear) else _last_linear(classifier)[2]
    captured: list[torch.Tensor] = []
    hook = last.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        model(images)
    finally:
        hook.remove()
    return captured[0]
