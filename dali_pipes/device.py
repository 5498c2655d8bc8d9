"""Streams and transfers for the CUDA path, written so that the same calls run on CPU tensors.

On the CPU every helper here is a plain operation or a no-op (there are no streams), so
the code that uses them is exercised by CI without a GPU; only the few lines guarded by
`device.type == "cuda"` never run there. Every helper takes the device it works for:
the current device of the calling thread is never assumed.

Streams are made once per device and kept (`device_streams`). `torch.cuda.Stream()` does
not create a stream: it hands out the next of 32 per device and priority, round robin,
so a stream taken per epoch or per loader eventually is another user's stream (NCCL's,
torchvision's decoder's, our own other one), and `record_stream` between a stream and
itself protects nothing. Each of ours also has a priority of its own: PyTorch's own
users and libraries take streams at the default priority (0) or the highest one, so
streams at -1 and -2 come from pools nobody else draws from (on a GPU with at least 4
priority levels, such as the H100 and H200; with fewer, ours share the high pool).
"""
from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Iterable

import torch

DECODE_PRIORITY = -1  # the stream JPEG decoding allocates its outputs on
PREPARE_PRIORITY = -2  # the stream batches are prepared on


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


def _new_cuda_stream(device: torch.device, priority: int) -> Any:
    return torch.cuda.Stream(device=device, priority=priority)


class DeviceStreams:
    """The side streams of one device, each made on first use and then always the same object.

    `prepare`: where batches are prepared; `decode`: what JPEG decoding allocates on. Both
    None on the CPU. `new_stream(device, priority)` makes a stream (injectable for tests).
    """

    def __init__(self, device: torch.device, new_stream: Callable[[torch.device, int], Any] | None = None) -> None:
        self.device = torch.device(device)
        self._new_stream = new_stream or _new_cuda_stream
        self._made: dict[int, Any] = {}

    def _stream(self, priority: int) -> Any:
        if self.device.type != "cuda":
            return None
        if priority not in self._made:
            self._made[priority] = self._new_stream(self.device, priority)
        return self._made[priority]

    @property
    def prepare(self) -> Any:
        """The stream batches are prepared on (None on the CPU)."""
        return self._stream(PREPARE_PRIORITY)

    @property
    def decode(self) -> Any:
        """The stream decoded images are allocated on (None on the CPU; see `torch_gpu._decode_jpegs`)."""
        return self._stream(DECODE_PRIORITY)


def device_streams(device: torch.device) -> DeviceStreams:
    """The one `DeviceStreams` of `device` in this process ("cuda" means the current CUDA device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _streams_of(device)


@functools.lru_cache(maxsize=None)
def _streams_of(device: torch.device) -> DeviceStreams:
    return DeviceStreams(device)


def on_device(device: torch.device) -> ContextManager[Any]:
    """Makes `device` the calling thread's current CUDA device inside the block (nothing off CUDA).

    The current device is per thread: a thread that prepares batches must say which it works on.
    """
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


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


def hand_over(tensors: Iterable[torch.Tensor], marker: Any, device: torch.device) -> None:
    """Let `device`'s current stream use `tensors`, made on another stream up to `marker`.

    The current stream waits for the marker (on the GPU, not the host), and each tensor
    is `record_stream`-ed on it: the caching allocator then hands the tensor's block out
    again only after the work now queued on this stream has finished, not as soon as
    Python drops the tensor on the producing stream.
    """
    if marker is None:
        return
    consumer = torch.cuda.current_stream(device)
    consumer.wait_event(marker)
    for tensor in tensors:
        if tensor.is_cuda:
            tensor.record_stream(consumer)
