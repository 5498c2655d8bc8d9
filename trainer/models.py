"""Building torchvision classifiers: weights, a head that fits the pack, frozen blocks.

With `head="linear"` the model's state-dict keys stay exactly torchvision's, so a
checkpoint's `model` loads into `torchvision.models.<arch>(num_classes=K)` directly.
"""
from __future__ import annotations

import urllib.error
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from trainer.errors import TrainerError

HEAD_ATTRIBUTES = ("fc", "classifier", "head", "heads")


def classification_models() -> list[str]:
    """Names torchvision lists as image-classification models."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(arch: str, num_classes: int, *, weights: str = "none", head: str = "linear", hidden: int = 512,
                dropout: float = 0.2, activation: str = "relu") -> nn.Module:
    """A torchvision `arch` with `weights` loaded and its classifier replaced for `num_classes`.

    weights: "imagenet" (torchvision's default weights, downloaded into the torch cache),
    "none" (random init), or a path to a state dict or one of our checkpoints whose
    backbone keys match (its classifier is dropped when the class count differs).
    """
    if arch not in classification_models():
        raise TrainerError(f"unknown architecture {arch!r}; try mobilenet_v2, resnet18, resnet50 (any of: {', '.join(classification_models()[:8])}, ...)")
    model = torchvision.models.get_model(arch, weights=None)
    if weights == "imagenet":
        model.load_state_dict(_imagenet_state_dict(arch))
    elif weights != "none":
        _load_backbone(model, Path(weights))
    replace_head(model, num_classes, head=head, hidden=hidden, dropout=dropout, activation=activation)
    return model


def _imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except (urllib.error.URLError, OSError, RuntimeError, ConnectionError) as exc:
        reason = str(getattr(exc, "reason", exc)).splitlines()[0][:80]
        raise TrainerError(f"cannot download ImageNet weights for {arch} ({reason}); pass --weights none, or --weights PATH to a local file") from None


def _load_backbone(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise TrainerError(f"--weights {path}: no such file (use imagenet, none, or a path to a state dict or checkpoint)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - anything unreadable gets one line
        raise TrainerError(f"--weights {path}: not a readable state dict or checkpoint ({str(exc).splitlines()[0][:80]})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TrainerError(f"--weights {path}: not a state dict or one of our checkpoints")
    own = model.state_dict()
    # The classifier is replaced afterwards, so its shape may differ: keep only matching tensors.
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    backbone = [k for k in own if not _is_head_key(k)]
    missing = [k for k in backbone if k not in matching]
    if missing:
        raise TrainerError(f"--weights {path}: does not fit {type(model).__name__} ({len(missing)} backbone tensors missing or of another shape, e.g. {missing[0]})")
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


def replace_head(model: nn.Module, num_classes: int, *, head: str = "linear", hidden: int = 512, dropout: float = 0.2,
                 activation: str = "relu") -> None:
    """Fit the classifier to `num_classes`: a new last Linear (linear) or a new MLP (mlp)."""
    attr = _head_attribute(model)
    classifier = getattr(model, attr)
    if isinstance(classifier, nn.Linear):
        parent, name, linear = model, attr, classifier
    else:
        parent, name, linear = _last_linear(classifier)
    if head == "linear":
        setattr(parent, name, nn.Linear(linear.in_features, num_classes))
        return
    in_features = next(m for m in classifier.modules() if isinstance(m, nn.Linear)).in_features
    setattr(model, attr, mlp_head(in_features, num_classes, hidden, dropout, activation))


def backbone_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks `--freeze N` counts: MobileNet-style `features[i]`; ResNets [stem, layer1..layer4]."""
    if all(hasattr(model, n) for n in ("conv1", "bn1", "layer1", "layer4")):
        stem = nn.ModuleList([model.conv1, model.bn1])
        return [stem, model.layer1, model.layer2, model.layer3, model.layer4]
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        return list(features)
    raise TrainerError(f"--freeze is supported for models with `features` blocks or ResNet layers, not {type(model).__name__}")


def freeze_blocks(model: nn.Module, count: int) -> list[nn.Module]:
    """Freeze the first `count` backbone blocks; returns them (their batch norms stay in eval mode)."""
    if count == 0:
        return []
    blocks = backbone_blocks(model)
    if count > len(blocks):
        raise TrainerError(f"--freeze {count} is beyond the {len(blocks)} blocks of this backbone; use 0..{len(blocks)}")
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
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
