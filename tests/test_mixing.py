"""Mixup / CutMix: draws as timm's batch mode, soft targets, the pasted box, the loss by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sync_audit import host_syncs_forbidden
from torch import nn

from trainer import mixing
from trainer.mixing import MixConfig, MixDraw, draw_mix, mix_batch, smoothed_one_hot


def batch(n: int = 6, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    images = torch.randn(n, 3, 16, 12, generator=generator).contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, classes, (n,), generator=generator)


def test_smoothing_folds_in_as_timm_writes_it() -> None:
    targets = smoothed_one_hot(torch.tensor([2, 0]), 4, 0.1)
    off, on = 0.1 / 4, 1 - 0.1 + 0.1 / 4
    torch.testing.assert_close(targets, torch.tensor([[off, off, on, off], [on, off, off, off]]))
    # Folded into the targets, the soft loss is PyTorch's own label-smoothed cross-entropy.
    logits = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    expected = nn.CrossEntropyLoss(label_smoothing=0.1)(logits, torch.tensor([2, 0]))
    torch.testing.assert_close(mixing.soft_target_cross_entropy(logits, targets), expected)


def test_loss_equals_a_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    targets = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.25, 0.75]])
    log_z = [math.log(math.exp(2) + 1 + math.exp(-1)), math.log(2 * math.exp(0.5) + 1)]
    by_hand = (0.7 * (log_z[0] - 2) + 0.3 * log_z[0] + 0.25 * (log_z[1] - 0.5) + 0.75 * log_z[1]) / 2
    assert mixing.soft_target_cross_entropy(logits, targets).item() == pytest.approx(by_hand, rel=1e-6)


def test_mixup_blends_the_reversed_batch_and_targets_sum_to_one() -> None:
    images, labels = batch()
    with host_syncs_forbidden():
        mixed, targets, top1 = mix_batch(images, labels, 5, MixDraw(0.3), smoothing=0.1)
    torch.testing.assert_close(mixed, 0.3 * images + 0.7 * images.flip(0))
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    expected = 0.3 * smoothed_one_hot(labels, 5, 0.1) + 0.7 * smoothed_one_hot(labels.flip(0), 5, 0.1)
    torch.testing.assert_close(targets, expected)
    assert torch.equal(top1, labels.flip(0))  # lam < 0.5: the reversed batch's label is the larger one
    assert torch.equal(mix_batch(images, labels, 5, MixDraw(0.5))[2], labels)


def test_cutmix_pastes_the_reversed_batchs_box_exactly() -> None:
    images, labels = batch()
    before = images.clone()
    draw = MixDraw(0.75, (4, 12, 2, 8))
    with host_syncs_forbidden():
        mixed, targets, top1 = mix_batch(images, labels, 5, draw)
    inside = torch.zeros(16, 12, dtype=torch.bool)
    inside[4:12, 2:8] = True
    assert torch.equal(mixed[:, :, inside], images.flip(0)[:, :, inside])
    assert torch.equal(mixed[:, :, ~inside], images[:, :, ~inside])
    assert torch.equal(images, before) and torch.equal(top1, labels)  # the input batch is left as it was
    torch.testing.assert_close(targets.sum(1), torch.ones(6))


def test_cutmix_box_is_timms_and_lambda_is_its_true_area() -> None:
    # lam 0.75 on 32 x 32: sides int(32 * 0.5) = 16, half 8; centre row 16, column 0 -> rows 8:24, columns 0:8.
    assert mixing.cutmix_box(0.75, 32, 32, 0.5, 0.0) == MixDraw(1 - 16 * 8 / 1024, (8, 24, 0, 8))
    draw = mixing.cutmix_box(0.3, 30, 40, 0.99, 0.01)
    top, bottom, left, right = draw.box
    assert 0 <= top < bottom <= 30 and 0 <= left < right <= 40
    assert draw.lam == pytest.approx(1 - (bottom - top) * (right - left) / 1200)


def test_no_mixing_is_the_identity() -> None:
    images, labels = batch()
    for config in (MixConfig(mixup_alpha=1.0, prob=0.0), MixConfig()):
        draw = draw_mix(config, 0, 0, 3, 16, 12)
        assert draw == MixDraw()
        mixed, targets, top1 = mix_batch(images, labels, 5, draw, smoothing=0.2)
        assert mixed is images and torch.equal(top1, labels)
        torch.testing.assert_close(targets, smoothed_one_hot(labels, 5, 0.2))


def test_draws_follow_timms_batch_mode_and_depend_only_on_the_step() -> None:
    both = MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.6)
    draws = [draw_mix(both, 5, 2, step, 32, 32) for step in range(3000)]
    assert draws[:20] == [draw_mix(both, 5, 2, step, 32, 32) for step in range(20)]  # a resumed run redraws the same
    assert draws[:20] != [draw_mix(both, 5, 3, step, 32, 32) for step in range(20)]
    mixed = [d for d in draws if d.lam != 1.0]
    cut = [d for d in mixed if d.box is not None]
    # Binomial spreads (3 sigma): mixed 0.6 +- 0.027 of all, cutmix 0.5 +- 0.035 of those.
    assert len(mixed) / len(draws) == pytest.approx(0.6, abs=0.03)
    assert len(cut) / len(mixed) == pytest.approx(0.5, abs=0.04)
    # Beta(0.8, 0.8) has mean 0.5 and variance 1 / 10.4: sd of the mean over ~900 draws is 0.01.
    mixup_lams = np.array([d.lam for d in mixed if d.box is None])
    assert mixup_lams.mean() == pytest.approx(0.5, abs=0.04) and mixup_lams.var() == pytest.approx(1 / 10.4, abs=0.02)
    only_cutmix = draw_mix(MixConfig(cutmix_alpha=1.0), 0, 0, 0, 32, 32)
    assert only_cutmix.box is not None


def test_config_rejects_bad_values() -> None:
    for bad in ({"mixup_alpha": -1.0}, {"cutmix_alpha": -0.5}, {"prob": 1.5}, {"switch_prob": -0.1}):
        with pytest.raises(ValueError):
            MixConfig(**bad)
    assert not MixConfig(mixup_alpha=0.2, prob=0.0).enabled and MixConfig(cutmix_alpha=1.0).enabled
