"""Face-recognition backbones for 112 x 112 aligned crops, each ending in the embedding a margin head sits on.

- `mobilefacenet`: MobileFaceNets (Chen et al., 2018, Table 1): a MobileNetV2-style network of inverted
  residual bottlenecks with PReLU, whose 7 x 7 x 512 output is reduced by a global depthwise convolution
  (GDConv, one 7 x 7 filter per channel) instead of global average pooling, so each face position keeps
  its own weight.
- `iresnet18/34/50/100`: ResNets of the improved residual unit "IR" (ArcFace, Deng et al., 2019, section 4)
  with the stage depths insightface's arcface_torch gives them (2-2-2-2, 3-4-6-3, 3-4-14-3, 3-13-30-3): a
  3 x 3 stride-1 stem keeps the 112 px input's detail, each unit is BN, conv 3 x 3, BN, PReLU,
  conv 3 x 3 (the stride sits here, on the unit's second convolution), BN, and four stages of 64, 128,
  256 and 512 channels each halve the side, 112 -> 7.

Both end in `EmbeddingOutput` (BN, dropout, FC to `embedding_dim`, BN), so a margin head's centres sit
directly on the backbone's output: `face_backbone(name, embedding_dim, dropout)`.
"""
from __future__ import annotations

import torch
from torch import nn

from trainer.errors import TrainerError

FACE_ARCHS = ("mobilefacenet", "iresnet18", "iresnet34", "iresnet50", "iresnet100")
FACE_INPUT_SIZE = 112  # every face backbone here expects the aligned 112 x 112 crop
FINAL_SIDE = 7  # 112 halved four times: the spatial side the embedding's FC layer reads
IRESNET_DEPTHS = {"iresnet18": (2, 2, 2, 2), "iresnet34": (3, 4, 6, 3), "iresnet50": (3, 4, 14, 3),
                  "iresnet100": (3, 13, 30, 3)}
IRESNET_WIDTHS = (64, 128, 256, 512)
# MobileFaceNets Table 1, the bottleneck rows: (expansion t, output channels c, repeats n, first stride s).
MOBILEFACENET_BOTTLENECKS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))
MOBILEFACENET_STEM = 64
MOBILEFACENET_FEATURES = 512  # the 1 x 1 expansion before the GDConv


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
            activation: bool = True) -> nn.Sequential:
    """Convolution (no bias: the batch norm has one), batch norm and, unless linear, a per-channel PReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if activation:
        layers.append(nn.PReLU(out_channels))
    return nn.Sequential(*layers)


class EmbeddingOutput(nn.Module):
    """C x side x side features -> BN -> dropout -> FC -> BN: the face embedding (not normalized).

    The last batch norm's scale is held at 1, as arcface_torch holds it: every embedding dimension keeps
    unit batch variance, so no dimension can dominate the cosine by growing its own gain.
    """

    def __init__(self, channels: int, side: int, embedding_dim: int, dropout: float, fc_bias: bool) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * side * side, embedding_dim, bias=fc_bias)
        self.features = nn.BatchNorm1d(embedding_dim)
        self.features.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(self.dropout(torch.flatten(self.norm(x), 1))))


class IRBlock(nn.Module):
    """The improved residual unit: BN-conv3x3-BN-PReLU-conv3x3(stride)-BN plus a (projected) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.PReLU(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = (nn.Identity() if stride == 1 and in_channels == out_channels
                         else conv_bn(in_channels, out_channels, 1, stride, activation=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class IResNet(nn.Module):
    """Stem, four IR stages (each halving the side), then the embedding."""

    def __init__(self, depths: tuple[int, ...], embedding_dim: int, dropout: float) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.stem = conv_bn(3, IRESNET_WIDTHS[0], 3)
        stages, channels = [], IRESNET_WIDTHS[0]
        for width, depth in zip(IRESNET_WIDTHS, depths):
            stages.append(nn.Sequential(*(IRBlock(channels if i == 0 else width, width, 2 if i == 0 else 1)
                                          for i in range(depth))))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.embedding = EmbeddingOutput(channels, FINAL_SIDE, embedding_dim, dropout, fc_bias=True)
        _init_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.stages(self.stem(images)))


class Bottleneck(nn.Module):
    """MobileNetV2's inverted residual with PReLU: expand 1x1, depthwise 3x3 (stride), linear project 1x1."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        self.body = nn.Sequential(
            conv_bn(in_channels, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, out_channels, 1, activation=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileFaceNet(nn.Module):
    """MobileFaceNets' Table 1; its last linear 1 x 1 convolution is the embedding's FC layer."""

    def __init__(self, embedding_dim: int, dropout: float) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        layers: list[nn.Module] = [conv_bn(3, MOBILEFACENET_STEM, 3, 2),
                                   conv_bn(MOBILEFACENET_STEM, MOBILEFACENET_STEM, 3, groups=MOBILEFACENET_STEM)]
        channels = MOBILEFACENET_STEM
        for expansion, out_channels, repeats, stride in MOBILEFACENET_BOTTLENECKS:
            for i in range(repeats):
                layers.append(Bottleneck(channels, out_channels, expansion, stride if i == 0 else 1))
                channels = out_channels
        layers.append(conv_bn(channels, MOBILEFACENET_FEATURES, 1))
        self.features = nn.Sequential(*layers)
        # Linear GDConv: one 7 x 7 filter per channel turns the 7 x 7 map into a vector (its BN is the embedding's).
        self.gdconv = nn.Conv2d(MOBILEFACENET_FEATURES, MOBILEFACENET_FEATURES, FINAL_SIDE,
                                groups=MOBILEFACENET_FEATURES, bias=False)
        self.embedding = EmbeddingOutput(MOBILEFACENET_FEATURES, 1, embedding_dim, dropout, fc_bias=False)
        _init_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.gdconv(self.features(images)))


def _init_weights(model: nn.Module) -> None:
    """He initialization for convolutions and FC layers (as torchvision's ResNets); norms at identity."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def face_backbone(name: str, embedding_dim: int = 512, dropout: float = 0.0) -> nn.Module:
    """The face backbone `name` (one of `FACE_ARCHS`): 112 x 112 images -> N x `embedding_dim` embeddings.

    `dropout` is the probability applied before the embedding's FC layer. Raises `TrainerError` for an
    unknown name.
    """
    if name == "mobilefacenet":
        return MobileFaceNet(embedding_dim, dropout)
    if name in IRESNET_DEPTHS:
        return IResNet(IRESNET_DEPTHS[name], embedding_dim, dropout)
    raise TrainerError(f"unknown face architecture {name!r}; use one of {', '.join(FACE_ARCHS)}")
