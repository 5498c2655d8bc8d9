"""Host (CPU) time per batch of the per-batch Python around the pipelines, before/after vectorizing.

    python tools/bench_host_overhead.py [--batch-size 512] [--image-size 224] [--repeat 5]

Times, on synthetic decoded images (no pack, no decode), with torch on the CPU:
  draw       `geometry.sample_augmentation` for one batch (flip + angle per sample)
  matrices   `geometry.train_matrices` for one batch (the draw and the per-sample affine matrices)
  warp       `torch_gpu.transform_images` train geometry (the GPU path's code) on tiny CPU images
             (16-31 px to 16 px): next to no pixel work, so the time is what the host pays per batch
             to issue it (Python, matrices, dispatch), the part a GPU cannot take over; with the
             number of tensor operations (each a kernel launch on a GPU) it issues
  warp cpu   the same on CPU tensors, one thread (pixel work included; only the CI path runs this)
  dali feed  what the DALI backend's `Feed` (dali_graph) does per batch on the training thread
             (byte views, labels, augmentation draw, warp matrices); needs nvidia-dali to import
Run it from a checkout (PYTHONPATH=.) to compare two versions of the code; best of `--repeat`.
It times internals, so it imports the modules it measures, not only `dali_pipes`' public names.
"""
from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Callable

import click
import numpy as np
import torch

from dali_pipes import PipelineSpec, sample_augmentation
from dali_pipes.geometry import affine_matrices, train_matrices
from dali_pipes.torch_gpu import transform_images
from trainer.cli_usage import HELP_OPTIONS


def best_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * min(times)


def count_ops(fn: Callable[[], object]) -> int:
    """Tensor operations (aten calls: kernel launches on a GPU) that `fn` issues."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            Counter.calls += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.calls


def fake_reader(batch: int, rng: np.random.Generator) -> SimpleNamespace:
    heights, widths = rng.integers(300, 500, batch), rng.integers(300, 500, batch)
    data = np.zeros(batch * 100, np.uint8)
    return SimpleNamespace(heights=heights, widths=widths, labels=rng.integers(0, 10, batch),
                           image_bytes=lambda i: data[i * 100 : (i + 1) * 100])


@click.command(context_settings=HELP_OPTIONS)
@click.option("--batch-size", default=512, show_default=True)
@click.option("--image-size", default=224, show_default=True)
@click.option("--warp-batch", default=64, show_default=True, help="Batch for the warp (CPU warps are slow).")
@click.option("--repeat", default=5, show_default=True)
def main(batch_size: int, image_size: int, warp_batch: int, repeat: int) -> None:
    """Print host milliseconds per batch for each measured step."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    spec = PipelineSpec(image_size=image_size)
    indices = rng.permutation(10**6)[:batch_size]
    print(f"draw      batch {batch_size}: {best_ms(lambda: sample_augmentation(spec, 0, 1, indices), repeat):8.2f} ms")
    heights, widths = rng.integers(300, 500, batch_size), rng.integers(300, 500, batch_size)
    matrices_ms = best_ms(lambda: train_matrices(spec, 0, 1, indices, heights, widths), repeat)
    print(f"matrices  batch {batch_size}: {matrices_ms:8.2f} ms")
    flips, angles = sample_augmentation(spec, 0, 1, np.arange(batch_size))
    tiny = [torch.randint(0, 256, (3, int(h) // 16, int(w) // 16), dtype=torch.uint8) for h, w in zip(heights, widths)]
    small = PipelineSpec(image_size=16)
    tiny_matrices = affine_matrices(heights // 16, widths // 16, small.image_size, flips, angles)
    warp = best_ms(lambda: transform_images(tiny, small, tiny_matrices), repeat)
    ops = count_ops(lambda: transform_images(tiny, small, tiny_matrices))
    print(f"warp      batch {batch_size}: {warp:8.2f} ms, {ops} tensor ops  (host cost: tiny images, mixed sizes)")
    images = [torch.randint(0, 256, (3, int(h), int(w)), dtype=torch.uint8)
              for h, w in zip(heights[:warp_batch], widths[:warp_batch])]
    matrices = affine_matrices(heights[:warp_batch], widths[:warp_batch], spec.image_size, flips[:warp_batch],
                               angles[:warp_batch])
    warp = best_ms(lambda: transform_images(images, spec, matrices), repeat)
    print(f"warp cpu  batch {warp_batch}: {warp:8.2f} ms  (CPU tensors, 1 thread, pixel work included)")
    try:
        from dali_pipes.dali_graph import Feed, Graph
    except ImportError as exc:
        print(f"dali feed: skipped ({exc})")
        return
    reader = fake_reader(batch_size, rng)
    feed = Feed(reader, Graph(spec, train=True, gpu=True, decode="mixed", geometry="fused"), seed=0)
    order = np.arange(batch_size)
    print(f"dali feed batch {batch_size}: {best_ms(lambda: feed._columns(order), repeat):8.2f} ms")


if __name__ == "__main__":
    main()
