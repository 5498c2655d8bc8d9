"""Peak memory and step time per rank of the full margin head against Partial FC, on CPU processes (gloo).

    python tools/bench_head.py [--classes 100000,1000000] [--dim 512] [--batch-size 32] [--sample-rate 0.1]
                               [--nproc 2] [--steps 3] [--warmup 1] [--budget-gb 20] [--json OUT.json]

Heads, each trained for `--steps` SGD-with-momentum steps on random embeddings (what a backbone would give)
after `--warmup` steps, in fresh processes (so the peak is the head's own):
- full: today's `MarginHead` under data parallelism: every rank holds all C centres, computes its local
  batch against them and all-reduces the C x D gradient (in place, as DistributedDataParallel's buckets
  would; DDP's default buckets add one more gradient copy, not counted here);
- pfc R=1: Partial FC without sampling (model parallel): C / ranks centres per rank, the global batch;
- pfc R=<rate>: Partial FC sampling negatives.
peak: the rise of each process's peak RSS over its RSS before the head was built (the largest over ranks);
step: the median over steps of the slowest rank's time (barriers around each step).
A run whose estimated memory over all ranks exceeds `--budget-gb` is not started; its row gives the estimate.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dali_pipes.atomic import atomic_write_bytes
from trainer.cli_usage import HELP_OPTIONS
from trainer.margin_heads import MarginHead
from trainer.partial_fc import PartialFC, class_shard

GIB = 2 ** 30
FLOAT_BYTES = 4
# Copies of a rank's C x D centres alive at the peak, as measured at 100,000 classes (7.5 and 4.3-4.8): the
# parameter, its gradient, the momentum and SGD's weight-decay temporary, and for the full head the normalized
# centres F.normalize keeps and its backward's temporaries.
CENTRE_COPIES = {"full": 8, "pfc": 5}
LOGIT_COPIES = 4  # cosines, margin logits, softmax kept for the backward, its gradient


@dataclass(frozen=True)
class Case:
    """One benchmarked configuration."""

    classes: int
    head: str  # full or pfc
    sample_rate: float
    dim: int
    batch_size: int  # per rank
    nproc: int
    steps: int
    warmup: int


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    classes: int
    head: str
    ranks: int
    batch_per_rank: int
    centres_per_rank: int
    peak_mb_per_rank: float | None  # None: not run
    step_s: float | None
    samples_per_s: float | None
    note: str


def head_name(case: Case) -> str:
    return "full" if case.head == "full" else f"pfc R={case.sample_rate:g}"


def estimated_bytes_per_rank(case: Case) -> int:
    """One rank's peak as the measured copies of its centres predict it, to decide whether the run fits."""
    if case.head == "full":
        centres, batch, columns = case.classes, case.batch_size, case.classes
    else:
        start, stop = class_shard(case.classes, 0, case.nproc)
        centres, batch = stop - start, case.batch_size * case.nproc
        columns = max(round(case.sample_rate * centres), batch)
    return (CENTRE_COPIES[case.head] * centres * case.dim + LOGIT_COPIES * batch * columns) * FLOAT_BYTES


def threads_per_rank(nproc: int) -> int:
    """Each rank's share of the cores."""
    return max(1, (os.cpu_count() or 1) // nproc)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _build(case: Case) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    if case.head == "full":
        head: torch.nn.Module = MarginHead(case.dim, case.classes, "arcface", embedding_dim=case.dim)
    else:
        head = PartialFC(case.dim, case.classes, sample_rate=case.sample_rate)
    head.train()
    return head, torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def _step(case: Case, head: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int, step: int) -> None:
    """One SGD step of `head` on this rank's random embeddings and labels."""
    generator = torch.Generator().manual_seed(step * case.nproc + rank)
    embeddings = torch.randn(case.batch_size, case.dim, generator=generator, requires_grad=True)
    labels = torch.randint(0, case.classes, (case.batch_size,), generator=generator)
    optimizer.zero_grad(set_to_none=True)
    if case.head == "full":
        F.cross_entropy(head(embeddings, labels), labels).backward()
        if case.nproc > 1:  # what DDP does with a replicated head: average its gradients over ranks
            for parameter in head.parameters():
                if parameter.grad is not None:
                    dist.all_reduce(parameter.grad)
                    parameter.grad.div_(case.nproc)
    else:
        head(embeddings, labels).backward()
    optimizer.step()


def _barrier(case: Case) -> None:
    if case.nproc > 1:
        dist.barrier()


def _worker(rank: int, case: Case, folder: str) -> None:
    """Build the head, take warm-up and timed steps; write this rank's peak and step times."""
    torch.set_num_threads(threads_per_rank(case.nproc))
    if case.nproc > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=case.nproc)
    baseline = _peak_rss_bytes()
    head, optimizer = _build(case)
    times = []
    for step in range(case.warmup + case.steps):
        _barrier(case)
        start = time.perf_counter()
        _step(case, head, optimizer, rank, step)
        _barrier(case)
        if step >= case.warmup:
            times.append(time.perf_counter() - start)
    result = {"peak": _peak_rss_bytes() - baseline, "times": times}
    Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    if case.nproc > 1:
        dist.destroy_process_group()


def _run_ranks(case: Case) -> list[dict]:
    """`_worker` in `case.nproc` fresh processes; returns when all have exited."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(case, folder), nprocs=case.nproc, join=True)
        return [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(case.nproc)]


def measure(case: Case, budget_bytes: int) -> Row:
    """Run `case` on all its ranks and summarize it, or say what it would need when that exceeds the budget."""
    centres = case.classes if case.head == "full" else class_shard(case.classes, 0, case.nproc)[1]
    needs = estimated_bytes_per_rank(case) * case.nproc
    if needs > budget_bytes:
        return Row(case.classes, head_name(case), case.nproc, case.batch_size, centres, None, None, None,
                   f"not run: needs ~{needs / GIB:.1f} GiB over {case.nproc} ranks (estimated)")
    ranks = _run_ranks(case)
    step = statistics.median(max(times) for times in zip(*(r["times"] for r in ranks)))
    peak = max(r["peak"] for r in ranks) / 2 ** 20
    return Row(case.classes, head_name(case), case.nproc, case.batch_size, centres, peak, step,
               case.batch_size * case.nproc / step, "")


def format_table(rows: list[Row]) -> list[str]:
    """The rows as a Markdown table."""
    lines = ["| identities | head | ranks | batch/rank | centres/rank | peak MB/rank | step s | samples/s | note |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        measured = ("-", "-", "-") if r.step_s is None else \
            (f"{r.peak_mb_per_rank:,.0f}", f"{r.step_s:.2f}", f"{r.samples_per_s:,.1f}")
        lines.append(f"| {r.classes:,} | {r.head} | {r.ranks} | {r.batch_per_rank} | {r.centres_per_rank:,} | "
                     f"{' | '.join(measured)} | {r.note} |")
    return lines


@click.command(context_settings=HELP_OPTIONS)
@click.option("--classes", default="100000,1000000", show_default=True, help="Identity counts, comma-separated.")
@click.option("--dim", type=click.IntRange(min=1), default=512, show_default=True, help="Embedding width.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Embeddings per rank.")
@click.option("--sample-rate", type=click.FloatRange(0, 1, min_open=True), default=0.1, show_default=True,
              help="Partial FC's rate (Partial FC at 1 is measured too).")
@click.option("--nproc", type=click.IntRange(min=1), default=2, show_default=True, help="Processes (gloo ranks).")
@click.option("--steps", type=click.IntRange(min=1), default=3, show_default=True, help="Timed steps.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed steps first.")
@click.option("--budget-gb", type=click.FloatRange(min=0, min_open=True), default=20.0, show_default=True,
              help="Memory (GiB, all ranks together) a run may need; larger runs are only estimated.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the rows as JSON.")
def main(classes: str, dim: int, batch_size: int, sample_rate: float, nproc: int, steps: int, warmup: int,
         budget_gb: float, json_out: Path | None) -> None:
    """Print a table of peak memory and step time per rank for each head and identity count."""
    try:
        counts = [int(c) for c in classes.split(",")]
    except ValueError:
        raise click.BadParameter(f"{classes!r} is not a comma-separated list of integers", param_hint="--classes")
    rates = [1.0, sample_rate] if sample_rate < 1 else [1.0]
    cases = [Case(c, head, rate, dim, batch_size, nproc, steps, warmup) for c in counts
             for head, rate in [("full", 1.0), *(("pfc", r) for r in rates)]]
    rows = []
    for case in cases:
        rows.append(measure(case, int(budget_gb * GIB)))
        click.echo(format_table(rows[-1:])[-1], err=True)  # progress: each row as it is measured
    click.echo("\n".join(format_table(rows)))
    click.echo(f"torch {torch.__version__}, {threads_per_rank(nproc)} threads per rank, {os.cpu_count()} cores; "
               f"batch {batch_size} per rank, {dim}-d embeddings, SGD with momentum")
    if json_out:
        payload = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "rows": [asdict(r) for r in rows]}
        atomic_write_bytes(json_out, lambda f: f.write(json.dumps(payload, indent=2).encode()))


if __name__ == "__main__":
    main()
