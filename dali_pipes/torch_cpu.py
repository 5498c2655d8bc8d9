"""The torch backend's CPU path: OpenCV decode and geometry into uint8 batches, in DataLoader workers.

Each JPEG is decoded with OpenCV (libjpeg-turbo; torchvision when OpenCV refuses one)
and its geometry done on uint8 into one N x S x S x 3 batch, in shared memory when made
in a worker. Train: one `cv2.warpAffine` per image with its `geometry` matrix (resize,
flip and rotation together), after `geometry`'s integer pre-shrink; eval:
`inputs.resize_cpu`, torchvision's antialiased resize (PIL's BILINEAR filter) after the
same pre-shrink as the GPU path's, the function `dali_pipes.preprocess` applies to
single files. The host ships uint8; `loader.to_model_input` normalizes wherever the batch lands.
"""
from __future__ import annotations

import math
import re
from typing import Callable

import cv2
import numpy as np
import torch
from torch.utils.data import get_worker_info

from .geometry import on_resized_source, preshrink_numpy, shrunk_matrices, to_opencv, warp_shrink_factors
from .inputs import resize_cpu
from .loader import ImageDecodeError, SkippedSample
from .pack_format import PackReader
from .spec import PipelineSpec

_CV2_INTERPOLATION = {"linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}
# OpenCV >= 4.10 can hand out RGB directly; older builds decode BGR and we convert.
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
# decode(reader, index, channels) -> H x W x channels uint8: how `render_batch_cpu` gets each image.
Decoder = Callable[[PackReader, int, int], np.ndarray]


def torchvision_reason(exc: Exception) -> str:
    """The first line of a torchvision decode error, without its "decode_jpeg, /source/file.cpp:171, " prefix."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return re.sub(r"^\w+, \S+:\d+, ", "", text) or text


def decode_image(reader: PackReader, index: int, channels: int) -> np.ndarray:
    """Image `index` of `reader` as H x W x `channels` uint8 (RGB, or RGBA with opaque alpha).

    OpenCV decodes; when it refuses, torchvision tries too (and gives the reason), so a
    decoder quirk does not lose an image and a truly corrupt one fails with its name.
    """
    data = reader.image_bytes(index)
    if channels == 3 and _IMREAD_RGB is not None:
        image = cv2.imdecode(data, _IMREAD_RGB)
    else:
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
        # The colour conversion is needed anyway (RGBA warps twice as fast), so BGR costs nothing.
        image = None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB if channels == 3 else cv2.COLOR_BGR2RGBA)
    if image is None:
        image = _decode_torchvision(reader, index, channels)
    if image.shape[:2] != (reader.heights[index], reader.widths[index]):
        raise ImageDecodeError.of(reader, index, f"decoded {image.shape[1]}x{image.shape[0]}, pack records "
                                                 f"{reader.widths[index]}x{reader.heights[index]}")
    return image


def _decode_torchvision(reader: PackReader, index: int, channels: int) -> np.ndarray:
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        chw = decode_jpeg(torch.from_numpy(np.array(reader.image_bytes(index))), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError, ImportError) as exc:
        raise ImageDecodeError.of(reader, index, torchvision_reason(exc)) from None
    rgb = np.ascontiguousarray(chw.permute(1, 2, 0).numpy())
    return rgb if channels == 3 else cv2.cvtColor(rgb, cv2.COLOR_RGB2RGBA)


def warp_cpu(image: np.ndarray, spec: PipelineSpec, matrix: np.ndarray, out: np.ndarray) -> None:
    """Train geometry of one decoded image into `out` (S x S x channels): one warp with its 2 x 3 `matrix`,
    after the integer pre-shrink (`geometry`) when the spec antialiases training."""
    size = spec.image_size
    if spec.train_antialias:
        fy, fx = warp_shrink_factors(matrix)
        image, matrix = preshrink_numpy(image, fy, fx), shrunk_matrices(matrix, fy, fx)
    border = (spec.fill, spec.fill, spec.fill, 255)
    cv2.warpAffine(image, to_opencv(matrix), (size, size), dst=out, flags=_CV2_INTERPOLATION[spec.interpolation],
                   borderMode=cv2.BORDER_CONSTANT, borderValue=border)


def _on_image(matrix: np.ndarray, reader: PackReader, index: int, image: np.ndarray) -> np.ndarray:
    """`matrix`, made for image `index` at its stored size, for `image` as decoded (perhaps smaller)."""
    stored = (int(reader.heights[index]), int(reader.widths[index]))
    if image.shape[:2] == stored:
        return matrix
    return on_resized_source(matrix, *stored, *image.shape[:2])


def _batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    if get_worker_info() is not None and hasattr(torch.UntypedStorage, "_new_shared"):
        # As default_collate does: allocate in shared memory, so handing the batch to the
        # main process moves a file descriptor instead of copying the pixels.
        storage = torch.UntypedStorage._new_shared(math.prod(shape))
        return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    return torch.empty(shape, dtype=torch.uint8)


def render_batch_cpu(reader: PackReader, indices: np.ndarray, spec: PipelineSpec, matrices: np.ndarray | None,
                     decode: Decoder | None = None) -> tuple[torch.Tensor, list[SkippedSample]]:
    """Decode and transform pack images `indices` into one N x S x S x 3 uint8 tensor, and the samples left out.

    `matrices` (N x 2 x 3, `geometry.train_matrices`, for the stored image sizes) warps
    each image for training; None resizes for evaluation. `decode` (default
    `decode_image`) may hand an image over at another size than the stored one (the
    decoded cache's `DecodedCache.decode`): its matrix is then moved onto that size. An
    image that cannot be decoded loses its row (the good rows keep their order, so the
    tensor then has fewer than len(indices) rows) and is listed as a `SkippedSample`.
    Workers hand these back as values: raising there would fail the whole batch, reach
    the user wrapped in DataLoader's "Caught ... in worker" text, and leave persistent
    workers' shutdown to the GC (a 5 s join).
    """
    decode = decode_image if decode is None else decode
    size = spec.image_size
    batch = _batch_buffer((len(indices), size, size, 3))
    pixels = batch.numpy()
    # OpenCV's 4-channel warp is vectorized and ~2.5x faster than its 3-channel one.
    rgba = np.empty((size, size, 4), dtype=np.uint8)
    skipped: list[SkippedSample] = []
    row = 0
    for j, index in enumerate(indices):
        try:
            image = decode(reader, int(index), 3 if matrices is None else 4)
        except ImageDecodeError as exc:
            skipped.append(exc.sample)
            continue
        if matrices is None:
            resize_cpu(image, spec, batch[row])
        else:
            warp_cpu(image, spec, _on_image(matrices[j], reader, int(index), image), rgba)
            cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB, dst=pixels[row])
        row += 1
    return (batch if row == len(indices) else batch[:row]), skipped
