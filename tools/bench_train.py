"""Training throughput per architecture and backend, against a bare loop measured in the same run.

    python tools/bench_train.py [--archs mobilenet_v2,resnet18,resnet50] [--backends torch,dali]
                                [--image-size 224] [--batch-size 32] [--steps 20] [--device auto] [--json OUT.json]

For each architecture it measures, with the trainer's own step (`trainer.loop.train_one_epoch`):
- bare: forward, backward and optimizer step on one fixed tensor, nothing else;
- synthetic: the trainer fed by the `synthetic` backend (compute alone), and its ratio to bare;
- each real backend end to end on a generated pack (250-450 px JPEGs), with the data-wait fraction.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from dali_pipes import PipelineSpec, available_backends, build_loader
from trainer.cli_usage import HELP_OPTIONS
from trainer.config import RunConfig
from trainer.distributed import DistContext, resolve_device
from trainer.loop import StepConfig, resolve_amp, train_one_epoch
from trainer.models import set_train_mode
from trainer.state import build_state


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(cfg: RunConfig, num_classes: int, device: torch.device, steps: int, warmup: int) -> float:
    """images/s of forward + backward + step on one fixed batch: the ceiling for the trainer."""
    state = build_state(cfg, num_classes, device)
    model, optimizer = state.model, state.optimizer
    images = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (cfg.batch_size,), device=device)
    criterion = nn.CrossEntropyLoss()
    amp = resolve_amp(cfg.amp, device)
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        state.scaler.step(optimizer)
        state.scaler.update()
    _sync(device)
    return steps * cfg.batch_size / (time.perf_counter() - start)


def trainer_epoch(cfg: RunConfig, pack: Path, backend: str, device: torch.device, steps: int, warmup: int,
                  workers: int | None) -> dict[str, float]:
    """images/s and data-wait fraction of the trainer's epoch function over `steps` batches after `warmup`."""
    from dali_pipes import PackReader

    reader = PackReader(pack)
    state = build_state(cfg, reader.num_classes, device)
    loader = build_loader(reader, "train", backend=backend, batch_size=cfg.batch_size, train=True, device=device,
                          num_workers=workers, seed=0, spec=PipelineSpec(image_size=cfg.image_size))
    step = StepConfig(nn.CrossEntropyLoss(), resolve_amp(cfg.amp, device), state.scaler, log_every=cfg.log_every)
    kwargs = dict(device=device, set_lr=lambda i: cfg.lr,
                  set_train_mode=lambda: set_train_mode(state.model, state.frozen))
    limited = _Limited(loader, warmup)
    train_one_epoch(state.model, limited, state.optimizer, step, **kwargs)  # warm-up: workers, allocator, cudnn
    _sync(device)
    result = train_one_epoch(state.model, _Limited(loader, steps), state.optimizer, step, **kwargs).metrics
    _sync(device)
    return {"images_per_second": result["images_per_second"], "data_wait_fraction": result["data_wait_fraction"]}


class _Limited:
    """The first `steps` batches of a loader, re-iterating epochs as needed."""

    def __init__(self, loader: Any, steps: int) -> None:
        self.loader, self.steps = loader, steps

    def __iter__(self):
        done, epoch = 0, 0
        while done < self.steps:
            self.loader.set_epoch(epoch)
            for batch in self.loader:
                yield batch
                done += 1
                if done == self.steps:
                    return
            epoch += 1


def make_pack(folder: Path, images: int) -> Path:
    """A pack of `images` 250-450 px JPEGs in 10 classes."""
    from make_demo_dataset import make_demo_dataset  # a script beside this one (its folder is on sys.path)

    from dali_pipes import PackOptions, pack_folder

    make_demo_dataset(folder / "src", classes=10, per_class=max(1, images // 10), min_size=250, max_size=450,
                      png_every=0)
    pack_folder(folder / "src", folder / "bench.h5", PackOptions(val_ratio=0.05, test_ratio=0.05), show_progress=False)
    return folder / "bench.h5"


@click.command(context_settings=HELP_OPTIONS)
@click.option("--archs", default="mobilenet_v2,resnet18,resnet50", show_default=True)
@click.option("--backends", default=None,
              help="Real backends to run end to end (default: all available; 'none': compute only).")
@click.option("--pack", type=click.Path(path_type=Path, exists=True), help="Use this pack instead of generating one.")
@click.option("--images", default=600, show_default=True, help="Images in the generated pack.")
@click.option("--image-size", default=224, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--steps", default=10, show_default=True, help="Timed steps per measurement.")
@click.option("--warmup", default=3, show_default=True)
@click.option("--workers", type=int, default=None)
@click.option("--amp", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp16", "off"]))
@click.option("--compile", "compile_", is_flag=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the results as JSON.")
def main(archs: str, backends: str | None, pack: Path | None, images: int, image_size: int, batch_size: int, steps: int,
         warmup: int, workers: int | None, amp: str, compile_: bool, device: str, json_out: Path | None) -> None:
    """Print training images/s per architecture and backend, with ratios to a bare loop."""
    dev = resolve_device(device, DistContext())
    asked = backends.split(",") if backends else available_backends()
    real = [b for b in asked if b not in ("synthetic", "none", "")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        pack = pack or make_pack(Path(tmp), images)
        for arch in archs.split(","):
            cfg = RunConfig(pack=str(pack), arch=arch, weights="none", image_size=image_size, batch_size=batch_size,
                            amp=amp, compile=compile_, log_every=10**9)
            bare = bare_loop(cfg, 10, dev, steps, warmup)
            synthetic = trainer_epoch(cfg, pack, "synthetic", dev, steps, warmup, workers)
            row = {"arch": arch, "device": str(dev), "batch_size": batch_size, "image_size": image_size,
                   "bare_images_per_second": bare, "synthetic_images_per_second": synthetic["images_per_second"],
                   "synthetic_vs_bare": synthetic["images_per_second"] / bare, "backends": {}}
            for backend in real:
                try:
                    row["backends"][backend] = trainer_epoch(cfg, pack, backend, dev, steps, warmup, workers)
                except Exception as exc:  # noqa: BLE001 - report and go on with the other backends
                    row["backends"][backend] = {"error": str(exc).splitlines()[0][:120]}
            rows.append(row)
            _print_row(row)
    if json_out:
        json_out.write_text(json.dumps({"device": str(dev), "torch": torch.__version__, "rows": rows}, indent=2))


def _print_row(row: dict[str, Any]) -> None:
    print(f"{row['arch']} on {row['device']} (batch {row['batch_size']}, {row['image_size']} px): "
          f"bare loop {row['bare_images_per_second']:,.1f} img/s, "
          f"trainer+synthetic {row['synthetic_images_per_second']:,.1f} img/s "
          f"({100 * row['synthetic_vs_bare']:.1f}% of bare)")
    for backend, r in row["backends"].items():
        if "error" in r:
            print(f"  {backend}: failed: {r['error']}")
        else:
            print(f"  {backend}: end to end {r['images_per_second']:,.1f} img/s "
                  f"({100 * r['images_per_second'] / row['synthetic_images_per_second']:.0f}% of compute-only), "
                  f"data wait {100 * r['data_wait_fraction']:.1f}%")


if __name__ == "__main__":
    main()
