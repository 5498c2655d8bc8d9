"""Checkpoints of a model whose margin head is sharded over the ranks (Partial FC, `partial_fc.sharded`).

A checkpoint holds every sharded parameter whole, in class order, under the key and with the shape
the unsharded head has (`head.centres`: classes x sub-centres rows), and so do the optimizer's
per-parameter states of it (SGD's momentum, Adam's moments): any world size, and the unsharded
head, loads it. `gather_state` makes that form for saving (rank 0 receives it), `shard_state` cuts
this rank's rows out of it for loading, and `load_everywhere` loads rank 0's copy on every rank.
For a model without a sharded head each is the plain state as it is.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from trainer.partial_fc import PartialFC, gather_rows, scatter_rows, shard_rows, sharded

StateDict = dict[str, Any]


def _optimizer_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """Parameter id -> its key in `optimizer.state_dict()["state"]` (parameters counted through the groups)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {id(p): i for i, p in enumerate(params)}


def _row_state(value: Any, rows: int) -> bool:
    """Whether an optimizer state entry is per row of a parameter of `rows` rows (a momentum), not a step count."""
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows


def _map_optimizer(optimizer_state: Mapping[str, Any], index: int, rows: int,
                   change: Callable[[torch.Tensor], torch.Tensor | None]) -> dict[str, Any]:
    """`optimizer_state` with `change` applied to the row states of parameter `index` (in key order: on every rank
    alike, since `change` may be a collective); the optimizer's own dicts are never modified."""
    states = dict(optimizer_state["state"])
    if index in states:
        states[index] = {key: change(value) if _row_state(value, rows) else value
                         for key, value in sorted(states[index].items())}
    return {**optimizer_state, "state": states}


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: Mapping[str, Any],
                 optimizer_state: Mapping[str, Any]) -> tuple[StateDict, StateDict]:
    """The checkpoint form of `model.state_dict()` and `optimizer.state_dict()` (given): sharded parameters and
    their optimizer states whole, on rank 0's CPU (None on the other ranks). Every rank calls it."""
    heads = sharded(model)
    model_state, optimizer_state = dict(model_state), dict(optimizer_state)
    index = _optimizer_index(optimizer)
    for name, head in heads.items():
        model_state[name] = head.full_centres()
        if id(head.centres) in index:
            optimizer_state = _map_optimizer(optimizer_state, index[id(head.centres)], head.centres.shape[0],
                                             lambda rows, head=head: gather_rows(rows, head.num_classes, head.group))
    return model_state, optimizer_state


def shard_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: Mapping[str, Any],
                optimizer_state: Mapping[str, Any] | None = None) -> tuple[StateDict, StateDict | None]:
    """A checkpoint's model and optimizer states cut to this rank's rows of each sharded parameter, for
    `load_state_dict`; a checkpoint from any world size, or from the unsharded head."""
    model_state = dict(model_state)
    optimizer_state = dict(optimizer_state) if optimizer_state is not None else None
    index = _optimizer_index(optimizer) if optimizer is not None else {}
    for name, head in sharded(model).items():
        full = model_state[name]
        model_state[name] = _rows_of(head, full)
        if optimizer_state is not None and id(head.centres) in index:
            optimizer_state = _map_optimizer(optimizer_state, index[id(head.centres)], full.shape[0],
                                             lambda rows, head=head: _rows_of(head, rows))
    return model_state, optimizer_state


def _rows_of(head: PartialFC, full: torch.Tensor) -> torch.Tensor:
    """`head`'s rank's rows of the whole per-class matrix `full`."""
    return shard_rows(full, head.num_classes, head.rank, head.world_size)


def load_everywhere(model: nn.Module, state: Mapping[str, Any] | None) -> None:
    """Load rank 0's `state` (a checkpoint's model, None on the other ranks) into `model` on every rank.

    Sharded parameters get each rank's rows (scattered), every other tensor is broadcast: the other
    ranks need not see rank 0's files. Every rank calls it; one process just loads.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        assert state is not None
        model.load_state_dict(shard_state(model, None, state)[0])
        return
    heads = sharded(model)
    main = dist.get_rank() == 0
    local = {}
    for name, own in model.state_dict().items():
        if name in heads:
            local[name] = scatter_rows(state[name] if main else None, heads[name].num_classes, own, heads[name].group)
            continue
        # One layout on every rank (the model's may be channels_last): a broadcast sends the bytes as they lie.
        tensor = (state[name].to(own.device, own.dtype).contiguous() if main
                  else torch.empty_like(own, memory_format=torch.contiguous_format))
        dist.broadcast(tensor, src=0)
        local[name] = tensor
    model.load_state_dict(local)
