"""Partial FC against a direct unsharded computation: one process, two gloo processes, sampling, resharding."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from trainer.partial_fc import PartialFC, class_shard, gather_rows, initial_centres, shard_rows

WORLD = 2
DIM, IN_FEATURES, LOCAL_BATCH = 16, 8, 5
SAMPLED_CLASSES, SAMPLE_RATE, SAMPLED_STEPS = 200, 0.2, 3


def reference_loss(embeddings: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor, kind: str, margin: float,
                   scale: float, k: int = 1, columns: torch.Tensor | None = None) -> torch.Tensor:
    """The unsharded margin softmax written out directly: acos for the angle, a loop for the sub-centres,
    F.cross_entropy for the loss. `columns`: only these classes take part (labels must be among them)."""
    cos = F.normalize(embeddings) @ F.normalize(centres).T
    cos = torch.stack([cos[:, c * k:(c + 1) * k].max(dim=1).values for c in range(centres.shape[0] // k)], dim=1)
    if columns is not None:
        cos, labels = cos[:, columns], torch.searchsorted(columns, labels)
    true = cos.gather(1, labels.view(-1, 1))
    theta = torch.acos(true)
    if kind == "arcface":  # cos(theta + m) while theta + m < pi, then cos(theta) - m sin(m) (insightface's)
        shifted = torch.where(theta + margin < math.pi, torch.cos(theta + margin), true - margin * math.sin(margin))
    else:
        shifted = true - margin
    return F.cross_entropy(scale * cos.scatter(1, labels.view(-1, 1), shifted), labels)


def _data(num_classes: int, k: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, DIM, generator=g), torch.randn(num_classes * k, DIM, generator=g),
            torch.randint(0, num_classes, (batch,), generator=g))


@pytest.mark.parametrize("kind, margin, k", [("arcface", 0.5, 1), ("cosface", 0.35, 1), ("arcface", 0.5, 3),
                                             ("cosface", 0.35, 2)])
def test_one_process_full_rate_is_the_unsharded_head(kind: str, margin: float, k: int) -> None:
    embeddings, centres, labels = _data(13, k, 24, seed=k)
    head = PartialFC(DIM, 13, kind=kind, margin=margin, scale=30.0, subcenters=k)
    head.load_full_centres(centres)
    emb = embeddings.clone().requires_grad_(True)
    loss = head(emb, labels)
    loss.backward()
    ref_emb, ref_centres = embeddings.clone().requires_grad_(True), centres.clone().requires_grad_(True)
    expected = reference_loss(ref_emb, ref_centres, labels, kind, margin, 30.0, k)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(emb.grad, ref_emb.grad, atol=1e-5) and emb.grad.abs().max() > 1e-3
    assert torch.allclose(head.centres.grad, ref_centres.grad, atol=1e-5) and head.centres.grad.abs().max() > 1e-3


def test_eval_mode_is_the_plain_softmax_over_every_class() -> None:
    embeddings, centres, labels = _data(9, 1, 12, seed=4)
    head = PartialFC(DIM, 9, sample_rate=0.1, scale=16.0).eval()
    head.load_full_centres(centres)
    expected = F.cross_entropy(16.0 * F.normalize(embeddings) @ F.normalize(centres).T, labels)
    assert head(embeddings, labels).item() == pytest.approx(expected.item(), rel=1e-5)
    assert head.step == 0  # evaluation does not advance the sampling


def _sampled_classes(head: PartialFC) -> torch.Tensor:
    """Classes whose centres got a gradient: exactly those that took part in the step."""
    per_class = head.centres.grad.unflatten(0, (head.local_classes, head.subcenters)).abs().sum(dim=(1, 2))
    return torch.nonzero(per_class).view(-1) + head.start


@pytest.mark.parametrize("batch", [6, 90])  # 90 > R * C: more positives than the rate alone would sample
def test_one_process_sampling_keeps_every_positive(batch: int) -> None:
    head = PartialFC(DIM, SAMPLED_CLASSES, sample_rate=SAMPLE_RATE, subcenters=2, seed=3)
    seen = []
    for step in range(SAMPLED_STEPS):
        embeddings, _, labels = _data(SAMPLED_CLASSES, 2, batch, seed=10 + step)
        head.centres.grad = None
        loss = head(embeddings, labels)
        loss.backward()
        chosen = _sampled_classes(head)
        assert set(labels.tolist()) <= set(chosen.tolist())
        assert len(chosen) == max(math.ceil(SAMPLE_RATE * SAMPLED_CLASSES), min(SAMPLED_CLASSES, batch))
        full = head.centres.detach()
        expected = reference_loss(embeddings, full, labels, "arcface", 0.5, 64.0, 2, columns=chosen)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)  # the softmax over the sampled classes only
        seen.append(frozenset(chosen.tolist()))
    assert head.step == SAMPLED_STEPS and len(set(seen)) == SAMPLED_STEPS  # new negatives each step


def test_shards_cover_the_classes_and_rows_round_trip() -> None:
    for num_classes, world in [(11, 2), (10, 3), (5, 5), (7, 1)]:
        bounds = [class_shard(num_classes, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == num_classes
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
        full = torch.arange(num_classes * 3 * 2.0).view(num_classes * 3, 2)
        assert torch.equal(torch.cat([shard_rows(full, num_classes, r, world) for r in range(world)]), full)
    assert torch.equal(gather_rows(full, 7), full)  # one process: the shard is the whole matrix
    with pytest.raises(ValueError, match="whole number of rows"):
        shard_rows(torch.zeros(10, 2), 3, 0, 1)


def test_initial_centres_do_not_depend_on_the_sharding() -> None:
    whole = initial_centres(0, 9000, 2, 4, seed=5)  # more than one initialization chunk
    parts = torch.cat([initial_centres(a, b, 2, 4, seed=5) for a, b in [(0, 10), (10, 4500), (4500, 9000)]])
    assert torch.equal(whole, parts) and whole.shape == (18000, 4)
    assert abs(whole.std().item() - 1.0) < 0.02 and not torch.equal(whole, initial_centres(0, 9000, 2, 4, seed=6))


def test_bad_arguments_are_errors() -> None:
    with pytest.raises(ValueError, match="sample rate"):
        PartialFC(DIM, 10, sample_rate=0.0)
    with pytest.raises(ValueError, match="unknown margin head 'sphereface'"):
        PartialFC(DIM, 10, kind="sphereface")
    with pytest.raises(ValueError, match=r"does not fit 10 classes x 2 sub-centres x 16"):
        PartialFC(DIM, 10, subcenters=2).load_full_centres(torch.zeros(10, DIM))


# Two gloo processes. Each scenario uses a fixed global batch: rank r takes rows r * LOCAL_BATCH ...
SCENARIOS = {"arcface": ("arcface", 0.5, 1, 11), "cosface_k2": ("cosface", 0.35, 2, 11)}


def _global_inputs(num_classes: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(WORLD * LOCAL_BATCH, IN_FEATURES, generator=g), torch.randn(num_classes * k, DIM, generator=g),
            torch.randint(0, num_classes, (WORLD * LOCAL_BATCH,), generator=g))


def _backbone() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(IN_FEATURES, DIM)


def _worker(rank: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results: dict[str, object] = {}
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    for name, (kind, margin, k, num_classes) in SCENARIOS.items():
        inputs, centres, labels = _global_inputs(num_classes, k, seed=len(name))
        backbone = nn.parallel.DistributedDataParallel(_backbone())
        head = PartialFC(DIM, num_classes, kind=kind, margin=margin, scale=30.0, subcenters=k)
        head.load_full_centres(centres)
        embeddings = backbone(inputs[rows])
        embeddings.retain_grad()
        loss = head(embeddings, labels[rows])
        loss.backward()
        results[name] = {"loss": loss.item(), "embedding_grad": embeddings.grad, "centre_grad": head.centres.grad,
                         "backbone_grad": backbone.module.weight.grad}
    head = PartialFC(DIM, 11, subcenters=2, seed=7)  # initialized here, gathered, then a given matrix loaded
    results["initial"] = head.full_centres()
    head.load_full_centres(torch.arange(22 * DIM, dtype=torch.float32).view(22, DIM))
    results["reloaded"] = head.full_centres()
    head = PartialFC(DIM, SAMPLED_CLASSES, sample_rate=SAMPLE_RATE, seed=3)
    results["sampled"] = []
    for step in range(SAMPLED_STEPS):
        embeddings, _, labels = _data(SAMPLED_CLASSES, 1, WORLD * LOCAL_BATCH, seed=20 + step)
        head.centres.grad = None
        loss = head(embeddings[rows], labels[rows])
        loss.backward()
        results["sampled"].append({"loss": loss.item(), "chosen": _sampled_classes(head), "labels": labels,
                                   "embeddings": embeddings, "centres": head.full_centres()})
    torch.save(results, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Every two-process scenario, run once (spawn returns when both processes have exited)."""
    folder = tmp_path_factory.mktemp("pfc")
    mp.spawn(_worker, args=(str(folder),), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_processes_equal_one_process(two_ranks: list[dict], name: str) -> None:
    kind, margin, k, num_classes = SCENARIOS[name]
    inputs, centres, labels = _global_inputs(num_classes, k, seed=len(name))
    backbone = _backbone()
    centres.requires_grad_(True)
    embeddings = backbone(inputs)
    embeddings.retain_grad()
    expected = reference_loss(embeddings, centres, labels, kind, margin, 30.0, k)
    expected.backward()
    ranks = [r[name] for r in two_ranks]
    assert all(r["loss"] == pytest.approx(expected.item(), rel=1e-5) for r in ranks)
    # The embeddings' gradient comes back times the world size, for DDP's average over the backbone's ranks.
    assert torch.allclose(torch.cat([r["embedding_grad"] for r in ranks]) / WORLD, embeddings.grad, atol=1e-5)
    assert torch.allclose(torch.cat([r["centre_grad"] for r in ranks]), centres.grad, atol=1e-5)
    assert all(torch.allclose(r["backbone_grad"], backbone.weight.grad, atol=1e-5) for r in ranks)
    assert centres.grad.abs().max() > 1e-3 and backbone.weight.grad.abs().max() > 1e-3


@pytest.mark.slow
def test_gather_and_reshard_between_world_sizes(two_ranks: list[dict]) -> None:
    one = PartialFC(DIM, 11, subcenters=2, seed=7)
    assert torch.equal(two_ranks[0]["initial"], one.centres.detach())  # 2 -> gathered: the 1-process matrix
    assert two_ranks[1]["initial"] is None and two_ranks[1]["reloaded"] is None  # only rank 0 receives it
    given = torch.arange(22 * DIM, dtype=torch.float32).view(22, DIM)
    assert torch.equal(two_ranks[0]["reloaded"], given)  # 1 -> 2 -> gathered
    one.load_full_centres(two_ranks[0]["initial"])  # 2 -> 1
    assert torch.equal(one.centres.detach(), initial_centres(0, 11, 2, DIM, seed=7))


@pytest.mark.slow
def test_two_process_sampling_keeps_every_positive(two_ranks: list[dict]) -> None:
    per_rank = SAMPLED_CLASSES // WORLD
    for step in range(SAMPLED_STEPS):
        ranks = [r["sampled"][step] for r in two_ranks]
        labels = ranks[0]["labels"]
        chosen = torch.cat([r["chosen"] for r in ranks])
        assert set(labels.tolist()) <= set(chosen.tolist())
        for r, rank in enumerate(ranks):  # each rank samples R of its own classes, all from its own block
            assert len(rank["chosen"]) == math.ceil(SAMPLE_RATE * per_rank)
            assert rank["chosen"].min() >= r * per_rank and rank["chosen"].max() < (r + 1) * per_rank
        expected = reference_loss(ranks[0]["embeddings"], ranks[0]["centres"], labels, "arcface", 0.5, 64.0,
                                  columns=chosen)
        assert all(r["loss"] == pytest.approx(expected.item(), rel=1e-5) for r in ranks)
    draws = [frozenset(two_ranks[0]["sampled"][s]["chosen"].tolist()) for s in range(SAMPLED_STEPS)]
    assert len(set(draws)) == SAMPLED_STEPS
