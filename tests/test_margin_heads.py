"""ArcFace / CosFace heads: logits against hand computation, structure, checkpoints, embeddings."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.loop import StepConfig, train_step
from trainer.margin_heads import MarginHead, MarginModel, margin_logits
from trainer.models import (
    HeadConfig,
    build_model,
    embed,
    freeze_blocks,
    takes_labels,
)

COS = torch.tensor([[0.5, 0.2, -0.3], [0.0, 0.1, 0.9], [-0.95, 0.3, 0.1]])
LABELS = torch.tensor([0, 0, 0])


def test_arcface_logits_by_hand() -> None:
    logits = margin_logits(COS, torch.tensor([0, 1, 0]), "arcface", 0.5, 10.0)
    expected = 10.0 * COS.clone()
    expected[0, 0] = 10.0 * math.cos(math.acos(0.5) + 0.5)  # 60 deg + 0.5 rad
    expected[1, 1] = 10.0 * math.cos(math.acos(0.1) + 0.5)
    # theta = acos(-0.95) = 2.82 rad is beyond pi - 0.5: cos(theta + m) would rise again, so cos - m sin m.
    expected[2, 0] = 10.0 * (-0.95 - 0.5 * math.sin(0.5))
    assert torch.allclose(logits, expected, atol=1e-5)


def test_cosface_logits_by_hand() -> None:
    logits = margin_logits(COS, torch.tensor([2, 1, 1]), "cosface", 0.35, 64.0)
    expected = 64.0 * COS.clone()
    expected[0, 2], expected[1, 1], expected[2, 1] = 64.0 * (-0.3 - 0.35), 64.0 * (0.1 - 0.35), 64.0 * (0.3 - 0.35)
    assert torch.allclose(logits, expected, atol=1e-4)


def _hand_head(kind: str) -> MarginHead:
    """A head whose embedding is its 2-d input (identity linear, batch norm at rest) and known centres."""
    head = MarginHead(2, 3, kind, embedding_dim=2, margin=0.3, scale=8.0)
    with torch.no_grad():
        head.embedding[0].weight.copy_(torch.eye(2))
        head.embedding[0].bias.zero_()
        head.centres.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))  # lengths do not matter
    return head


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_margin_only_in_training_with_labels(kind: str) -> None:
    head = _hand_head(kind)
    features = torch.tensor([[3.0, 0.0], [0.0, -1.0]])
    labels = torch.tensor([2, 1])
    c = 2 ** -0.5
    cos = torch.tensor([[1.0, 0.0, c], [0.0, -1.0, -c]])
    head.eval()
    assert torch.allclose(head(features, labels), 8.0 * cos, atol=1e-5)  # eval: plain cosines, labels or not
    head.train()
    head.embedding[1].eval()  # keep the batch norm at rest, so the embedding is still the input
    assert torch.allclose(head(features), 8.0 * cos, atol=1e-5)
    trained = head(features, labels)
    expected = 8.0 * cos.clone()
    if kind == "arcface":
        expected[0, 2] = 8.0 * math.cos(math.pi / 4 + 0.3)
        expected[1, 1] = 8.0 * (-1.0 - 0.3 * math.sin(0.3))  # theta = pi: past pi - m
    else:
        expected[0, 2], expected[1, 1] = 8.0 * (c - 0.3), 8.0 * (-1.0 - 0.3)
    assert torch.allclose(trained, expected, atol=1e-4)


def test_margin_model_structure_and_checkpoint(tmp_path: Path) -> None:
    model = build_model("resnet18", 5, head=HeadConfig(type="arcface", embedding_dim=16, scale=30.0))
    assert isinstance(model, MarginModel) and takes_labels(model) and not takes_labels(build_model("resnet18", 5))
    assert model.head.margin == 0.5 and build_model("resnet18", 5, head=HeadConfig(type="cosface")).head.margin == 0.35
    keys = list(model.state_dict())
    assert "head.centres" in keys and "head.embedding.0.weight" in keys and "head.embedding.1.running_var" in keys
    assert not any(k.startswith("backbone.fc.") for k in keys)  # the old classifier is an identity now
    assert model.head.embedding[0].in_features == 512 and model.head.centres.shape == (5, 16)
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (2, 5) and logits.abs().max() <= 30.0 + 1e-4
    save_checkpoint(tmp_path / "c.pt", {"model": model.state_dict()})
    fresh = build_model("resnet18", 5, head=HeadConfig(type="arcface", embedding_dim=16, scale=30.0)).eval()
    fresh.load_state_dict(load_checkpoint(tmp_path / "c.pt")["model"])  # weights_only=True inside, strict here
    assert torch.allclose(fresh(images), logits)
    # A margin checkpoint's backbone serves as --weights for another model.
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    other = build_model("resnet18", 3, weights=str(tmp_path / "sd.pt"))
    assert torch.equal(other.conv1.weight, model.backbone.conv1.weight)
    assert len(freeze_blocks(model, 2)) == 2 and not model.backbone.layer1[0].conv1.weight.requires_grad


def test_embed_is_the_penultimate_features() -> None:
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    linear = build_model("resnet18", 4).eval()
    features = embed(linear, images)
    assert features.shape == (3, 512)
    assert torch.allclose(features @ linear.fc.weight.T + linear.fc.bias, linear(images), atol=1e-5)
    mlp = build_model("mobilenet_v2", 4, head=HeadConfig(type="mlp", hidden=24)).eval()
    hidden = embed(mlp, images)
    assert hidden.shape == (3, 24) and torch.allclose(mlp.classifier[-1](hidden), mlp(images), atol=1e-5)
    arc = build_model("mobilenet_v2", 4, head=HeadConfig(type="arcface", embedding_dim=8)).eval()
    emb = embed(arc, images)
    assert emb.shape == (3, 8)
    assert torch.allclose(arc.head.scale * arc.head.cosines(emb), arc(images), atol=1e-4)


def test_train_step_passes_labels_to_margin_heads() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 3, head=HeadConfig(type="cosface", embedding_dim=8, scale=16.0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    step = StepConfig(nn.CrossEntropyLoss(), None, torch.amp.GradScaler("cpu", enabled=False), with_labels=True)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    loss, logits, _ = train_step(model, optimizer, images, labels, step)
    model.eval()
    plain = model(images)  # batch norms at rest now, so only compare the margin's effect on shapes and the loss
    assert logits.shape == plain.shape == (4, 3)
    # The margin lowers each true-class logit by scale * m relative to the plain training-mode cosines.
    model.train()
    with torch.no_grad():
        torch.manual_seed(0)
        without = model(images)
    true = logits.gather(1, labels.view(-1, 1)) - without.gather(1, labels.view(-1, 1))
    assert torch.allclose(true, torch.full_like(true, -16.0 * 0.35), atol=1e-3)
