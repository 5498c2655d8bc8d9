"""The DALI graph of the `dali` backend and the feed behind its external source (see `dali_backend` for how a
batch is made): `define_graph` builds one graph for the GPU and the CPU, differing only in where the decoder
runs; `Feed` hands it each batch's bytes, labels and per-sample geometry; `build_pipeline` builds it.

Imports `nvidia.dali` only inside functions, as `dali_backend` does: machines without DALI never load it.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from .geometry import (
    eval_shrinks,
    resize_shrink_factors,
    sample_augmentation,
    shrunk_matrices,
    shrunk_size,
    train_matrices,
    warp_shrink_factors,
)
from .pack_format import PackReader
from .spec import PipelineSpec

GEOMETRIES = ("fused", "separate")
DECODES = ("mixed", "cpu")
PREFETCH_QUEUE_DEPTH = 2


@dataclass(frozen=True)
class Graph:
    """What `define_graph` needs to know besides the feed: mode and placement."""

    spec: PipelineSpec
    train: bool
    gpu: bool
    decode: str
    geometry: str

    @property
    def shrinks(self) -> bool:
        """Whether the graph pre-shrinks: before the fused warp, or before the eval resize."""
        if not self.train:
            return eval_shrinks(self.spec)
        return self.geometry == "fused" and self.spec.train_antialias

    @property
    def fields(self) -> tuple[str, ...]:
        """Per-sample inputs the feed supplies, in external_source output order."""
        shrink = _SHRINK_FIELDS if self.shrinks else ()
        if not self.train:
            return ("data", "label", *shrink)
        if self.geometry == "fused":
            return ("data", "label", "matrix", *shrink)
        return ("data", "label", "flip", "angle")


class Feed:
    """The iterator behind `fn.external_source`: one batch of per-sample inputs per `next()`.

    DALI calls `iter()` once when the pipeline is built, so this object is its own
    iterator and the loader refills it for each epoch with `start()`. Batches handed to
    DALI stay in `in_flight` until the loader has received their output: that keeps
    the zero-copy byte views alive (`no_copy=True`) and tells which samples a decode
    error can come from.
    """

    def __init__(self, reader: PackReader, graph: Graph, seed: int) -> None:
        self._reader = reader
        self._graph = graph
        self._seed = seed
        self._epoch = 0
        self._pending: collections.deque[np.ndarray] = collections.deque()
        self.in_flight: collections.deque[tuple[np.ndarray, tuple[list[np.ndarray], ...]]] = collections.deque()

    def start(self, epoch: int, batches: Iterator[np.ndarray]) -> None:
        """Queue the pack-index batches of one epoch (or what is left of it, after a failure)."""
        self._epoch = epoch
        self._pending = collections.deque(batches)
        self.in_flight.clear()

    def unfinished(self) -> list[np.ndarray]:
        """Batches not yet returned by DALI, in order: those in flight, then those not fed yet."""
        return [indices for indices, _ in self.in_flight] + list(self._pending)

    def stop(self) -> None:
        """Feed nothing more: DALI will end the epoch after what it already holds."""
        self._pending.clear()

    def done(self) -> np.ndarray:
        """Forget the oldest batch in flight (its output has arrived); returns its indices."""
        return self.in_flight.popleft()[0]

    def __iter__(self) -> "Feed":
        return self

    def __next__(self) -> tuple[list[np.ndarray], ...]:
        if not self._pending:
            raise StopIteration
        indices = self._pending.popleft()
        columns = self._columns(indices)
        self.in_flight.append((indices, columns))
        return columns

    def _columns(self, indices: np.ndarray) -> tuple[list[np.ndarray], ...]:
        reader, spec = self._reader, self._graph.spec
        values: dict[str, list[np.ndarray]] = {
            "data": [reader.image_bytes(int(i)) for i in indices],
            "label": [np.array(reader.labels[i], dtype=np.int64) for i in indices],
        }
        heights, widths = reader.heights[indices], reader.widths[indices]
        if not self._graph.train:
            if self._graph.shrinks:
                values.update(_shrink_columns(heights, widths, *resize_shrink_factors(heights, widths,
                                                                                     spec.image_size)))
        elif self._graph.geometry == "fused":
            matrices = train_matrices(spec, self._seed, self._epoch, indices, heights, widths)
            if self._graph.shrinks:
                fy, fx = warp_shrink_factors(matrices)
                matrices = shrunk_matrices(matrices, fy, fx)
                values.update(_shrink_columns(heights, widths, fy, fx))
            values["matrix"] = list(matrices.astype(np.float32))
        else:
            flips, angles = sample_augmentation(spec, self._seed, self._epoch, indices)
            values["flip"] = [np.array(int(f), dtype=np.int32) for f in flips]
            values["angle"] = [np.array(a, dtype=np.float32) for a in angles]
        return tuple(values[name] for name in self._graph.fields)


_SHRINK_FIELDS = ("pad_shape", "blocks")


def _shrink_columns(heights: np.ndarray, widths: np.ndarray, fy: np.ndarray,
                    fx: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Per-sample inputs of the graph's pre-shrink (see module): the padded size and the block shape.

    Vectorized over the batch: this runs on the training thread, once per batch.
    """
    fy, fx = np.broadcast_to(fy, np.shape(heights)), np.broadcast_to(fx, np.shape(widths))
    rows, cols = shrunk_size(np.asarray(heights), np.asarray(widths), fy, fx)
    channels = np.full_like(rows, -1)  # reshape infers it: 3 for the image, 1 for its pixel count
    return {"pad_shape": list(np.stack([rows * fy, cols * fx], 1).astype(np.int32)),
            "blocks": list(np.stack([rows, fy, cols, fx, channels], 1).astype(np.int32))}


def _interp(name: str) -> Any:
    from nvidia.dali import types

    return {"linear": types.INTERP_LINEAR, "cubic": types.INTERP_CUBIC, "nearest": types.INTERP_NN}[name]


def _external_inputs(feed: Feed, graph: Graph) -> dict[str, Any]:
    """One external_source node per field, all fed by `feed` in one call."""
    from nvidia.dali import fn, types

    kinds = {"data": (types.UINT8, 1), "label": (types.INT64, 0), "matrix": (types.FLOAT, 2),
             "flip": (types.INT32, 0), "angle": (types.FLOAT, 0), "pad_shape": (types.INT32, 1),
             "blocks": (types.INT32, 1)}
    dtypes = [kinds[name][0] for name in graph.fields]
    ndims = [kinds[name][1] for name in graph.fields]
    # no_copy: DALI reads the memory-map views in place; `Feed.in_flight` keeps them
    # alive until their batch has come out (longer than the prefetch depth DALI needs).
    nodes = fn.external_source(source=feed, num_outputs=len(graph.fields), batch=True, dtype=dtypes, ndim=ndims,
                               no_copy=True)
    return dict(zip(graph.fields, nodes))


def define_graph(feed: Feed, graph: Graph) -> tuple[Any, Any]:
    """Decode + geometry for train or eval, on the GPU or the CPU: returns (images, labels) nodes.

    The two variants differ only in where the decoder runs; every later operator runs
    where its input lives.
    """
    from nvidia.dali import fn, types

    inputs = _external_inputs(feed, graph)
    spec, size = graph.spec, graph.spec.image_size
    decoder_device = "mixed" if graph.gpu and graph.decode == "mixed" else "cpu"
    images = fn.decoders.image(inputs["data"], device=decoder_device, output_type=types.RGB)
    if graph.gpu and decoder_device == "cpu":
        images = images.gpu()  # decode on the host, augment on the device
    interp = _interp(spec.interpolation)
    if not graph.train:
        if graph.shrinks:
            images = _preshrink(images, inputs)
        images = _resize(images, size, interp, spec.eval_antialias)
        if graph.shrinks:
            images = fn.cast(images, dtype=types.UINT8)  # resize keeps the pre-shrink's float
    elif graph.geometry == "fused":
        if graph.shrinks:
            images = _preshrink(images, inputs)
        images = fn.warp_affine(images, matrix=inputs["matrix"], size=(size, size), inverse_map=False,
                                fill_value=float(spec.fill), interp_type=interp, dtype=types.UINT8)
    else:
        images = _resize(images, size, interp, spec.train_antialias)
        images = fn.flip(images, horizontal=inputs["flip"])
        images = fn.rotate(images, angle=inputs["angle"], keep_size=True, fill_value=float(spec.fill),
                           interp_type=interp)
    labels = inputs["label"].gpu() if graph.gpu else inputs["label"]
    return images, labels


def _preshrink(images: Any, inputs: dict[str, Any]) -> Any:
    """`geometry`'s integer pre-shrink in the graph: block means as float HWC (see module).

    Each block's sum over its pixel count, the count being the same block sum over a map
    of ones: the zero padding adds nothing to either, so partial edge blocks average the
    pixels they have.
    """
    from nvidia.dali import fn, types

    def block_sums(data: Any) -> Any:
        padded = fn.pad(data, axes=(0, 1), shape=inputs["pad_shape"], fill_value=0)
        return fn.reductions.sum(fn.reshape(padded, shape=inputs["blocks"]), axes=[1, 3], dtype=types.FLOAT)

    ones = images[:, :, 0:1] * 0 + 1  # one per source pixel
    return fn.reshape(block_sums(images) / block_sums(ones), layout="HWC")


def _resize(images: Any, size: int, interp: Any, antialias: bool) -> Any:
    from nvidia.dali import fn, types

    # Nearest-neighbour has no antialiasing in DALI; asking for it is an error there.
    antialias = antialias and interp != types.INTERP_NN
    return fn.resize(images, resize_x=size, resize_y=size, interp_type=interp, antialias=antialias)


def build_pipeline(feed: Feed, graph: Graph, *, batch_size: int, num_threads: int, device: torch.device,
                   seed: int) -> Any:
    """A built DALI pipeline running `define_graph` on `device` (CUDA) or on CPU operators."""
    from nvidia.dali import Pipeline

    device_id = (device.index or 0) if graph.gpu else None
    # exec_dynamic: outputs bound to a CUDA stream (`run(stream)`) need it.
    pipe = Pipeline(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id, seed=seed,
                    prefetch_queue_depth=PREFETCH_QUEUE_DEPTH, exec_dynamic=True)
    with pipe:
        pipe.set_outputs(*define_graph(feed, graph))
    pipe.build()
    return pipe
