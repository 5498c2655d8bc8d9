"""A CPU stand-in for `torch.cuda.set_sync_debug_mode`: the calls that would make the host wait for a GPU.

On a GPU these wait for the device: reading a tensor's values on the host (`.item()`,
`.tolist()`, `.cpu()`, `.numpy()`, `bool()`, `int()`, `float()`, using it as an index),
`nonzero` and boolean-mask indexing (the result's size depends on the data), indexing
with a Python list (copied to the device synchronously), and nested tensors (their sizes
go to the device by a synchronizing copy when padded). On the CPU nothing waits, so
these tools record or refuse the calls themselves:

* `host_syncs_forbidden()`: any such call raises AssertionError naming it.
* `counting_host_syncs(host=...)`: records every such call (`HostSyncs.calls`, with the
  line that made it) while `armed`, so a test can audit exactly the stretch between two
  log boundaries and see all offenders at once.

Tensors that live on the host in the CUDA path too (what DataLoader workers hand over,
anything made by `torch.from_numpy`) are not device tensors: reading them costs no
sync, so `counting_host_syncs` leaves them alone; they are told apart by their storage.
"""
from __future__ import annotations

import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

_READS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__float__", "__int__", "__index__")
_INDEXING = ("__getitem__", "__setitem__")
_NESTED = ("nested_tensor", "as_nested_tensor", "to_padded_tensor")


@dataclass
class HostSyncs:
    """The host-synchronizing calls seen while `armed`: one line each, naming the call and where it was made."""

    armed: bool = True
    calls: list[str] = field(default_factory=list)
    _host: set[int] = field(default_factory=set)

    def mark_host(self, tensor: torch.Tensor) -> None:
        """`tensor` (and every view of its storage) lives on the host in the CUDA path too."""
        pointer = _storage(tensor)
        if pointer is not None:
            self._host.add(pointer)

    def is_host(self, tensor: Any) -> bool:
        """Whether `tensor` was marked as a host tensor."""
        return isinstance(tensor, torch.Tensor) and _storage(tensor) in self._host

    def record(self, name: str) -> None:
        """Note a synchronizing call `name`, with the first caller outside torch and this file."""
        if self.armed:
            self.calls.append(f"{name} at {_caller()}")


def _storage(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # nested, sparse or meta tensors have no plain storage
        return None


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "/torch/" not in frame.filename and not frame.filename.endswith("sync_audit.py"):
            return f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}"
    return "?"


def _list_index(index: Any) -> str | None:
    """Why indexing with `index` syncs on a device tensor, or None."""
    parts = index if isinstance(index, tuple) else (index,)
    for part in parts:
        if isinstance(part, list):
            return "indexing with a Python list"
        if isinstance(part, torch.Tensor) and part.dtype == torch.bool:
            return "boolean-mask indexing"
    return None


@contextmanager
def _patched(audit: HostSyncs, on_call: Callable[[str], None]) -> Iterator[None]:
    own = {name: vars(torch.Tensor)[name] for name in (*_READS, *_INDEXING) if name in vars(torch.Tensor)}
    base = {name: getattr(torch.Tensor, name) for name in (*_READS, *_INDEXING)}
    nested = {name: getattr(torch.nested, name) for name in _NESTED}
    tensor_padding = getattr(torch.Tensor, "to_padded_tensor")
    from_numpy = torch.from_numpy

    def read(name: str) -> Callable[..., Any]:
        def call(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not audit.is_host(self):
                on_call(f"Tensor.{name}")
            value = base[name](self, *args, **kwargs)
            if isinstance(value, torch.Tensor) and name == "cpu":
                audit.mark_host(value)  # what `.cpu()` returns lives on the host
            return value
        return call

    def indexing(name: str) -> Callable[..., Any]:
        def call(self: torch.Tensor, index: Any, *args: Any) -> Any:
            why = None if audit.is_host(self) else _list_index(index)
            if why:
                on_call(why)
            return base[name](self, index, *args)
        return call

    def nested_call(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            on_call(f"nested tensor ({name})")
            return original(*args, **kwargs)
        return call

    def host_from_numpy(array: Any) -> torch.Tensor:
        tensor = from_numpy(array)
        audit.mark_host(tensor)
        return tensor

    try:
        for name in _READS:
            setattr(torch.Tensor, name, read(name))
        for name in _INDEXING:
            setattr(torch.Tensor, name, indexing(name))
        for name, original in nested.items():
            setattr(torch.nested, name, nested_call(name, original))
        torch.Tensor.to_padded_tensor = nested_call("Tensor.to_padded_tensor", tensor_padding)
        torch.from_numpy = host_from_numpy
        yield
    finally:
        torch.from_numpy = from_numpy
        torch.Tensor.to_padded_tensor = tensor_padding
        for name, original in nested.items():
            setattr(torch.nested, name, original)
        for name in (*_READS, *_INDEXING):
            if name in own:
                setattr(torch.Tensor, name, own[name])
            else:
                delattr(torch.Tensor, name)  # inherited from the C base class again


@contextmanager
def counting_host_syncs(host: Iterable[torch.Tensor] = ()) -> Iterator[HostSyncs]:
    """Inside the block, every host-synchronizing call on a device tensor is recorded while the audit is armed.

    `host`: tensors that are host tensors in the CUDA path too (reading them is free).
    """
    audit = HostSyncs()
    for tensor in host:
        audit.mark_host(tensor)
    with _patched(audit, audit.record):
        yield audit


@contextmanager
def host_syncs_forbidden() -> Iterator[None]:
    """Inside the block, any host-synchronizing call on a tensor raises AssertionError naming it."""
    def refuse(name: str) -> None:
        raise AssertionError(f"host sync: {name}")

    with _patched(HostSyncs(), refuse):
        yield
