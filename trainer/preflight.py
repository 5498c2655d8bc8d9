"""What `trainer run --nproc N` checks in the launching process, before torchrun starts N processes.

Every check that needs no process group runs here, so a mistake is one line, not one per
process followed by torchrun's traceback: the pack and its splits, the batch size, the
device and --sync-bn, a sharded head's options, the decoded cache's room, --monitor against
the pack's kind of validation, --tensorboard's package, the weights, the architecture at
--image-size, the run folder, and a resume's checkpoint. Each check is the one the processes
run again where they meet its subject.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dali_pipes import PackReader
from trainer.checks import check_forward, check_freeze, check_pack, check_sharded_head, check_sync_bn, launch_device
from trainer.config import RunConfig
from trainer.extras import require
from trainer.models import HeadConfig, build_model, freeze_blocks
from trainer.resume import resumable_checkpoint
from trainer.run_cache import need_cache
from trainer.run_folder import check_out_dir
from trainer.validation import validation_kind


def preflight(cfg: RunConfig, world_size: int, resume: Path | None = None) -> None:
    """Raise the one-line `TrainerError` any process of a `world_size` run of `cfg` would raise before training."""
    reader = PackReader(cfg.pack)
    check_pack(reader, cfg.batch_size, world_size, cfg.scheduler)
    check_sharded_head(cfg, world_size > 1)
    check_sync_bn(cfg.sync_bn and world_size > 1, launch_device(cfg.device, world_size))
    need_cache(cfg, reader, world_size, device=None)  # its size against the shared memory; the GPU's is not touched
    validation_kind(reader).check_monitor(reader, cfg.monitor)
    if cfg.tensorboard:
        require("tensorboard", "tb", "--tensorboard")
    head = HeadConfig.from_run(cfg)
    # The weights too (downloaded here once, not by every process at the same time).
    model = build_model(cfg.arch, reader.num_classes, weights=cfg.weights, head=head)
    check_freeze(cfg, freeze_blocks(model, cfg.freeze))
    check_forward(model, cfg, torch.device("cpu"))
    if cfg.out:
        check_out_dir(Path(cfg.out), resume is not None)
    if resume is not None:
        resumable_checkpoint(resume, cfg, head, reader.classes)
