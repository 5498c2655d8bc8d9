"""A CPU stand-in for `torch.cuda.set_sync_debug_mode("error")`: tensor methods that read data on the host raise."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

_READS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__float__", "__int__", "__index__")


@contextmanager
def host_syncs_forbidden() -> Iterator[None]:
    """Inside the block, any of `_READS` on a tensor raises AssertionError naming it."""
    own = {name: vars(torch.Tensor)[name] for name in _READS if name in vars(torch.Tensor)}

    def refuse(name: str):
        def read(*args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name}")
        return read

    try:
        for name in _READS:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name in _READS:
            if name in own:
                setattr(torch.Tensor, name, own[name])
            else:
                delattr(torch.Tensor, name)  # inherited from the C base class again
