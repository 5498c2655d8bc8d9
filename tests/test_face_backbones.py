"""Face backbones: parameter counts against the published figures, output shapes, channels_last, the registry."""
from __future__ import annotations

import pytest
import torch

from trainer.errors import TrainerError
from trainer.face_backbones import FACE_ARCHS, face_backbone

MIB = 2 ** 20
# Published sizes:
# - MobileFaceNet: 0.99 million parameters with its 128-d embedding (Chen et al., "MobileFaceNets", 2018, Table 2).
# - iResNets: insightface reports each model's float32 ONNX size in MB (= MiB; float16 weights are banned there
#   because they would halve the size estimate) for its 512-d baselines, challenges/mfr/README.md (ICCV21-MFR
#   "Baselines" table, MS1MV3 rows): R18 91.658, R34 130.245, R50 166.305, R100 248.590. At 4 bytes a weight
#   these are 24.03 M, 34.14 M, 43.60 M and 65.17 M (the file also holds batch-norm statistics, ~0.1%).
PUBLISHED = {
    "mobilefacenet": (128, 0.99e6),
    "iresnet18": (512, 91.658 * MIB / 4),
    "iresnet34": (512, 130.245 * MIB / 4),
    "iresnet50": (512, 166.305 * MIB / 4),
    "iresnet100": (512, 248.590 * MIB / 4),
}


@pytest.mark.parametrize("arch", FACE_ARCHS)
def test_parameter_count_matches_published(arch: str) -> None:
    embedding_dim, published = PUBLISHED[arch]
    with torch.device("meta"):  # no memory, no initialization: counting only
        model = face_backbone(arch, embedding_dim)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - published) <= 0.02 * published, f"{arch}: {count:,} vs {published:,.0f}"


@pytest.mark.parametrize("arch", FACE_ARCHS)
def test_output_is_the_embedding(arch: str) -> None:
    with torch.device("meta"):  # shapes flow through every layer without computing them
        model = face_backbone(arch, 96)
        out = model(torch.empty(5, 3, 112, 112))
    assert out.shape == (5, 96) and model.embedding_dim == 96
    assert isinstance(model.embedding.features, torch.nn.BatchNorm1d)  # the margin head sits on a batch norm
    assert not model.embedding.features.weight.requires_grad  # its scale held at 1


@pytest.mark.parametrize("arch", ["mobilefacenet", pytest.param("iresnet18", marks=pytest.mark.slow)])
def test_channels_last_gives_the_same_embedding(arch: str) -> None:
    torch.manual_seed(0)
    model = face_backbone(arch, 64, dropout=0.0)
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        plain = model(images)  # training mode: batch statistics, so values are O(1) whatever the random weights
        model.to(memory_format=torch.channels_last)
        last = model(images.contiguous(memory_format=torch.channels_last))
    assert plain.shape == (2, 64) and torch.isfinite(plain).all()
    assert torch.allclose(plain, last, atol=1e-4), (plain - last).abs().max()


@pytest.mark.slow
def test_gradients_reach_the_stem_and_dropout_is_used() -> None:
    torch.manual_seed(0)
    model = face_backbone("mobilefacenet", 32, dropout=0.5)
    model(torch.randn(2, 3, 112, 112)).square().sum().backward()
    assert model.features[0][0].weight.grad.abs().sum() > 0
    assert model.embedding.dropout.p == 0.5


def test_unknown_arch_is_a_one_line_error() -> None:
    with pytest.raises(TrainerError, match="unknown face architecture 'iresnet200'; use one of mobilefacenet"):
        face_backbone("iresnet200")
