"""What only a CUDA GPU can check (skipped without one; `tools/gpu_check.sh` runs them).

The pipelines on the GPU against their CPU selves, a few training steps with AMP and
channels_last through the real command line, and a checkpoint written on the GPU read
back on the CPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dali_pipes import build_loader
from trainer.cli import main as trainer_main

pytestmark = pytest.mark.cuda


def _batches(pack: Path, backend: str, device: str, train: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = build_loader(pack, "train" if train else "val", backend=backend, batch_size=8, train=train, image_size=48,
                          device=device, dtype=torch.uint8, num_workers=1, seed=3)
    loader.set_epoch(1)
    return [(x.cpu(), y.cpu()) for x, y in loader]


@pytest.mark.dali
@pytest.mark.parametrize("train", [False, True])
def test_dali_gpu_pipeline_matches_its_cpu_variant(demo_pack: Path, train: bool) -> None:
    gpu = _batches(demo_pack, "dali", "cuda", train)
    cpu = _batches(demo_pack, "dali", "cpu", train)
    assert len(gpu) == len(cpu)
    for (xg, yg), (xc, yc) in zip(gpu, cpu):
        assert torch.equal(yg, yc)
        diff = (xg.float() - xc.float()).abs()
        # nvJPEG and libjpeg-turbo differ by a level or two (IDCT, chroma upsampling).
        assert diff.mean() < 2.0 and diff.quantile(0.99) <= 12, (diff.mean(), diff.max())


def test_batches_live_on_the_gpu_in_channels_last(demo_pack: Path) -> None:
    for backend in ("torch", "synthetic"):
        loader = build_loader(demo_pack, "train", backend=backend, batch_size=8, train=True, image_size=48,
                              device="cuda", dtype=torch.bfloat16, num_workers=1)
        images, labels = next(iter(loader))
        assert images.is_cuda and labels.is_cuda and images.dtype == torch.bfloat16
        assert images.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("amp, extra", [("bf16", []), ("fp16", []), ("bf16", ["--compile"])])
def test_train_steps_with_amp_and_checkpoint_to_cpu(demo_pack: Path, tmp_path: Path, amp: str,
                                                    extra: list[str]) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(trainer_main, [
        "run", "--pack", str(demo_pack), "--arch", "resnet18", "--weights", "none", "--image-size", "64",
        "--batch-size", "8", "--epochs", "2", "--backend", "torch", "--workers", "1", "--amp", amp, "--channels-last",
        "--device", "cuda", "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    assert f"amp torch.{'bfloat16' if amp == 'bf16' else 'float16'}" in result.output
    ckpt = torch.load(out / "best.pt", weights_only=True)  # no map_location: every tensor is on the CPU
    assert _all_tensors_on_cpu(ckpt)
    on_cpu = CliRunner().invoke(trainer_main, ["eval", "--checkpoint", str(out / "best.pt"), "--pack", str(demo_pack),
                                               "--device", "cpu", "--backend", "torch", "--workers", "0", "--json"])
    on_gpu = CliRunner().invoke(trainer_main, ["eval", "--checkpoint", str(out / "best.pt"), "--pack", str(demo_pack),
                                               "--device", "cuda", "--backend", "torch", "--workers", "0", "--json"])
    assert on_cpu.exit_code == 0 and on_gpu.exit_code == 0, on_cpu.output + on_gpu.output
    cpu, gpu = json.loads(on_cpu.output.splitlines()[-1]), json.loads(on_gpu.output.splitlines()[-1])
    assert cpu["num_samples"] == gpu["num_samples"]
    # GPU decode and TF32 convolutions differ slightly.
    assert cpu["loss"] == pytest.approx(gpu["loss"], rel=2e-2, abs=2e-2)


def _all_tensors_on_cpu(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.device.type == "cpu"
    if isinstance(value, dict):
        value = list(value.values())
    return all(_all_tensors_on_cpu(item) for item in value) if isinstance(value, (list, tuple)) else True


def _sync_checked(batches):
    """`batches`, with CUDA syncs made errors from the second batch on until the epoch's last.

    The first step may sync (cudnn autotuning, constants made once per device); after it,
    a sync anywhere in the hot path (loader, prefetch, decode, warp, step) raises.
    """
    try:
        for k, batch in enumerate(batches):
            if k == 1:
                torch.cuda.set_sync_debug_mode("error")
            yield batch
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_train_steps_never_sync_between_log_boundaries(demo_pack: Path) -> None:
    import torchvision
    from torch import nn

    from trainer.loop import StepConfig, train_one_epoch

    device = torch.device("cuda")
    loader = build_loader(demo_pack, "train", backend="torch", batch_size=4, train=True, image_size=64, device=device,
                          dtype=torch.float32, num_workers=1)
    assert loader.gpu_decode, "torchvision could not decode on this GPU"
    model = torchvision.models.resnet18(num_classes=loader.num_classes).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # bf16: the fp16 GradScaler reads found_inf on the host every step by design.
    step = StepConfig(criterion=nn.CrossEntropyLoss(), amp_dtype=torch.bfloat16,
                      scaler=torch.amp.GradScaler("cuda", enabled=False), log_every=10_000)
    result = train_one_epoch(model, _sync_checked(loader), optimizer, step, device=device, set_lr=lambda i: 0.01,
                             set_train_mode=model.train, batches=len(loader))
    assert result.metrics["train_samples"] == loader.num_samples and len(loader) > 3
    assert 0.0 <= result.metrics["data_wait_fraction"] <= 1.0


def test_gpu_decode_never_writes_memory_that_queued_kernels_still_read(demo_pack: Path) -> None:
    """The torchvision PR 9606 pattern: free tensors that queued kernels still read, then decode."""
    import numpy as np

    from dali_pipes import PackReader
    from dali_pipes.torch_gpu import decode_on_device

    reader = PackReader(demo_pack)
    indices = reader.split_indices("train")[:8]
    encoded = [torch.from_numpy(np.array(reader.image_bytes(int(i)))) for i in indices]
    device = torch.device("cuda")
    decode_on_device(reader, indices, encoded, device)  # warm-up: nvJPEG handles and the decode stream
    for _ in range(10):
        # Blocks of exactly the decoded images' sizes, filled with known values.
        victims = [torch.full((3, int(reader.heights[i]), int(reader.widths[i])), j + 1, dtype=torch.uint8,
                              device=device)
                   for j, i in enumerate(indices)]
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)  # keeps the stream busy while the reads below wait their turn
        sums = [v.sum(dtype=torch.int64) for v in victims]
        expected = [(j + 1) * v.numel() for j, v in enumerate(victims)]
        del victims  # freed while the sums are still queued
        decode_on_device(reader, indices, encoded, device)
        assert [int(s) for s in sums] == expected


def test_huge_photos_resize_and_warp_on_the_gpu_as_on_the_cpu() -> None:
    """A 4000 x 3000 photo among small ones: pre-shrunk, one uint8 canvas, no shared-memory failure."""
    import numpy as np

    from dali_pipes import PipelineSpec
    from dali_pipes.geometry import train_matrices
    from dali_pipes.torch_gpu import transform_images

    yy, xx = np.mgrid[0:4000, 0:3000].astype(np.float32)
    smooth = np.stack([127 + 100 * np.sin(xx / 97), 127 + 100 * np.cos(yy / 131), (xx + yy) / 28], 0)
    images = [torch.from_numpy(smooth.astype(np.uint8)), torch.randint(0, 256, (3, 300, 200), dtype=torch.uint8)]
    spec = PipelineSpec(image_size=224)
    matrices = train_matrices(spec, 0, 0, np.arange(2), [4000, 300], [3000, 200])
    for geometry in (None, matrices):
        cpu = transform_images(images, spec, geometry).int()
        gpu = transform_images([image.cuda() for image in images], spec, geometry).cpu().int()
        assert (gpu - cpu).abs().max() <= 2


def test_our_streams_never_alias_pooled_ones() -> None:
    """torch.cuda.Stream() cycles through 32 pooled streams per priority; ours come from other pools."""
    from dali_pipes.device import device_streams

    device = torch.device("cuda", torch.cuda.current_device())
    streams = device_streams(device)
    ours = {streams.prepare.cuda_stream, streams.decode.cuda_stream}
    assert len(ours) == 2
    pooled = {torch.cuda.Stream(device=device).cuda_stream for _ in range(40)}  # more than a pool holds
    pooled |= {torch.cuda.current_stream(device).cuda_stream, torch.cuda.default_stream(device).cuda_stream}
    assert not ours & pooled
    assert device_streams(device).prepare is streams.prepare  # kept, not taken again
