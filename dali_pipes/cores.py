"""How many worker processes a command starts by default: the cores this process may use, shared on the node.

Torch-free, so the packer (whose worker processes re-import it) and the loaders share one rule.
"""
from __future__ import annotations

import os


def default_workers() -> int:
    """The cores this process may use, shared among the processes on this node, at least 1.

    torchrun sets LOCAL_WORLD_SIZE (processes on this node); each of them would otherwise
    start one worker per core and the node would run nproc times too many.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_world = 1
    return max(1, cores // local_world)
