"""What a run checks before it trains, so a bad option or pack is one line, not a failure an epoch later.

Each check is used where the run meets its subject (`trainer.run`, `trainer.state`), and
`trainer.preflight` runs them all in the launching process before `--nproc` starts torchrun.
"""
from __future__ import annotations

import numpy as np
import torch
import torchvision
from torch import nn

from dali_pipes import PackReader, plural, samples_per_rank, split_kind
from trainer.config import RunConfig
from trainer.distributed import DistContext, rank_device
from trainer.errors import TrainerError, first_line
from trainer.models import HeadConfig, embed, sharded_rate


def check_pack(reader: PackReader, batch_size: int, world_size: int, scheduler: str = "none") -> None:
    """Refuse packs a classifier cannot train on, with the fix."""
    if reader.num_classes < 2:
        raise TrainerError(f"{reader.path}: {plural(reader.num_classes, 'class')}; a classifier needs at least 2 class "
                           "folders")
    counts = reader.split_counts()
    if counts["train"] == 0:
        raise TrainerError(f"{reader.path}: the train split is empty; repack with lower --val-ratio/--test-ratio")
    if counts["val"] == 0 and counts["test"] == 0:
        raise TrainerError(f"{reader.path}: the val and test splits are both empty, so nothing can measure the model; "
                           "repack with --val-ratio above 0 (or give a val/ folder)")
    missing = [reader.classes[i] for i in np.flatnonzero(reader.class_counts("train") == 0)]
    # A pack split by class holds identities without training images on purpose.
    if missing and split_kind(reader.labels, reader.splits) != "class":
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise TrainerError(f"{reader.path}: class {missing[0]!r}{more} has no training image; add images to its train "
                           "folder or repack without given splits")
    if counts["val"] == 0 and scheduler == "plateau":
        raise TrainerError(f"{reader.path}: --scheduler plateau needs a val split, and this pack has none; choose "
                           "another --scheduler or repack with --val-ratio above 0")
    per_rank = samples_per_rank(counts["train"], train=True, world_size=world_size)
    if batch_size > per_rank:
        raise TrainerError(f"--batch-size {batch_size} is larger than the {plural(per_rank, 'training image')} per "
                           "process; lower it")


def check_freeze(cfg: RunConfig, frozen: list[nn.Module]) -> None:
    """Refuse frozen random blocks (checked after `freeze_blocks`, whose check of N comes first)."""
    if frozen and cfg.weights == "none":
        raise TrainerError(f"--freeze {cfg.freeze} with --weights none freezes random blocks, which then never learn; "
                           "drop --freeze, or give pretrained --weights (imagenet or a PATH)")


def check_sharded_head(cfg: RunConfig, distributed: bool) -> None:
    """Refuse what a sharded margin head (Partial FC: `--nproc` above 1 or `--sample-rate` below 1) cannot do."""
    if sharded_rate(HeadConfig.from_run(cfg), cfg.sample_rate, distributed) is None:
        return
    # Each rank holds other rows of the centres: an average of the weights would need them gathered as checkpoints
    # gather them, on every update.
    for option, used in (("--label-smoothing", cfg.label_smoothing > 0), ("--ema", cfg.ema > 0)):
        if used:
            raise TrainerError(f"{option} is not supported by a sharded {cfg.head} head (Partial FC: --nproc above 1 "
                               "or --sample-rate below 1): drop it")


def check_forward(model: nn.Module, cfg: RunConfig, device: torch.device) -> None:
    """One forward pass of two blank images to the embedding at each size the run uses (`--image-size`,
    `--progressive`, `--eval-image-size`), so a model that cannot take one fails now, in one line.

    The line names torchvision's minimum input size for the architecture when that is what a size misses.
    """
    model.eval()  # no batch-norm statistics change
    sizes = {"--image-size": cfg.image_size, "--progressive": cfg.progressive, "--eval-image-size": cfg.eval_image_size}
    for option, size in sizes.items():
        if size is None:
            continue
        try:
            with torch.no_grad():
                blank = torch.zeros(2, 3, size, size, device=device)
                embed(model, blank.contiguous(memory_format=torch.channels_last))
        except (RuntimeError, AssertionError, ValueError) as exc:
            smallest = torchvision_min_size(cfg.arch)
            if smallest > size:
                raise TrainerError(f"--arch {cfg.arch} does not run at {option} {size}: torchvision gives it a "
                                   f"minimum input of {smallest} px; pass {option} {smallest} or more") from None
            raise TrainerError(f"--arch {cfg.arch} does not run at {option} {size} ({first_line(exc)}); "
                               "choose a size it accepts") from None


def torchvision_min_size(arch: str) -> int:
    """The smallest input side torchvision's weights metadata (`meta["min_size"]`) gives `arch` (1: none given)."""
    try:
        meta = torchvision.models.get_model_weights(arch).DEFAULT.meta
    except (ValueError, KeyError, AttributeError):
        return 1
    return max(meta.get("min_size", (1, 1)))


def check_sync_bn(sync_bn: bool, device_type: str) -> None:
    """Refuse --sync-bn (under DDP: `sync_bn`) on the CPU, where SyncBatchNorm has no kernel."""
    if sync_bn and device_type != "cuda":
        raise TrainerError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU kernel); "
                           "drop it on the CPU")


def launch_device(choice: str, world_size: int) -> str:
    """The device type ("cuda" or "cpu") `--device` gives each of `world_size` processes on this node, refused in
    the one line `rank_device` raises; it makes no CUDA context (the launching process only waits for torchrun)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return rank_device(choice, DistContext(world_size=world_size, local_world_size=world_size), gpus).type


def dropped_note(split_size: int, used: int, batch_size: int, world_size: int) -> str | None:
    """The line that says how many training images each epoch leaves out, when more than 1%."""
    left = split_size - used
    if left * 100 <= split_size:
        return None
    return (f"each epoch leaves out {left} of the {split_size} training images ({100 * left / split_size:.0f}%; "
            f"a new random choice each epoch): only whole batches of {batch_size} are trained"
            + (f" on each of {world_size} processes" if world_size > 1 else "") + "; a --batch-size dividing "
            f"{split_size // world_size} leaves out fewer")
