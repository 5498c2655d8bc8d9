"""The torch backend's GPU path: decode on the device, then one batched warp, with torch ops only.

DataLoader workers only gather encoded bytes; the main process decodes the batch on the
GPU (torchvision's batched nvJPEG decode on a stream of its own, see `_decode_jpegs`)
and does the geometry there for the whole batch at once: the images padded into one
canvas and warped by one `affine_grid` + `grid_sample` with their `geometry` matrices
(train), or one `interpolate` per image size (eval). The same functions run on CPU
tensors, which is how CI tests them. Streams and transfers are `device`'s; the
look-ahead on a side stream is `prefetch.Prefetcher`'s.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .device import decode_stream, hand_over, host_to_device, ready_marker
from .geometry import grid_sample_thetas, on_resized_source, prefilter_size
from .loader import ImageDecodeError, SkippedSample
from .pack_format import PackReader
from .spec import PipelineSpec
from .torch_cpu import torchvision_reason

log = logging.getLogger("dali_pipes")

_TORCH_MODE = {"linear": "bilinear", "cubic": "bicubic", "nearest": "nearest"}


def transform_images(images: list[torch.Tensor], spec: PipelineSpec, matrices: np.ndarray | None) -> torch.Tensor:
    """Decoded 3 x H x W uint8 images (any device) -> N x S x S x 3 uint8 on that device.

    Train (`matrices`, N x 2 x 3 from `geometry.train_matrices`): the images are padded
    into one canvas and warped by one batched `affine_grid` + `grid_sample`; eval (None):
    one `interpolate` per distinct image size.
    """
    if matrices is None:
        pixels = _resize_torch_batch(images, spec)
    else:
        if spec.train_antialias:
            images, matrices = _prefilter(images, matrices, spec.image_size)
        pixels = _warp_torch(images, matrices, spec)
    # Rounded like the CPU path's uint8 output; NHWC memory is what `to_model_input` expects.
    return pixels.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _by_shape(images: list[torch.Tensor]) -> dict[tuple[int, ...], list[int]]:
    """Positions of the images of each distinct shape (datasets often have one or a few)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for j, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(j)
    return groups


def _resize_torch(pixels: torch.Tensor, size: tuple[int, int], interpolation: str, antialias: bool) -> torch.Tensor:
    mode = _TORCH_MODE[interpolation]
    if mode == "nearest":
        return F.interpolate(pixels, size=size, mode=mode)
    return F.interpolate(pixels, size=size, mode=mode, antialias=antialias, align_corners=False)


def _resize_torch_batch(images: list[torch.Tensor], spec: PipelineSpec) -> torch.Tensor:
    """Eval geometry: every image resized to S x S (float N x 3 x S x S), one call per image size."""
    size = spec.image_size
    out = torch.empty((len(images), 3, size, size), dtype=torch.float32, device=images[0].device)
    for shape, rows in _by_shape(images).items():
        group = torch.stack([images[j] for j in rows]).float()
        resized = _resize_torch(group, (size, size), spec.interpolation, spec.eval_antialias)
        if len(rows) == len(images):
            return resized
        # index_copy_ with a pinned index: indexing with a Python list would copy it to the device synchronously.
        out.index_copy_(0, host_to_device(torch.tensor(rows), out.device), resized)
    return out


def _prefilter(images: list[torch.Tensor], matrices: np.ndarray,
               size: int) -> tuple[list[torch.Tensor], np.ndarray]:
    """`train_antialias`: images larger than `size` shrunk first (antialiased, float), and their matrices."""
    out = [image.float() for image in images]
    matrices = np.array(matrices, dtype=np.float64)
    for shape, rows in _by_shape(images).items():
        target = prefilter_size(shape[-2], shape[-1], size)
        if target != tuple(shape[-2:]):
            group = _resize_torch(torch.stack([images[j] for j in rows]).float(), target, "linear", antialias=True)
            for j, image in zip(rows, group):
                out[j] = image
            matrices[rows] = on_resized_source(matrices[rows], shape[-2], shape[-1], *target)
    return out, matrices


def _canvas(images: list[torch.Tensor], fill: int) -> torch.Tensor:
    """The images in the top-left corners of one N x 3 x Hmax x Wmax float tensor, minus `fill`.

    The padding is 0 there, exactly what `grid_sample`'s zero padding reads outside an
    image, so sampling the canvas equals sampling each image on its own. Images of
    different sizes are padded by a nested tensor: a few kernels for the whole batch
    (float is the dtype with a fused padding kernel on CUDA), not one copy per image.
    """
    if all(image.shape == images[0].shape for image in images):
        canvas = torch.stack(images).float()  # one kernel: the usual case
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "nested tensors are in prototype stage"
            canvas = torch.nested.nested_tensor(images).float().to_padded_tensor(float(fill))
    return canvas.sub_(fill) if fill else canvas


def _warp_torch(images: list[torch.Tensor], matrices: np.ndarray, spec: PipelineSpec) -> torch.Tensor:
    """Train geometry of the whole batch: one `affine_grid` + `grid_sample` (float N x 3 x S x S)."""
    size = spec.image_size
    canvas = _canvas(images, spec.fill)
    thetas = grid_sample_thetas(matrices, size, tuple(canvas.shape[-2:]))
    # All matrices in one pinned, non-blocking host-to-device copy.
    theta = host_to_device(torch.from_numpy(thetas.astype(np.float32)), canvas.device)
    grid = F.affine_grid(theta, [len(images), 3, size, size], align_corners=False)
    # Zero padding around (image - fill), plus fill, is a constant border of `fill`
    # blended exactly as OpenCV's BORDER_CONSTANT blends it.
    warped = F.grid_sample(canvas, grid, mode=_TORCH_MODE[spec.interpolation], padding_mode="zeros",
                           align_corners=False)
    return warped.add_(spec.fill)


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's batched `decode_jpeg` to `device`; on CUDA, safe for the memory it writes.

    torchvision allocates the outputs on the caller's current stream, then has nvJPEG
    write them from a stream of its own that does not wait for the current one (and
    nvJPEG's hardware engine ignores stream order anyway). The caching allocator hands a
    stream any block freed on that stream at once, trusting stream order, so decoding
    on the training stream could be given a block autograd has just freed while queued
    kernels still read it. So the decode runs with a dedicated stream current, on which
    nothing but these outputs is ever allocated: only blocks freed there can come back to
    the decoder, and every output is `record_stream`-ed on the consumer (`hand_over`),
    so its block returns only after the consumer's kernels using it have finished. That
    holds whatever stream the decoder writes from: correct by construction, not by
    timing. The decode stream first waits on the consumer, so any work torchvision does
    queue on the current stream is ordered after what the consumer queued before.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type != "cuda":
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    stream = decode_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    hand_over(images, ready_marker(stream))
    return images


def decode_on_device(reader: PackReader, indices: np.ndarray, encoded: list[torch.Tensor],
                     device: torch.device) -> tuple[list[torch.Tensor], list[SkippedSample]]:
    """Batched decode of `encoded` to 3 x H x W uint8 on `device` (nvJPEG on CUDA), and the samples left out.

    Each image that cannot be decoded is left out of the result (good ones in order)
    and listed as a `SkippedSample` naming it and torchvision's reason. On the CPU this
    is torchvision's CPU decoder, so the whole path runs in CI.
    """
    try:
        return _decode_jpegs(encoded, device), []
    except RuntimeError:
        pass
    # The batched call does not say which image failed: find them one by one.
    good, skipped = [], []
    for index, data in zip(indices, encoded):
        try:
            _decode_jpegs([data], device)
        except RuntimeError as exc:
            skipped.append(ImageDecodeError.of(reader, int(index), torchvision_reason(exc)).sample)
            continue
        good.append(data)
    return (_decode_jpegs(good, device) if good else []), skipped


def gpu_decode_works(reader: PackReader, index: int, device: torch.device) -> bool:
    """Whether torchvision can decode image `index` on `device` (nvJPEG present and working)."""
    if device.type != "cuda":
        return False
    try:
        _decode_jpegs([torch.from_numpy(np.array(reader.image_bytes(index)))], device)
    except (ImportError, RuntimeError, TypeError, ValueError) as exc:
        log.warning("torch backend: GPU JPEG decoding unavailable (%s); decoding in DataLoader workers instead",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return False
    return True
