"""How long `trainer verify` takes to score every pair, on random embeddings at the seed's scale.

    python tools/bench_verification.py [--images 28000] [--identities 1400] [--dim 512] [--device cpu] [--threads N]

Prints one JSON object: the pair counts, the seconds (wall and CPU) of the all-pairs histograms
(blocked matrix products), of the whole report (ROC, EER, TAR@FAR, 10-fold accuracy,
rank-k), and of drawing `SAMPLED_PAIRS` pairs of each kind without replacement. Random
embeddings verify at chance, so the AUC printed is a sanity check (about 0.5), not a result.
"""
from __future__ import annotations

import json
import time
from typing import Any

import click
import torch

from trainer.cli_usage import HELP_OPTIONS
from trainer.pairs import draw_pairs, pair_counts
from trainer.verification import SAMPLED_PAIRS, score_histograms, verification_report


def bench(images: int, identities: int, dim: int, device: str, seed: int = 0) -> dict[str, Any]:
    """Seconds of each verification step on `images` random `dim`-d embeddings of `identities` equal identities."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(images, dim, generator=generator).to(device)
    labels = (torch.arange(images) % identities).numpy()
    genuine, impostor = pair_counts(labels)
    timings: dict[str, Any] = {"images": images, "identities": identities, "dim": dim, "device": device,
                               "threads": torch.get_num_threads(), "genuine_pairs": genuine, "impostor_pairs": impostor}
    start, cpu = time.perf_counter(), time.process_time()
    counts = score_histograms(embeddings, labels)
    _sync(device)
    # CPU seconds over threads is what the wall time would be on idle cores.
    timings.update(histogram_seconds=time.perf_counter() - start, histogram_cpu_seconds=time.process_time() - cpu)
    if int(counts.sum()) != genuine + impostor:
        raise RuntimeError(f"counted {int(counts.sum())} pairs of {genuine + impostor}")
    start = time.perf_counter()
    figures, _ = verification_report(embeddings, labels)
    timings["report_seconds"] = time.perf_counter() - start
    timings["auc"] = figures["auc"]
    start, cpu = time.perf_counter(), time.process_time()
    pairs = draw_pairs(labels, SAMPLED_PAIRS, seed)
    timings.update(sample_seconds=time.perf_counter() - start, sample_cpu_seconds=time.process_time() - cpu)
    timings["sampled_pairs"] = len(pairs)
    return timings


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@click.command(context_settings=HELP_OPTIONS)
@click.option("--images", default=28000, show_default=True, type=click.IntRange(min=3))
@click.option("--identities", default=1400, show_default=True, type=click.IntRange(min=2))
@click.option("--dim", default=512, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--threads", type=click.IntRange(min=1), help="torch.set_num_threads (default: torch's own).")
def main(images: int, identities: int, dim: int, device: str, threads: int | None) -> None:
    """Time the all-pairs verification of random embeddings."""
    if threads:
        torch.set_num_threads(threads)
    click.echo(json.dumps(bench(images, identities, dim, device)))


if __name__ == "__main__":
    main()
