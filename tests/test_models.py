"""Models: heads, frozen blocks, decay groups, weights loading; checked against torchvision itself."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from dali_pipes import PipelineSpec
from trainer.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint, unwrap
from trainer.config import RunConfig, build_config
from trainer.errors import TrainerError
from trainer.inference import load_model
from trainer.margin_heads import MarginHead, MarginModel
from trainer.models import (
    HeadConfig,
    backbone_blocks,
    build_model,
    freeze_blocks,
    parameter_groups,
    set_train_mode,
)
from trainer.optim import build_optimizer

CPU = torch.device("cpu")


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18", "resnet50"])
def test_linear_head_keeps_torchvision_keys(arch: str) -> None:
    model = build_model(arch, 7)
    plain = torchvision.models.get_model(arch, num_classes=7)
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict())  # strict: shapes match too


def test_mlp_head_structure() -> None:
    model = build_model("mobilenet_v2", 5, head=HeadConfig(type="mlp", hidden=64, dropout=0.3, activation="leaky_relu"))
    layers = list(model.classifier)
    assert [type(m) for m in layers] == [nn.Dropout, nn.Linear, nn.BatchNorm1d, nn.LeakyReLU, nn.Dropout, nn.Linear]
    assert layers[1].in_features == 1280 and layers[1].out_features == 64 and layers[5].out_features == 5
    assert layers[0].p == 0.3 and layers[4].p == 0.3
    resnet = build_model("resnet18", 3, head=HeadConfig(type="mlp", hidden=32))
    assert isinstance(resnet.fc, nn.Sequential) and resnet.fc[1].in_features == 512
    assert resnet(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_other_torchvision_models_work() -> None:
    model = build_model("shufflenet_v2_x0_5", 4)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def test_unknown_arch_is_a_clear_error() -> None:
    with pytest.raises(TrainerError, match="unknown architecture 'resnet19'"):
        build_model("resnet19", 3)


def test_freeze_mobilenet_first_ten_feature_blocks() -> None:
    model = build_model("mobilenet_v2", 4)
    frozen = freeze_blocks(model, 10)
    assert frozen == list(model.features[:10])
    for i, block in enumerate(model.features):
        assert all(p.requires_grad == (i >= 10) for p in block.parameters())
    optimizer = build_optimizer(model, "adamw", 1e-3, 0.01, 0.9, CPU)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for block in frozen for p in block.parameters())
    assert all(id(p) in in_optimizer for p in model.classifier.parameters())


def test_frozen_batch_norm_keeps_running_statistics() -> None:
    model = build_model("resnet18", 3)
    frozen = freeze_blocks(model, 2)  # stem and layer1
    before = model.bn1.running_mean.clone()
    set_train_mode(model, frozen)
    assert not model.bn1.training and not model.layer1[0].bn1.training and model.layer2[0].bn1.training
    model(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert torch.equal(model.bn1.running_mean, before)
    loss = model(torch.randn(2, 3, 32, 32)).sum()
    loss.backward()
    assert model.conv1.weight.grad is None and model.layer2[0].conv1.weight.grad is not None


def test_resnet_block_count_and_freeze_beyond() -> None:
    model = build_model("resnet50", 3)
    assert len(backbone_blocks(model)) == 5
    freeze_blocks(model, 5)
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.startswith("fc."))
    with pytest.raises(TrainerError, match="beyond the 5 blocks"):
        freeze_blocks(build_model("resnet18", 3), 6)
    with pytest.raises(TrainerError, match="beyond the 19 blocks"):
        freeze_blocks(build_model("mobilenet_v2", 3), 20)


def test_weight_decay_groups_by_ndim() -> None:
    model = build_model("resnet18", 3)
    decay, no_decay = parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim > 1 for p in decay["params"]) and decay["weight_decay"] == 0.05
    assert no_decay["weight_decay"] == 0.0
    # ResNet's downsample batch norm ('downsample.1'), missed by name-based rules, is not decayed.
    assert any(names[id(p)] == "layer2.0.downsample.1.weight" for p in no_decay["params"])
    assert any(names[id(p)] == "fc.bias" for p in no_decay["params"])


def test_weights_from_a_state_dict_file(tmp_path: Path) -> None:
    source = torchvision.models.resnet18(num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    model = build_model("resnet18", 3, weights=str(tmp_path / "r18.pth"))
    assert torch.equal(model.conv1.weight, source.conv1.weight) and model.fc.out_features == 3
    with pytest.raises(TrainerError, match="does not fit"):
        build_model("mobilenet_v2", 3, weights=str(tmp_path / "r18.pth"))
    with pytest.raises(TrainerError, match="no such file"):
        build_model("resnet18", 3, weights=str(tmp_path / "missing.pth"))


def test_imagenet_weights_from_the_torch_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No download: place a file where torchvision's weights API looks for it.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), cached)
    model = build_model("resnet18", 4, weights="imagenet")
    assert torch.equal(model.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)


def test_imagenet_weights_without_network_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(TrainerError, match="pass --weights none"):
        build_model("resnet18", 4, weights="imagenet")


def test_checkpoint_round_trip_weights_only(tmp_path: Path) -> None:
    model = build_model("resnet18", 3)
    wrapped = torch.compile(model, backend="eager") if hasattr(torch, "compile") else model
    payload = {"model": unwrap(wrapped).state_dict(), "epoch": 3, "classes": ["a", "b", "c"], "config": {"lr": 0.1}}
    save_checkpoint(tmp_path / "c.pt", payload)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    plain = torchvision.models.resnet18(num_classes=3)
    plain.load_state_dict(raw["model"])
    assert raw["epoch"] == 3 and load_checkpoint(tmp_path / "c.pt")["classes"] == ["a", "b", "c"]


def test_bad_checkpoints_are_one_line_errors(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "good.pt", {"model": {}, "epoch": 0})
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("hello")
    for name, message in (("truncated.pt", "not a readable checkpoint"),
                          ("foreign.pt", "not a dali-trainer checkpoint"),
                          ("text.pt", "not a readable checkpoint"), ("missing.pt", "no such checkpoint")):
        with pytest.raises(TrainerError, match=message):
            load_checkpoint(tmp_path / name)


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    target.write_bytes(b"previous")

    def fail(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write_bytes(target, fail)
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_atomic_writes_get_ordinary_permissions(tmp_path: Path) -> None:
    import os

    previous = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "out.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(previous)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o644  # as open() would make it, not mkstemp's 0600


def _old_checkpoint(path: Path, model: nn.Module, head: dict) -> Path:
    """A checkpoint dict as earlier versions wrote it: the head's keys listed by hand, no newer keys."""
    save_checkpoint(path, {"model": model.state_dict(), "classes": ["a", "b", "c"], "arch": "resnet18", "epoch": 4,
                           "config": {}, "head": head, "spec": PipelineSpec(image_size=32).to_dict()})
    return path


@pytest.mark.parametrize("head", [
    {"type": "mlp", "hidden": 16, "dropout": 0.1, "activation": "leaky_relu"},  # before margin heads: 4 keys
    {"type": "arcface", "hidden": 512, "dropout": 0.2, "activation": "relu", "embedding_dim": 8, "margin": None,
     "scale": 16.0},  # margin None: the head's default, as the run config held it
])
def test_checkpoints_written_the_old_way_still_load(tmp_path: Path, head: dict) -> None:
    torch.manual_seed(0)
    original = torchvision.models.resnet18(num_classes=3)
    if head["type"] == "mlp":  # the same module tree the old code built, by hand
        original.fc = nn.Sequential(nn.Dropout(0.1), nn.Linear(512, 16), nn.BatchNorm1d(16), nn.LeakyReLU(0.01),
                                    nn.Dropout(0.1), nn.Linear(16, 3))
    else:
        original.fc = nn.Identity()
        original = MarginModel(original, MarginHead(512, 3, "arcface", embedding_dim=8, margin=0.5, scale=16.0))
    loaded = load_model(_old_checkpoint(tmp_path / "old.pt", original.eval(), head), torch.device("cpu"))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.model(images), original(images), atol=1e-5)
    # The checkpoint's 0-based epoch index 4 is the 5th epoch; outputs count from 1. No trained_classes key: all.
    assert loaded.classes == loaded.trained_classes == ["a", "b", "c"] and loaded.epoch == 5
    assert HeadConfig.from_dict(head).margin == (0.5 if head["type"] == "arcface" else None)


def test_head_config_is_what_the_checkpoint_stores() -> None:
    cfg = build_config({"pack": "p.h5", "head": "cosface", "embedding_dim": 32, "scale": 30.0, "hidden": 7})
    head = HeadConfig.from_run(cfg)
    assert head == HeadConfig(type="cosface", hidden=7, embedding_dim=32, scale=30.0, margin=0.35)
    assert HeadConfig.from_dict(head.to_dict()) == head
    assert set(head.to_dict()) == {"type", "hidden", "dropout", "activation", "embedding_dim", "margin", "scale",
                                     "subcenters"}
    # Every field but `type` is a `trainer run` option of the same name, so a new field cannot be left out of a run.
    options = {f.name for f in dataclasses.fields(RunConfig)}
    assert {f.name for f in dataclasses.fields(HeadConfig)} - {"type"} <= options and "head" in options
    with pytest.raises(TrainerError, match="unknown head 'softmax'"):
        HeadConfig(type="softmax")
