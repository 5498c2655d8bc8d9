"""Building torchvision classifiers: weights, a head that fits the pack, frozen blocks.

`HeadConfig` describes the head once: `build_model` builds it, a checkpoint stores it under
`head`, and a resume compares it. With a linear head the model's state-dict keys stay
exactly torchvision's, so a checkpoint's `model` loads into
`torchvision.models.<arch>(num_classes=K)` directly.
A margin head (`arcface`, `cosface`) wraps the torchvision model, its last linear layer
made an identity, as `MarginModel`: keys `backbone.*` (torchvision's, less that layer),
`head.embedding.0.*` (linear), `head.embedding.1.*` (batch norm), `head.centres` (K x D).
"""
from __future__ import annotations

import dataclasses
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from dali_pipes import plural
from trainer.checkpoint import EXPORTED_KINDS, model_file_kind
from trainer.config import HEAD_TYPES, RunConfig
from trainer.errors import TrainerError, first_line
from trainer.margins import MARGIN_HEADS, margin_target

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
    dropout: float = 0.2  # mlp
    activation: str = "relu"  # mlp: relu or leaky_relu
    embedding_dim: int = 512  # margin heads
    margin: float | None = None  # margin heads; None: the type's DEFAULT_MARGIN (resolved on creation)
    scale: float = 64.0  # margin heads: logits are scale * cosine

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


def build_model(arch: str, num_classes: int, *, weights: str = "none", head: HeadConfig = HeadConfig()) -> nn.Module:
    """A torchvision `arch` with `weights` loaded and its classifier replaced by `head` for `num_classes`.

    weights: "imagenet" (torchvision's default weights, downloaded into the torch cache),
    "none" (random init), or a path to a state dict or one of our checkpoints whose
    backbone keys match (its classifier is dropped when the class count differs).
    A margin head (arcface, cosface) makes a `MarginModel`.
    """
    if arch not in classification_models():
        raise TrainerError(f"unknown architecture {arch!r}; try mobilenet_v2, resnet18, resnet50 "
                           f"(any of: {', '.join(classification_models()[:8])}, ...)")
    model = torchvision.models.get_model(arch, weights=None)
    if weights == "imagenet":
        model.load_state_dict(_imagenet_state_dict(arch))
    elif weights != "none":
        _load_backbone(model, Path(weights), arch)
    if head.type in MARGIN_HEADS:
        return margin_model(model, num_classes, head)
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
    if isinstance(model, MarginModel):
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


def margin_logits(cosines: torch.Tensor, labels: torch.Tensor, kind: str, margin: float, scale: float) -> torch.Tensor:
    """scale * cosines, with the true class's cosine made harder by `margins.margin_target`."""
    true = cosines.gather(1, labels.view(-1, 1))
    return scale * cosines.scatter(1, labels.view(-1, 1), margin_target(true, kind, margin))


class MarginHead(nn.Module):
    """features -> linear -> batch norm = the embedding; logits = scale * cosine to each L2-normalized class centre.

    The margin is applied to the true class only in training and only when labels are given.
    """

    def __init__(self, in_features: int, num_classes: int, kind: str, embedding_dim: int = 512, margin: float = 0.5,
                 scale: float = 64.0) -> None:
        super().__init__()
        if kind not in MARGIN_HEADS:
            raise TrainerError(f"unknown margin head {kind!r}; use one of {', '.join(MARGIN_HEADS)}")
        self.kind, self.margin, self.scale = kind, margin, scale
        self.embedding = nn.Sequential(nn.Linear(in_features, embedding_dim), nn.BatchNorm1d(embedding_dim))
        self.centres = nn.Parameter(torch.empty(num_classes, embedding_dim))
        # Unit-scale centres: they are normalized anyway, and at a tiny scale Adam's steps (about lr per
        # coordinate) would swing their directions wildly.
        nn.init.normal_(self.centres, std=1.0)

    def cosines(self, embedding: torch.Tensor) -> torch.Tensor:
        """Cosine of each embedding to each class centre, in float32 (an angle margin needs the precision)."""
        with torch.autocast(embedding.device.type, enabled=False):
            return F.linear(F.normalize(embedding.float()), F.normalize(self.centres.float())).clamp(-1.0, 1.0)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cosines = self.cosines(self.embedding(features))
        if labels is None or not self.training:
            return self.scale * cosines
        return margin_logits(cosines, labels, self.kind, self.margin, self.scale)


class MarginModel(nn.Module):
    """A torchvision backbone (last linear layer an identity), then a `MarginHead`; called as model(images, labels)."""

    def __init__(self, backbone: nn.Module, head: MarginHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.backbone(images), labels)


def margin_model(model: nn.Module, num_classes: int, head: HeadConfig) -> MarginModel:
    """Wrap torchvision `model` with a margin head fed by the features its last linear layer used to take."""
    attr = _head_attribute(model)
    classifier = getattr(model, attr)
    parent, name, linear = (model, attr, classifier) if isinstance(classifier, nn.Linear) else _last_linear(classifier)
    setattr(parent, name, nn.Identity())
    return MarginModel(model, MarginHead(linear.in_features, num_classes, head.type, head.embedding_dim, head.margin,
                                         head.scale))


def takes_labels(model: nn.Module) -> bool:
    """Whether training calls `model(images, labels)` (a margin head) rather than `model(images)`."""
    return isinstance(model, MarginModel)


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Embeddings (not normalized): a margin head's, else the input of the classifier's last linear layer."""
    if isinstance(model, MarginModel):
        return model.head.embedding(model.backbone(images))
    classifier = getattr(model, _head_attribute(model))
    last = classifier if isinstance(classifier, nn.Linear) else _last_linear(classifier)[2]
    captured: list[torch.Tensor] = []
    hook = last.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        model(images)
    finally:
        hook.remove()
    return captured[0]
