"""Streams and transfers for the CUDA path, written so that the same calls run on CPU tensors.

On the CPU every helper here is a plain operation or a no-op (there are no streams), so
the code that uses them is exercised by CI without a GPU; only the few lines guarded by
`device.type == "cuda"` never run there.
"""
from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import Any, ContextManager, Iterable

import torch


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the host) on `device` without blocking the host.

    A copy from pageable memory may make the driver wait for the stream (and so for the
    step queued before it); from pinned memory it is a plain asynchronous DMA. Pinning
    a small per-batch tensor (labels, warp matrices) is a host memcpy, far cheaper.
    """
    if device.type != "cuda":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def side_stream(device: torch.device) -> Any:
    """A new CUDA stream on `device` to prepare batches on; None on the CPU."""
    return torch.cuda.Stream(device=device) if device.type == "cuda" else None


def on_stream(stream: Any) -> ContextManager[Any]:
    """Makes `stream` current inside the block (nothing on the CPU, where `stream` is None)."""
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


def ready_marker(stream: Any) -> Any:
    """An event recorded on `stream` now: the work queued so far there (None on the CPU)."""
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def hand_over(tensors: Iterable[torch.Tensor], marker: Any) -> None:
    """Let the current stream use `tensors`, made on another stream up to `marker`.

    The current stream waits for the marker (on the GPU, not the host), and each tensor
    is `record_stream`-ed on it: the caching allocator then hands the tensor's block out
    again only after the work now queued on this stream has finished, not as soon as
    Python drops the tensor on the producing stream.
    """
    if marker is None:
        return
    consumer = torch.cuda.current_stream()
    consumer.wait_event(marker)
    for tensor in tensors:
        if tensor.is_cuda:
            tensor.record_stream(consumer)


@functools.lru_cache(maxsize=None)
def decode_stream(device: torch.device) -> Any:
    """The one CUDA stream of `device` that JPEG decoding allocates its outputs on (see `torch_gpu._decode_jpegs`)."""
    return torch.cuda.Stream(device=device)
