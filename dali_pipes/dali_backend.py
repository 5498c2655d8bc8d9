"""The `dali` backend: NVIDIA DALI decodes and augments, torch normalizes on the device.

With `dali_graph` (the graph and its feed), the only module of the project that imports
`nvidia.dali`; `backends.py` imports it only when the dali backend is chosen, so machines
without DALI never see it.

How a batch is made:

* The epoch's order and shard come from `loader.plan_epoch`, each sample's geometry
  from `geometry`, so augmentation depends on (seed, epoch, index) only,
  never on DALI's threads, and a resumed run (`set_epoch(e, start_batch)`) sees the
  same images as an uninterrupted one.
* A small Python iterator (`dali_graph.Feed`) hands DALI one batch at a time through
  `fn.external_source(batch=True)`: the encoded bytes as zero-copy views of the pack's
  memory map (`no_copy=True`; the loader keeps them referenced until DALI has returned
  that batch), the labels, and the per-sample geometry. Batches may be shorter than the
  pipeline's `batch_size` (the last eval batch): external_source accepts any batch up
  to that maximum, so nothing is padded.
* `dali_graph.define_graph` builds one graph for both devices. On CUDA the decode runs on the GPU
  (`decoders.image(device="mixed")`: nvJPEG / the hardware decoder) and every later
  operator follows its input onto the GPU; without CUDA the same graph runs on CPU
  operators (`device_id=None`), which is how CI tests it.
* Train geometry is one `fn.warp_affine` per sample with its 2x3 matrix from
  `geometry.train_matrices` (crop, resize, flip and rotation in one bilinear pass). DALI's
  convention, checked against `cv2.warpAffine` in tests/test_dali_backend.py: with
  `inverse_map=False` the matrix maps source to output, coordinates continuous with
  pixel centres at +0.5 (cv2 puts them at integers), which is `geometry`'s own
  convention. With `train_antialias` (the default) `geometry`'s integer pre-shrink
  comes first, in the graph: each image zero-padded to a multiple of its factors
  (`fn.pad`), viewed as H/fy x fy x W/fx x fx x C (`fn.reshape`), summed over the block
  axes (`fn.reductions.sum`) and divided by each block's pixel count (the same sums
  over a map of ones: edge blocks may be partial), then warped with the matrix
  re-expressed on the shrunk image. The feed supplies those shapes: the pack records
  every image's size. `geometry="separate"` (resize, flip, rotate) is
  kept for benchmarking.
* Eval geometry is `fn.resize` to exactly S x S, linear with antialiasing, which
  matches PIL's `resize(..., BILINEAR)` (the torch backend's reference) to within a
  couple of levels out of 255; a photo over 4x the size is first pre-shrunk by the
  same graph steps with `geometry`'s eval factors, as the torch backend does.
* DALI returns uint8 HWC; `feed_ndarray` copies it into a torch tensor on the target
  device, and `loader.to_model_input` normalizes and casts it there, with the batch's
  colour jitter and random erasing (`augment.batch_augmentation`, drawn for the
  batch's pack indices as DALI hands it back). On CUDA the outputs are bound to torch's
  current stream (`pipe.run(stream)`), which needs DALI's dynamic executor
  (`exec_dynamic=True`; the default only from DALI 1.51, so asked for).
* A new image size (`set_epoch(..., image_size=)`, progressive resizing) is a new graph:
  the pipeline is rebuilt for it at the next iteration.

Epoch end: the feed raises StopIteration when the plan is exhausted; DALI first hands
out the batches it had already prefetched (`prefetch_queue_depth`), then raises
StopIteration from `run()`, and the loader calls `reset()` so the next epoch starts
clean. A loop abandoned mid-epoch (`break`) stops the feed and drains what DALI still
holds (at most the prefetch depth), so the next `__iter__` starts at its own plan.

An undecodable image: DALI fails the whole `run()` and declares the pipeline invalid,
without saying which sample. The loader checks the samples of the batches in flight
on the host (PIL), records the culprits as skipped, rebuilds the pipeline and feeds
it the in-flight batches without them, then the rest of the epoch: the other samples
come out in the same order with the same geometry (it depends on the sample, not on
the batch). All of this lives in one generator, `DaliLoader._outputs`. Samples known
bad are left out of later epochs before they reach DALI. When no culprit is found, the
error is raised with the pack indices of the batches in flight.
"""
from __future__ import annotations

import dataclasses
import io
import re
from typing import Any, Iterator

import numpy as np
import torch

from .augment import batch_augmentation
from .dali_graph import DECODES, GEOMETRIES, Feed, Graph, build_pipeline
from .loader import BatchLoader, LoaderError, LoaderRequest, SkippedSample, to_model_input
from .pack_format import PackReader


class DaliLoader(BatchLoader):
    """The `BatchLoader` of the dali backend (see the module docstring)."""

    backend = "dali"

    def __init__(self, reader: PackReader, request: LoaderRequest, *, decode: str = "mixed",
                 geometry: str = "fused") -> None:
        if geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
        if decode not in DECODES:
            raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
        spec = request.spec
        if request.train and spec.interpolation == "cubic":
            # DALI's warp kernels (warp_affine, rotate) do nearest and linear only.
            raise LoaderError("the dali backend trains with linear or nearest interpolation, not cubic; "
                              "use --backend torch or change the spec's interpolation")
        super().__init__(reader, request)
        if request.train and geometry == "separate" and spec.crop_scale is not None:
            raise LoaderError("the dali backend's separate geometry (resize, flip, rotate) has no random-resized crop; "
                              "use the fused warp")
        self._reader = reader
        self._device = request.device
        self._dtype = request.dtype
        self._graph = Graph(spec, request.train, request.device.type == "cuda", decode, geometry)
        # `num_workers` becomes DALI's thread count.
        self._pipe_args = dict(batch_size=request.batch_size, num_threads=max(1, request.num_workers),
                               device=request.device, seed=request.seed)
        self._feed = Feed(reader, self._graph, request.seed)
        self._pipe: Any = None  # built on first use: no DALI work until iteration
        self._mid_epoch = False  # DALI may still hold batches of an unfinished epoch

    def _spec_changed(self) -> None:
        """A new image size: drop the pipeline (and what it still holds); the next iteration builds one for it."""
        if self._mid_epoch:
            self._drain()
        self._graph = dataclasses.replace(self._graph, spec=self.spec)
        self._feed = Feed(self._reader, self._graph, self.request.seed)
        self._pipe = None

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._cursor.start_batch >= len(self):
            return
        try:
            for outputs, indices in self._outputs():
                yield self._to_torch(outputs, indices)
        finally:
            if self._mid_epoch:  # abandoned mid-epoch (`break`) or failed: nothing may stay in DALI
                self._drain()

    def _outputs(self) -> Iterator[tuple[Any, np.ndarray]]:
        """DALI's outputs for the rest of the epoch with their pack indices, in order, across undecodable samples.

        Each failed `run()` leaves out the in-flight samples the host cannot decode
        (`_without_culprits`), then a rebuilt pipeline is fed the rest.
        """
        pending: Iterator[np.ndarray] = self._remaining()
        while True:
            pipe = self._pipeline()
            self._feed.start(self.epoch, pending)
            self._mid_epoch = True
            try:
                yield from self._run_epoch(pipe)
                return
            except Exception as exc:
                self._pipe, self._mid_epoch = None, False  # after an operator error DALI declares the pipeline invalid
                if not isinstance(exc, RuntimeError):
                    raise
                pending = iter(self._without_culprits(exc))

    def _run_epoch(self, pipe: Any) -> Iterator[tuple[Any, np.ndarray]]:
        """Run `pipe` until the feed is exhausted and DALI has handed out what it holds; then reset it."""
        while True:
            try:
                outputs = pipe.run(self._stream())
            except StopIteration:
                break
            yield outputs, self._feed.done()
        pipe.reset()
        self._mid_epoch = False

    def _pipeline(self) -> Any:
        """The pipeline, built on first use, with nothing of an abandoned epoch left in it."""
        if self._pipe is None:
            self._pipe = build_pipeline(self._feed, self._graph, **self._pipe_args)
        elif self._mid_epoch:
            self._drain()
        return self._pipe

    def _drain(self) -> None:
        """End an unfinished epoch: feed nothing more, discard what DALI prefetched, reset."""
        self._mid_epoch = False
        if self._pipe is None:
            return
        self._feed.stop()
        try:
            while True:
                self._pipe.run()
        except StopIteration:
            self._pipe.reset()
        except Exception:
            self._pipe = None  # a failure in a discarded batch: rebuild next time

    def _to_torch(self, outputs: Any, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        images_tl, labels_tl = outputs[0].as_tensor(), outputs[1].as_tensor()
        stream = self._stream()
        images = torch.empty(images_tl.shape(), dtype=torch.uint8, device=self._device)
        labels = torch.empty(labels_tl.shape(), dtype=torch.int64, device=self._device)
        feed_ndarray(images_tl, images, cuda_stream=stream)
        feed_ndarray(labels_tl, labels, cuda_stream=stream)
        train = self._graph.train
        augmentation = batch_augmentation(self.spec, self.request.seed, self.epoch, indices) if train else None
        return to_model_input(images, self.spec, self._dtype, augmentation), labels

    def _stream(self) -> Any:
        """Torch's current stream on a CUDA device: DALI's outputs and our copies are ordered on it."""
        return torch.cuda.current_stream(self._device) if self._graph.gpu else None

    def _without_culprits(self, exc: RuntimeError) -> list[np.ndarray]:
        """After DALI failed: record the in-flight samples the host cannot decode; the unfinished batches without them.

        Each recovery leaves out at least one sample, so repeated failures end. When no
        in-flight sample is at fault, the failure is not ours to skip: it is raised.
        """
        unfinished = self._feed.unfinished()
        candidates = [int(i) for indices, _ in self._feed.in_flight for i in indices]
        self._feed.in_flight.clear()
        reason = _dali_reason(exc)
        culprits = {index: problem for index in candidates
                    if (problem := _host_decode_problem(self._reader.image_bytes(index))) is not None}
        if not culprits:
            shown = ", ".join(str(i) for i in candidates[:8]) + (" ..." if len(candidates) > 8 else "")
            raise RuntimeError(f"{self._reader.path}: DALI failed on a batch with pack images {shown}: "
                               f"{reason}") from exc
        for index, problem in culprits.items():
            self._skips.add(SkippedSample(index, self._reader.paths[index], f"{problem} (DALI: {reason})"))
        bad = np.fromiter(culprits, dtype=np.int64)
        return [kept for batch in unfinished if len(kept := batch[~np.isin(batch, bad)])]


def _dali_reason(exc: Exception) -> str:
    """One line out of DALI's multi-line report: the operator and what it encountered."""
    text = str(exc)
    operator = re.search(r"operator `([^`]+)`", text)
    body = text.split("encountered:", 1)[-1]
    noise = ("C++ context", "Current pipeline", "Critical error")
    lines = [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith(noise)]
    reason = " ".join(lines)[:200] or "unknown error"
    return f"{operator.group(1)}: {reason}" if operator else reason


def _host_decode_problem(data: np.ndarray) -> str | None:
    """Why PIL cannot fully decode `data`, or None when it can."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data.tobytes())) as image:
            image.load()
    except UnidentifiedImageError:
        return "not a recognizable image (damaged header)"
    except Exception as exc:  # PIL raises several types for bad data; any of them names the file
        return str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
    return None


def make_loader(reader: PackReader, request: LoaderRequest, *, decode: str = "mixed",
                geometry: str = "fused") -> DaliLoader:
    """Backend entry point (see `backends.BACKENDS`); `request.num_workers` becomes DALI's num_threads.

    `decode` ("mixed": nvJPEG on the GPU, "cpu": libjpeg-turbo on the host, then the GPU)
    and `geometry` ("fused" warp or "separate" resize/flip/rotate) matter on CUDA and for
    benchmarks; the loader registry never passes them.
    """
    return DaliLoader(reader, request, decode=decode, geometry=geometry)
