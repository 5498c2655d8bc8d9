"""Training throughput per architecture and backend, against a bare loop measured in the same run.

    python tools/bench_train.py [--archs mobilenet_v2,resnet18,resnet50] [--backends torch,dali]
                                [--image-size 224] [--batch-size 32] [--steps 20] [--device auto] [--compile]
                                [--json OUT.json]

For each architecture one model is built, set up as `trainer run` sets it up
(`trainer.run.tune_backends`, `trainer.run.wrap_model`: with `--compile` that is where it is
compiled), and measured with the trainer's own step:
- bare: `trainer.loop.train_step` on one fixed batch, nothing else (its first step, which
  compiles the model with `--compile`, is timed on its own: `compile_seconds`);
- synthetic: `trainer.loop.train_one_epoch` fed by the `synthetic` backend (compute alone),
  and its ratio to bare;
- each real backend end to end on a generated pack (250-450 px JPEGs), with the data-wait
  fraction.
Each measurement warms up inside the same batch iterator it then times (no loader restart
or prefetch fill inside the timed steps), and its clock stops after the GPU has finished
the last step. The JSON is rewritten after each architecture, so a run cut short keeps
what it measured. `--compiled-json` measures again, compiled, in the same process (one
start-up for both): tools/gpu_check.sh's compute part.
"""
from __future__ import annotations

import itertools
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import click
import torch
from torch import nn

from dali_pipes import PackReader, PipelineSpec, atomic_write_bytes, available_backends, build_loader
from trainer.cli_usage import HELP_OPTIONS
from trainer.config import RunConfig
from trainer.distributed import DistContext, resolve_device
from trainer.loop import StepConfig, resolve_amp, train_one_epoch, train_step
from trainer.models import set_train_mode
from trainer.run import tune_backends, wrap_model
from trainer.state import TrainingState, build_state

Batch = tuple[torch.Tensor, torch.Tensor]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainee:
    """One architecture's model as `trainer run` trains it, and the step configuration the measurements share."""

    def __init__(self, cfg: RunConfig, num_classes: int, device: torch.device, compile_backend: str) -> None:
        self.cfg, self.device = cfg, device
        tune_backends(device)
        self.state: TrainingState = build_state(cfg, num_classes, device)
        self.model = wrap_model(self.state.model, cfg, DistContext(), device, compile_backend=compile_backend)
        self.step = StepConfig(nn.CrossEntropyLoss(), resolve_amp(cfg.amp, device), self.state.scaler,
                               log_every=cfg.log_every)

    def train(self, batches: Iterable[Batch], count: int) -> float:
        """`train_one_epoch` over the `count` `batches`; returns the seconds it waited for them."""
        result = train_one_epoch(self.model, batches, self.state.optimizer, self.step, device=self.device,
                                 set_lr=lambda i: self.cfg.lr,
                                 set_train_mode=lambda: set_train_mode(self.state.model, self.state.frozen),
                                 batches=count)
        return result.state.data_wait


def bare_loop(trainee: Trainee, num_classes: int, steps: int, warmup: int) -> dict[str, float]:
    """images/s of the train step alone on one fixed batch (the ceiling), and its first step's seconds."""
    cfg, device = trainee.cfg, trainee.device
    images = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (cfg.batch_size,), device=device)
    set_train_mode(trainee.state.model, trainee.state.frozen)
    start = time.perf_counter()
    for i in range(max(1, warmup) + steps):
        if i == 1:  # the first step compiles the model (with --compile) and autotunes cuDNN
            _sync(device)
            first = time.perf_counter() - start
        if i == max(1, warmup):
            _sync(device)
            start = time.perf_counter()
        train_step(trainee.model, trainee.state.optimizer, images, labels, trainee.step)
    _sync(device)
    return {"images_per_second": steps * cfg.batch_size / (time.perf_counter() - start), "first_step_seconds": first}


def trainer_epoch(trainee: Trainee, pack: Path, backend: str, steps: int, warmup: int,
                  workers: int | None) -> dict[str, float]:
    """images/s and data-wait fraction of the trainer's epoch function over `steps` batches after `warmup`."""
    cfg, device = trainee.cfg, trainee.device
    loader = build_loader(PackReader(pack), "train", backend=backend, batch_size=cfg.batch_size, train=True,
                          device=device, num_workers=workers, seed=0, spec=PipelineSpec(image_size=cfg.image_size))
    batches = _batches(loader, warmup + steps)
    trainee.train(itertools.islice(batches, warmup), warmup)  # workers, allocator, cuDNN, the prefetcher's fill
    _sync(device)
    start = time.perf_counter()
    waited = trainee.train(batches, steps)  # the same iterator: no restart inside the timed steps
    _sync(device)
    seconds = time.perf_counter() - start
    return {"images_per_second": steps * cfg.batch_size / seconds, "data_wait_fraction": waited / seconds}


def _batches(loader: Any, count: int) -> Iterator[Batch]:
    """The first `count` batches of `loader`, going on into further epochs as needed."""
    done = 0
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        for batch in loader:
            yield batch
            done += 1
            if done == count:
                return


def make_pack(folder: Path, images: int) -> Path:
    """A pack of `images` 250-450 px JPEGs in 10 classes."""
    from make_demo_dataset import make_demo_dataset  # a script beside this one (its folder is on sys.path)

    from dali_pipes import PackOptions, pack_folder

    make_demo_dataset(folder / "src", classes=10, per_class=max(1, images // 10), min_size=250, max_size=450,
                      png_every=0)
    pack_folder(folder / "src", folder / "bench.h5", PackOptions(val_ratio=0.05, test_ratio=0.05), show_progress=False)
    return folder / "bench.h5"


def measure_arch(cfg: RunConfig, pack: Path, device: torch.device, backends: list[str], steps: int, warmup: int,
                 workers: int | None, compile_backend: str) -> dict[str, Any]:
    """One row of the results: bare, synthetic and each backend for `cfg.arch`."""
    num_classes = PackReader(pack).num_classes
    trainee = Trainee(cfg, num_classes, device, compile_backend)
    bare = bare_loop(trainee, num_classes, steps, warmup)
    synthetic = trainer_epoch(trainee, pack, "synthetic", steps, warmup, workers)
    row = {"arch": cfg.arch, "device": str(device), "batch_size": cfg.batch_size, "image_size": cfg.image_size,
           "compiled": cfg.compile, "first_step_seconds": bare["first_step_seconds"],
           "compile_seconds": bare["first_step_seconds"] if cfg.compile else None,
           "bare_images_per_second": bare["images_per_second"],
           "synthetic_images_per_second": synthetic["images_per_second"],
           "synthetic_vs_bare": synthetic["images_per_second"] / bare["images_per_second"], "backends": {}}
    for backend in backends:
        try:
            row["backends"][backend] = trainer_epoch(trainee, pack, backend, steps, warmup, workers)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other backends
            row["backends"][backend] = {"error": str(exc).splitlines()[0][:120]}
    return row


@click.command(context_settings=HELP_OPTIONS)
@click.option("--archs", default="mobilenet_v2,resnet18,resnet50", show_default=True)
@click.option("--backends", default=None,
              help="Real backends to run end to end (default: all available; 'none': compute only).")
@click.option("--pack", type=click.Path(path_type=Path, exists=True), help="Use this pack instead of generating one.")
@click.option("--images", default=600, show_default=True, help="Images in the generated pack.")
@click.option("--image-size", default=224, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--steps", default=10, show_default=True, type=click.IntRange(min=1), help="Timed steps per measurement.")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0))
@click.option("--workers", type=int, default=None)
@click.option("--amp", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp16", "off"]))
@click.option("--compile", "compile_", is_flag=True, help="Compile each model as `trainer run --compile` does.")
@click.option("--compiled-json", type=click.Path(path_type=Path),
              help="Also measure --compiled-archs compiled, after the other rows, into this JSON file.")
@click.option("--compiled-archs", default=None, help="Architectures for --compiled-json (default: --archs).")
@click.option("--compile-backend", default="inductor", show_default=True,
              help="torch.compile's backend ('eager' checks the compiled path quickly, without code generation).")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the results as JSON.")
def main(archs: str, backends: str | None, pack: Path | None, images: int, image_size: int, batch_size: int, steps: int,
         warmup: int, workers: int | None, amp: str, compile_: bool, compiled_json: Path | None,
         compiled_archs: str | None, compile_backend: str, device: str, json_out: Path | None) -> None:
    """Print training images/s per architecture and backend, with ratios to a bare loop."""
    dev = resolve_device(device, DistContext())
    asked = backends.split(",") if backends else available_backends()
    real = [b for b in asked if b not in ("synthetic", "none", "")]
    runs = [(archs.split(","), compile_, json_out)]
    if compiled_json:
        runs.append(((compiled_archs or archs).split(","), True, compiled_json))
    with tempfile.TemporaryDirectory() as tmp:
        pack = pack or make_pack(Path(tmp), images)
        for names, compiled, out in runs:
            rows: list[dict[str, Any]] = []
            for arch in names:
                cfg = RunConfig(pack=str(pack), arch=arch, weights="none", image_size=image_size,
                                batch_size=batch_size, amp=amp, compile=compiled, log_every=10**9)
                rows.append(measure_arch(cfg, pack, dev, real, steps, warmup, workers, compile_backend))
                _print_row(rows[-1])
                if out:
                    _write(out, {"device": str(dev), "gpu": _gpu_name(dev), "torch": torch.__version__,
                                 "compiled": compiled, "rows": rows})


def _gpu_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def _write(path: Path, results: dict[str, Any]) -> None:
    text = json.dumps(results, indent=2)
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def _print_row(row: dict[str, Any]) -> None:
    compiled = f", compiled in {row['compile_seconds']:.1f} s" if row["compiled"] else ""
    print(f"{row['arch']} on {row['device']} (batch {row['batch_size']}, {row['image_size']} px{compiled}): "
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
