"""DDP on the CPU (gloo, 2 processes): exact metrics, disjoint shards, failures that end the job."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_pack

from dali_pipes import plan_epoch

REPO = Path(__file__).resolve().parents[1]
RUN = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "8", "--backend", "torch",
       "--workers", "0", "--log-every", "2", "--scheduler", "step"]
# Every training mechanic at once, so the two-process run shows each one works under DDP.
MECHANICS = ["--crop-scale", "0.5,1", "--color-jitter", "0.2,0.2,0.2", "--random-erasing", "0.25", "--mixup", "0.2",
             "--ema", "0.9", "--accum-steps", "2", "--progressive", "16", "--tta", "flip"]


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 9 val and 9 test images: odd, so two ranks get unequal eval shards.
    return make_pack(tmp_path_factory.mktemp("ddp"), classes=3, per_class=15, seed=2)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _trainer(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("n", [1, 2, 5, 7, 9, 10, 31, 64])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_shards_are_disjoint_and_complete(n: int, world_size: int, batch_size: int) -> None:
    split = np.arange(100, 100 + n)
    for epoch in (0, 1):
        evals = [plan_epoch(split, train=False, seed=0, epoch=epoch, batch_size=batch_size, rank=r,
                            world_size=world_size)
                 for r in range(world_size)]
        seen = np.concatenate([np.concatenate(list(p.batches())) if len(p) else np.zeros(0, int) for p in evals])
        assert sorted(seen.tolist()) == split.tolist()  # every sample exactly once
        trains = [plan_epoch(split, train=True, seed=0, epoch=epoch, batch_size=batch_size, rank=r,
                             world_size=world_size, drop_last=False)
                  for r in range(world_size)]
        sizes = {len(p.indices) for p in trains}
        assert sizes == {n // world_size}  # equal shards
        together = np.concatenate([p.indices for p in trains])
        assert len(set(together.tolist())) == len(together) == (n // world_size) * world_size
    a = plan_epoch(split, train=True, seed=0, epoch=0, batch_size=1, world_size=1).indices
    b = plan_epoch(split, train=True, seed=0, epoch=1, batch_size=1, world_size=1).indices
    assert n < 3 or not np.array_equal(a, b)  # a new permutation each epoch


@pytest.mark.slow
def test_two_process_run_matches_one_process_eval(pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _trainer("run", "--pack", str(pack), *RUN, *MECHANICS, "--epochs", "2", "--out", str(out), "--nproc", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2" in result.stdout and result.stdout.count("epoch 1/2") == 1  # only rank 0 prints
    for epoch in (1, 2):  # each epoch's last progress line shows the epoch line's figures: every rank's
        closing = [line for line in result.stderr.splitlines() if line.startswith(f"epoch {epoch}/2: step")][-1]
        summary_line = next(line for line in result.stdout.splitlines() if line.startswith(f"epoch {epoch}/2  "))
        figures = re.search(r"train (loss \S+ top1 \S+)", summary_line).group(1)
        assert f"  {figures} " in closing and "rank 0" not in closing, (closing, summary_line)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tta"] == "flip" and [r["image_size"] for r in _metrics(out)] == [16, 32]
    evaluated = _trainer("eval", "--checkpoint", str(out / "best.pt"), "--pack", str(pack), "--json",
                         "--backend", "torch", "--workers", "0")
    assert evaluated.returncode == 0, evaluated.stderr
    single = json.loads(evaluated.stdout)
    assert single["num_samples"] == summary["test_samples"] == 9
    assert single["top1"] == pytest.approx(summary["test_top1"], abs=1e-9)
    assert single["loss"] == pytest.approx(summary["test_loss"], rel=1e-5)
    # The 2-rank checkpoint resumes in a 1-process run.
    resumed = _trainer("run", "--resume", str(out), "--epochs", "3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_with_its_message(pack: Path, tmp_path: Path) -> None:
    # Inject the failure from outside the project: a sitecustomize that breaks rank 1's train step.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""
        import os
        if os.environ.get("RANK") == "1":
            import trainer.loop as loop
            def broken(*args, **kwargs):
                raise RuntimeError("injected failure on rank 1")
            loop.train_step = broken
    """))
    env = {"PYTHONPATH": os.pathsep.join([str(hook), str(REPO)])}
    result = _trainer("run", "--pack", str(pack), *RUN, "--epochs", "2", "--out", str(tmp_path / "run"), "--nproc", "2",
                      env=env, timeout=240)
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stdout + result.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_without_a_shared_out_folder(pack: Path, tmp_path: Path) -> None:
    # Two "machines" (one process each, as torchrun would start them on two nodes), each with its own --out:
    # rank 1 never sees rank 0's best.pt, and the final test evaluation must not need it.
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "trainer", "run", "--pack", str(pack), *RUN, "--epochs", "1",
                               "--backend", "auto", "--out", str(tmp_path / f"node{rank}")], cwd=REPO,
                              env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "node0" / "summary.json").read_text())
    assert summary["test_samples"] == 9  # both ranks' shards, evaluated with rank 0's best weights
    assert not (tmp_path / "node1").exists()  # only rank 0 writes
    everything = "".join(out + err for out, err in outputs)
    assert everything.count("backend auto -> torch") == 1  # once per run, from rank 0


def test_each_rank_gets_its_own_gpu_or_a_one_line_refusal() -> None:
    from trainer.distributed import DistContext, rank_device
    from trainer.errors import TrainerError

    alone, second_of_two = DistContext(), DistContext(rank=1, world_size=2, local_rank=1, local_world_size=2)
    assert rank_device("auto", alone, 0) == torch.device("cpu")
    assert rank_device("auto", second_of_two, 2) == torch.device("cuda", 1)
    assert rank_device("cuda", second_of_two, 2) == torch.device("cuda", 1)
    assert rank_device("cuda:1", alone, 2) == torch.device("cuda", 1)  # one process per node may pick its GPU
    assert rank_device("cpu", second_of_two, 2) == torch.device("cpu")
    refusals = [("cuda:1", second_of_two, 2, "would put all 2 processes of this node on GPU 1; pass --device cuda"),
                ("cuda", DistContext(local_world_size=4), 2, "4 processes on this node but 2 GPU"),
                ("cuda:2", alone, 2, "this machine has 2 GPU"),
                ("cuda", alone, 0, "CUDA is not available")]
    for choice, ctx, gpus, message in refusals:
        with pytest.raises(TrainerError, match=message) as refused:
            rank_device(choice, ctx, gpus)
        assert "\n" not in str(refused.value)


@pytest.mark.parametrize("sync_bn", [False, True])
def test_ddp_uses_bucket_views_and_skips_the_buffer_broadcast_with_sync_bn(tmp_path: Path, sync_bn: bool) -> None:
    import torch.distributed as dist
    from torch import nn

    from trainer.distributed import data_parallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = data_parallel(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), torch.device("cpu"), sync_bn=sync_bn)
        assert ddp.gradient_as_bucket_view and ddp.broadcast_buffers == (not sync_bn)
        ddp(torch.randn(3, 4)).sum().backward()
        # The gradients are views into DDP's buckets, not tensors of their own.
        assert all(p.grad._base is not None for p in ddp.module.parameters())
    finally:
        dist.destroy_process_group()
