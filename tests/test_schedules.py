"""Progressive resizing and gradient accumulation: hand values, and accumulation against one large batch."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from trainer.accumulation import gradient_sync, group_length, is_update_step, optimizer_steps
from trainer.schedules import progressive_size


def test_progressive_size_hand_values() -> None:
    # FFCV's ResNet-50 16-epoch recipe: 160 -> 192 between epochs 11 and 13; 176 / 32 = 5.5 rounds to even, 192.
    assert [progressive_size(e, 160, 192, 11, 13) for e in (0, 11, 12, 13, 15)] == [160, 160, 192, 192, 192]
    assert [progressive_size(e, 128, 256, 0, 4) for e in range(6)] == [128, 160, 192, 224, 256, 256]
    assert progressive_size(3, 128, 256, 2, 10, multiple=16) == 144  # 128 + 16
    # 110 would round down to 96, below MIN_SIZE: kept at 100 (FFCV would return 96).
    assert progressive_size(1, 100, 200, 0, 10) == 100 and progressive_size(0, 100, 200, 0, 10) == 100
    assert progressive_size(9, 100, 200, 0, 10) == 192 and progressive_size(10, 100, 200, 0, 10) == 200
    assert progressive_size(5, 64, 64, 3, 3) == 64  # an empty ramp is a step
    with pytest.raises(ValueError, match="MIN_SIZE"):
        progressive_size(0, 256, 128, 0, 4)
    with pytest.raises(ValueError, match="ramp"):
        progressive_size(0, 128, 256, 5, 4)


def test_accumulation_groups_hand_values() -> None:
    # 10 batches, 4 per update: groups 0-3, 4-7, 8-9.
    assert [group_length(i, 4, 10) for i in range(10)] == [4] * 8 + [2] * 2
    assert [i for i in range(10) if is_update_step(i, 4, 10)] == [3, 7, 9]
    assert optimizer_steps(10, 4) == 3 and optimizer_steps(8, 4) == 2 and optimizer_steps(10, 1) == 10
    assert [i for i in range(5) if is_update_step(i, 1, 5)] == [0, 1, 2, 3, 4]


def train(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], accum_steps: int) -> nn.Module:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    for i, (x, y) in enumerate(batches):
        update = is_update_step(i, accum_steps, len(batches))
        with gradient_sync(model, update):
            (loss_fn(model(x), y) / group_length(i, accum_steps, len(batches))).backward()
        if update:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return model


def no_batch_norm_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def test_two_accumulated_batches_of_b_train_like_one_batch_of_2b(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 3, 8, 8, generator=generator), torch.randint(0, 5, (48,), generator=generator)
    large = train(no_batch_norm_model(), [(x[i:i + 8], y[i:i + 8]) for i in range(0, 48, 8)], 1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(no_batch_norm_model())
        with gradient_sync(ddp, False):
            assert not ddp.require_backward_grad_sync  # inner micro-steps skip the all-reduce
        assert ddp.require_backward_grad_sync
        accumulated = train(ddp, [(x[i:i + 4], y[i:i + 4]) for i in range(0, 48, 4)], 2).module
    finally:
        dist.destroy_process_group()
    for a, b in zip(large.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    plain = train(no_batch_norm_model(), [(x[i:i + 4], y[i:i + 4]) for i in range(0, 48, 4)], 1)
    assert not torch.allclose(next(plain.parameters()), next(large.parameters()), atol=1e-4)  # the test can fail
