"""What a run checks before it trains, so a bad option or pack is one line, not a failure an epoch later.

`preflight` runs the checks that need no process group in the launching process, before
`--nproc` starts torchrun; `trainer run` itself repeats them in each process.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dali_pipes import PackReader, samples_per_rank, split_kind
from trainer.config import RunConfig
from trainer.errors import TrainerError
from trainer.models import HeadConfig, build_model, embed, freeze_blocks, sharded_rate


def check_pack(reader: PackReader, batch_size: int, world_size: int, scheduler: str = "none") -> None:
    """Refuse packs a classifier cannot train on, with the fix."""
    if reader.num_classes < 2:
        raise TrainerError(f"{reader.path}: {reader.num_classes} class; a classifier needs at least 2 class folders")
    counts = reader.split_counts()
    if counts["train"] == 0:
        raise TrainerError(f"{reader.path}: the train split is empty; repack with lower --val-ratio/--test-ratio")
    if counts["val"] == 0 and counts["test"] == 0:
        raise TrainerError(f"{reader.path}: the val and test splits are both empty, so nothing can measure the model; "
                           "repack with --val-ratio above 0 (or give a val/ folder)")
    train_counts = np.bincount(reader.labels[reader.split_indices("train")], minlength=reader.num_classes)
    missing = [reader.classes[i] for i in np.flatnonzero(train_counts == 0)]
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
        raise TrainerError(f"--batch-size {batch_size} is larger than the {per_rank} training images per process; "
                           "lower it")


def check_freeze(cfg: RunConfig, frozen: list[nn.Module]) -> None:
    """Refuse frozen random blocks (checked after `freeze_blocks`, whose check of N comes first)."""
    if frozen and cfg.weights == "none":
        raise TrainerError(f"--freeze {cfg.freeze} with --weights none freezes random blocks, which then never learn; "
                           "drop --freeze, or give pretrained --weights (imagenet or a PATH)")


def check_sharded_head(cfg: RunConfig, distributed: bool) -> None:
    """Refuse what a sharded margin head (Partial FC: `--nproc` above 1 or `--sample-rate` below 1) cannot do."""
    if cfg.label_smoothing > 0 and sharded_rate(HeadConfig.from_run(cfg), cfg.sample_rate, distributed) is not None:
        raise TrainerError(f"--label-smoothing is not supported by a sharded {cfg.head} head (Partial FC: --nproc "
                           "above 1 or --sample-rate below 1): drop it")


def check_forward(model: nn.Module, cfg: RunConfig, device: torch.device) -> None:
    """One forward pass of two blank images to the embedding, so a model that cannot take `--image-size` fails now,
    in one line."""
    model.eval()  # no batch-norm statistics change
    try:
        with torch.no_grad():
            blank = torch.zeros(2, 3, cfg.image_size, cfg.image_size, device=device)
            embed(model, blank.contiguous(memory_format=torch.channels_last))
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise TrainerError(f"--arch {cfg.arch} does not run at --image-size {cfg.image_size} "
                           f"({str(exc).splitlines()[0][:120] or type(exc).__name__}); choose a size it accepts "
                           "(torchvision's ViTs need their training size, 224)") from None


def preflight(cfg: RunConfig, world_size: int) -> None:
    """The checks that need no process group (pack, splits, batch size, classes, architecture, size).

    Run before `--nproc` launches torchrun, so a mistake is one line instead of one per process.
    """
    reader = PackReader(cfg.pack)
    check_pack(reader, cfg.batch_size, world_size, cfg.scheduler)
    check_sharded_head(cfg, world_size > 1)
    # The real weights are loaded by each process.
    model = build_model(cfg.arch, reader.num_classes, weights="none", head=HeadConfig.from_run(cfg))
    check_freeze(cfg, freeze_blocks(model, cfg.freeze))
    check_forward(model, cfg, torch.device("cpu"))


def dropped_note(split_size: int, used: int, batch_size: int, world_size: int) -> str | None:
    """The line that says how many training images each epoch leaves out, when more than 1%."""
    left = split_size - used
    if left * 100 <= split_size:
        return None
    return (f"each epoch leaves out {left} of the {split_size} training images ({100 * left / split_size:.0f}%; "
            f"a new random choice each epoch): only whole batches of {batch_size} are trained"
            + (f" on each of {world_size} processes" if world_size > 1 else "") + "; a --batch-size dividing "
            f"{split_size // world_size} leaves out fewer")
