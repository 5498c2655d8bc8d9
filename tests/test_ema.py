"""Model EMA: the warm-up decay by hand, the running average computed directly, no host sync, exact resume."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from sync_audit import host_syncs_forbidden
from torch import nn

from trainer.ema import ModelEma, ema_decay


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def train_a_little(model: nn.Module, step: int) -> None:
    """Stand-in for an optimizer step: new weights, and a forward pass that moves BatchNorm's statistics."""
    generator = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    model.train()(torch.randn(8, 3, 6, 6, generator=generator))


def test_decay_schedule_hand_values() -> None:
    assert ema_decay(1, 0.999) == 0.0  # the first update copies the model
    assert ema_decay(2, 0.999) == pytest.approx(1 - 2 ** (-2 / 3))  # 0.370
    assert ema_decay(1000, 0.999) == pytest.approx(0.99)  # 1 - 1000^(-2/3)
    assert ema_decay(31623, 0.9999) == pytest.approx(0.999, abs=1e-7)
    assert ema_decay(10**7, 0.999) == 0.999  # capped at --ema
    assert ema_decay(2, 0.999, warmup=False) == 0.999 and ema_decay(1, 0.999, warmup=False) == 0.0
    assert ema_decay(2, 0.999, min_decay=0.5) == 0.5
    assert ema_decay(5, 0.999, gamma=2.0, power=1.0) == pytest.approx(1 - 1 / 3)  # 1 - (1 + 4/2)^-1


def test_average_equals_a_direct_running_average_without_host_syncs() -> None:
    model, expected = small_model(), None
    ema = ModelEma(model, 0.9)
    for k in range(1, 8):
        train_a_little(model, k)
        with host_syncs_forbidden():
            ema.update(model)
        current = {name: t.double().clone() for name, t in model.state_dict().items()}
        d = min(1 - k ** (-2 / 3), 0.9) if k > 1 else 0.0
        expected = current if expected is None else {
            name: (d * expected[name] + (1 - d) * current[name]) if t.is_floating_point() else current[name]
            for name, t in model.state_dict().items()}
    assert ema.updates == 7
    averaged = ema.module.state_dict()
    assert averaged["1.num_batches_tracked"] == model.state_dict()["1.num_batches_tracked"] == 7  # copied
    for name, value in expected.items():
        torch.testing.assert_close(averaged[name].double(), value, rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    assert not torch.equal(averaged["4.weight"], model.state_dict()["4.weight"])


def test_state_dict_round_trip_resumes_exactly() -> None:
    model = small_model()
    ema = ModelEma(model, 0.99)
    for k in range(3):
        train_a_little(model, k)
        ema.update(model)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)  # as a checkpoint stores it
    buffer.seek(0)
    resumed = ModelEma(small_model(), 0.99)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.updates == 3 and resumed.current_decay() == ema.current_decay()
    for k in range(3, 6):
        train_a_little(model, k)
        ema.update(model)
        resumed.update(model)
    for (name, a), b in zip(ema.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), name


def test_wrapped_models_are_averaged_through_their_plain_module(tmp_path: Path) -> None:
    model = small_model()
    plain = ModelEma(model, 0.9)
    compiled = ModelEma(torch.compile(model), 0.9)  # never called, so nothing is compiled
    assert list(compiled.module.state_dict()) == list(model.state_dict())  # no _orig_mod. prefixes
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        wrapped = ModelEma(ddp, 0.9)
        assert list(wrapped.module.state_dict()) == list(model.state_dict())
        for k in range(3):
            train_a_little(model, k)
            for ema, source in ((plain, model), (compiled, torch.compile(model)), (wrapped, ddp)):
                ema.update(source)
    finally:
        dist.destroy_process_group()
    for ema in (compiled, wrapped):
        for a, b in zip(plain.module.state_dict().values(), ema.module.state_dict().values()):
            assert torch.equal(a, b)


def test_decay_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="EMA decay"):
        ModelEma(small_model(), 1.0)
