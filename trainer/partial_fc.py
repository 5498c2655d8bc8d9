"""Partial FC: the margin softmax with its class centres sharded over the ranks of torch.distributed.

As insightface's `PartialFC` (An et al., "Partial FC", 2021/2022): each rank holds the centres of a
contiguous block of about C / world classes (a plain parameter of its own, so its optimizer state stays
there too). Every step gathers the global batch's embeddings and labels, keeps every centre of a class
present in the global batch and samples negatives so that about `sample_rate` of the rank's classes take
part, computes the cosines and margins against those, and the softmax cross-entropy with a max and a sum
all-reduced over ranks. Sampled-out centres get no gradient: at R = 0.1 the head's compute and logits
memory drop tenfold. With R = 1 and one process it is exactly the unsharded margin head.

The module talks to torch.distributed only; with one process (or no process group) it needs none.
Training under DistributedDataParallel: DDP must leave this head's parameter alone (it differs per rank:
`sharded` names it, to wrap the backbone only or to list it as ignored), and see `scale_grad_for_ddp`;
`grad_norm` measures the global norm (to clip by) with every rank's rows counted once. Checkpoints hold the full
centre matrix in class order (`full_centres` on every rank, the matrix on rank 0), which
`load_full_centres` reshards for any world size; `gather_rows`, `all_rows`, `scatter_rows` and
`shard_rows` move any per-class matrix (an optimizer state of the centres, say) the same way.
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.distributed as dist
from torch import nn

from trainer.margins import MARGIN_HEADS, centre_cosines, margin_target, subcenter_cosines

INIT_CHUNK_CLASSES = 4096  # centres are drawn per chunk of classes: the full matrix does not depend on the sharding


def class_shard(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """The classes [start, stop) rank `rank` of `world_size` holds: contiguous, the first C % world one larger."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) without an initialized process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def initial_centres(start: int, stop: int, subcenters: int, embedding_dim: int, seed: int) -> torch.Tensor:
    """Unit-normal centres of classes [start, stop) (`subcenters` rows each), the same rows whatever the sharding."""
    blocks = []
    for chunk in range(start // INIT_CHUNK_CLASSES, math.ceil(stop / INIT_CHUNK_CLASSES)):
        first = chunk * INIT_CHUNK_CLASSES
        generator = torch.Generator().manual_seed(_mix(seed, chunk))
        rows = torch.randn(INIT_CHUNK_CLASSES * subcenters, embedding_dim, generator=generator)
        lo, hi = max(start, first) - first, min(stop, first + INIT_CHUNK_CLASSES) - first
        blocks.append(rows[lo * subcenters:hi * subcenters])
    return torch.cat(blocks) if blocks else torch.empty(0, embedding_dim)


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (seed, step, rank ...), unrelated for neighbouring inputs."""
    digest = hashlib.blake2b("/".join(map(str, values)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def shard_rows(full: torch.Tensor, num_classes: int, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s rows of a per-class matrix (C * K rows in class order: centres or their optimizer state)."""
    per_class = full.shape[0] // num_classes
    if per_class * num_classes != full.shape[0]:
        raise ValueError(f"{full.shape[0]} rows are not a whole number of rows for each of {num_classes} classes")
    start, stop = class_shard(num_classes, rank, world_size)
    return full[start * per_class:stop * per_class]


def _shard_sizes(shard: torch.Tensor, num_classes: int, rank: int, world: int) -> list[int]:
    """Every rank's row count of the per-class matrix whose rank-`rank` block is `shard`."""
    start, stop = class_shard(num_classes, rank, world)
    per_class = shard.shape[0] // (stop - start)
    return [(b - a) * per_class for a, b in (class_shard(num_classes, r, world) for r in range(world))]


def _padded(block: torch.Tensor, rows: int) -> torch.Tensor:
    """`block` with zero rows appended up to `rows`: collectives need equal sizes, shards differ by a class."""
    block = block.detach().contiguous()
    return torch.cat([block, block.new_zeros((rows - block.shape[0], *block.shape[1:]))]) if block.shape[0] < rows \
        else block


def _first_rank(group: dist.ProcessGroup | None) -> int:
    """The global rank of `group`'s rank 0."""
    return dist.get_global_rank(group, 0) if group is not None else 0


def gather_rows(shard: torch.Tensor, num_classes: int, group: dist.ProcessGroup | None = None) -> torch.Tensor | None:
    """The full per-class matrix in class order, on the CPU of rank 0 (None on the others); every rank calls it.

    `shard` is this rank's block (as `shard_rows` cuts it): centres, or an optimizer state of theirs.
    """
    rank, world = _world(group)
    if world == 1:
        return shard.detach().cpu().clone()
    sizes = _shard_sizes(shard, num_classes, rank, world)
    padded = _padded(shard, max(sizes))
    received = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    dist.gather(padded, received, dst=_first_rank(group), group=group)
    if received is None:
        return None
    return torch.cat([block[:size].cpu() for block, size in zip(received, sizes)])


def all_rows(shard: torch.Tensor, num_classes: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The full per-class matrix in class order on every rank, on `shard`'s device; every rank calls it."""
    rank, world = _world(group)
    if world == 1:
        return shard.detach().clone()
    sizes = _shard_sizes(shard, num_classes, rank, world)
    padded = _padded(shard, max(sizes))
    received = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(received, padded, group=group)
    return torch.cat([block[:size] for block, size in zip(received, sizes)])


def scatter_rows(full: torch.Tensor | None, num_classes: int, like: torch.Tensor,
                 group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """This rank's block of rank 0's full per-class matrix `full` (None on the others), shaped and placed as `like`
    (this rank's current block); every rank calls it."""
    rank, world = _world(group)
    if world == 1:
        assert full is not None
        return full.to(like.device, like.dtype)
    sizes = _shard_sizes(like, num_classes, rank, world)
    blocks = None
    if rank == 0:
        assert full is not None
        blocks = [_padded(block.to(like.device, like.dtype), max(sizes)) for block in full.split(sizes)]
    received = _padded(torch.empty_like(like), max(sizes))
    dist.scatter(received, blocks, src=_first_rank(group), group=group)
    return received[:like.shape[0]]


def sharded(model: nn.Module) -> dict[str, "PartialFC"]:
    """The sharded parameters inside `model`, by qualified name (`head.centres`), each with the `PartialFC` holding it.

    These differ per rank: DistributedDataParallel must neither broadcast nor average them, checkpoints gather
    them, and gradient clipping counts their rows once.
    """
    return {f"{name}.centres" if name else "centres": module for name, module in model.named_modules()
            if isinstance(module, PartialFC)}


def set_step(model: nn.Module, step: int) -> None:
    """Set the training step, a part of the sampling seed, of every Partial FC head in `model`: a run resumed at
    global step `step` draws the negatives an uninterrupted run drew there."""
    for head in sharded(model).values():
        head.step = step


def grad_norm(model: nn.Module) -> torch.Tensor:
    """The global L2 norm of the gradients of `model`'s parameters, the same on every rank.

    A sharded head's squared gradient norm is summed over the ranks (one all-reduce) and added to
    that of the replicated parameters (whose gradients DDP made equal): the norm of the whole model,
    for clipping (`nn.utils.clip_grads_with_norm_`) and finiteness checks every rank agrees on.
    """
    heads = sharded(model).values()
    rows = {id(head.centres) for head in heads}
    total = nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None and id(p) not in rows])
    for head in heads:
        if head.centres.grad is not None:
            squares = nn.utils.get_total_norm([head.centres.grad]).square()
            if head.world_size > 1:
                dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=head.group)
            total = (total.square() + squares.to(total.device)).sqrt()
    return total


class _GatherEmbeddings(torch.autograd.Function):
    """All ranks' equal-sized batches concatenated in rank order; the backward sums every rank's gradient for
    this rank's rows (each rank's loss graph reaches every row through its own centres)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, rank: int, world: int, group: dist.ProcessGroup | None,
                grad_scale: float) -> torch.Tensor:
        ctx.rank, ctx.group, ctx.grad_scale, ctx.rows = rank, group, grad_scale, local.shape[0]
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        mine = grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]
        return mine * ctx.grad_scale, None, None, None, None


def _gather_labels(labels: torch.Tensor, world: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    parts = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(parts, labels.contiguous(), group=group)
    return torch.cat(parts)


class _ShardedCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy of logits whose columns are split over ranks, and each row's top-1 hit.

    `target` is the row's true column in this rank's logits, or -1 where another rank holds it. The max
    (for stability) and the sum of exponentials are all-reduced, and so is the true logit, which exactly
    one rank holds; a row is a hit where its true logit is the max (ties count as hits). The backward is
    the local part of (softmax - one-hot) / N.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, world: int,
                group: dist.ProcessGroup | None) -> torch.Tensor:
        peak = logits.max(dim=1, keepdim=True).values
        held = target >= 0
        column = target.clamp_min(0).view(-1, 1)
        true_logit = torch.where(held, logits.gather(1, column).view(-1), 0.0)
        if world > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
            dist.all_reduce(true_logit, op=dist.ReduceOp.SUM, group=group)
        probs = (logits - peak).exp_()
        total = probs.sum(dim=1, keepdim=True)
        if world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        probs.div_(total)
        ctx.save_for_backward(probs, column, held)
        ctx.used = False
        hits = true_logit >= peak.view(-1)
        ctx.mark_non_differentiable(hits)
        return (total.log() + peak).view(-1).sub(true_logit).mean(), hits

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _hits: torch.Tensor | None = None) -> tuple[torch.Tensor | None, ...]:
        if ctx.used:
            raise RuntimeError("Partial FC's loss was back-propagated twice (its softmax is reused in place)")
        ctx.used = True
        probs, column, held = ctx.saved_tensors
        probs.scatter_add_(1, column, -held.to(probs.dtype).view(-1, 1))  # softmax - one-hot, in place
        return probs.mul_(grad / probs.shape[0]), None, None, None


class PartialFC(nn.Module):
    """The sharded, sampled margin head: `loss = head(embeddings, labels)` on every rank, every step.

    embedding_dim, num_classes: the embeddings' width and the total class count (over all ranks).
    kind, margin, scale: the margin (`arcface` or `cosface`, see `margins.margin_target`) and the logit scale.
    sample_rate: 0 < R <= 1. In training each rank uses max(ceil(R * its classes), min(its classes, global
        batch)) of its classes: all of its classes present in the global batch plus random others (a fixed
        count, so no host sync), drawn from (seed, step, rank). R = 1 uses every class.
    subcenters: K centres per class (sub-centre ArcFace); a class's cosine is its closest centre's.
    scale_grad_for_ddp: the embeddings' gradient is multiplied by the world size, because
        DistributedDataParallel averages the backbone's gradients over ranks while this loss is already the
        global batch's mean; the average is then this loss's exact gradient. False gives the plain gradient.
    Every rank passes the same number of embeddings (training drops the last partial batch; a mismatch is
    not detected here), labels in [0, num_classes). The margin and the sampling apply in training; in eval
    mode the loss is the plain softmax over all classes.
    """

    def __init__(self, embedding_dim: int, num_classes: int, *, kind: str = "arcface", margin: float = 0.5,
                 scale: float = 64.0, sample_rate: float = 1.0, subcenters: int = 1, seed: int = 0,
                 scale_grad_for_ddp: bool = True, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
        if subcenters < 1:
            raise ValueError(f"subcenters must be at least 1, got {subcenters}")
        if kind not in MARGIN_HEADS:
            raise ValueError(f"unknown margin head {kind!r}; use one of {', '.join(MARGIN_HEADS)}")
        self.rank, self.world_size = _world(group)
        if num_classes < self.world_size:
            raise ValueError(f"{num_classes} classes cannot be sharded over {self.world_size} ranks")
        self.num_classes, self.embedding_dim, self.subcenters = num_classes, embedding_dim, subcenters
        self.kind, self.margin, self.scale, self.sample_rate = kind, margin, scale, sample_rate
        self.seed, self.group, self.scale_grad_for_ddp = seed, group, scale_grad_for_ddp
        self.start, self.stop = class_shard(num_classes, self.rank, self.world_size)
        # Unit-scale centres, as `margin_heads.MarginHead`: they are normalized anyway, and at a tiny scale Adam's
        # steps (about lr per coordinate) would swing their directions wildly.
        self.centres = nn.Parameter(initial_centres(self.start, self.stop, subcenters, embedding_dim, seed))
        self.step = 0  # training steps taken: part of the sampling seed (a resumed run sets it)

    @property
    def local_classes(self) -> int:
        """How many classes this rank holds."""
        return self.stop - self.start

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The global batch's mean margin-softmax loss (the same value on every rank)."""
        return self.loss_and_hits(embeddings, labels)[0]

    def loss_and_hits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`'s loss, and for each row of the global batch (ranks in order) whether its true class scored
        highest among the classes that took part (margin included in training): the train top-1."""
        labels = labels.view(-1).long()
        if self.world_size > 1:
            scale = float(self.world_size) if self.scale_grad_for_ddp else 1.0
            embeddings = _GatherEmbeddings.apply(embeddings, self.rank, self.world_size, self.group, scale)
            labels = _gather_labels(labels, self.world_size, self.group)
        held = (labels >= self.start) & (labels < self.stop)
        target = torch.where(held, labels - self.start, -1)
        centres = self.centres
        if self.training and self.sample_rate < 1.0:
            chosen = self._sample(target, held, labels.shape[0])
            target = torch.where(held, torch.searchsorted(chosen, target), -1)
            centres = centres.unflatten(0, (self.local_classes, self.subcenters))[chosen].flatten(0, 1)
        if self.training:
            self.step += 1
        with torch.autocast(embeddings.device.type, enabled=False):  # an angle margin needs float32
            cosines = centre_cosines(embeddings.float(), centres.float())
        cosines = subcenter_cosines(cosines, self.subcenters)
        logits = self._margin_logits(cosines, target, held) if self.training else self.scale * cosines
        return _ShardedCrossEntropy.apply(logits, target, self.world_size, self.group)

    def _sample(self, target: torch.Tensor, held: torch.Tensor, batch: int) -> torch.Tensor:
        """Sorted local class indices: every class in `target`, then the highest of random scores."""
        count = max(math.ceil(self.sample_rate * self.local_classes), min(self.local_classes, batch))
        device = self.centres.device
        generator = torch.Generator(device=device).manual_seed(_mix(self.seed, self.step, self.rank))
        # One spare slot takes the rows whose class another rank holds: a fixed shape, so no host sync.
        scores = torch.rand(self.local_classes + 1, generator=generator, device=device)
        scores.index_fill_(0, torch.where(held, target, self.local_classes), 2.0)
        return scores[:-1].topk(count, sorted=False).indices.sort().values

    def _margin_logits(self, cosines: torch.Tensor, target: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
        """scale * cosines with the margin on the true class of the rows whose class this rank holds."""
        column = target.clamp_min(0).view(-1, 1)
        true = cosines.gather(1, column)
        shifted = torch.where(held.view(-1, 1), margin_target(true, self.kind, self.margin), true)
        return self.scale * cosines.scatter(1, column, shifted)

    def full_centres(self) -> torch.Tensor | None:
        """All C * K centres in class order on rank 0's CPU (None elsewhere); a collective: every rank calls it."""
        return gather_rows(self.centres, self.num_classes, self.group)

    def all_centres(self) -> torch.Tensor:
        """All C * K centres in class order on every rank, on their device; a collective: every rank calls it."""
        return all_rows(self.centres, self.num_classes, self.group)

    @torch.no_grad()
    def load_full_centres(self, full: torch.Tensor) -> None:
        """Take this rank's centres from the full C * K matrix (from a checkpoint of any world size)."""
        if full.shape != (self.num_classes * self.subcenters, self.embedding_dim):
            raise ValueError(f"centre matrix {tuple(full.shape)} does not fit {self.num_classes} classes x "
                             f"{self.subcenters} sub-centres x {self.embedding_dim} dimensions")
        self.centres.copy_(shard_rows(full, self.num_classes, self.rank, self.world_size))

    def extra_repr(self) -> str:
        return (f"{self.kind}, classes {self.start}-{self.stop - 1} of {self.num_classes} (rank {self.rank} of "
                f"{self.world_size}), subcenters={self.subcenters}, sample_rate={self.sample_rate}, "
                f"margin={self.margin}, scale={self.scale}")
