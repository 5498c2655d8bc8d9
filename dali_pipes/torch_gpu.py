"""The torch backend's GPU path: decode on the device, then one batched geometry pass, with torch ops only.

DataLoader workers only gather encoded bytes; a background thread of the main process
(`prefetch.Prefetcher`) decodes the batch on the GPU (torchvision's batched nvJPEG
decode, see `_decode_jpegs`) and does the geometry there for the whole batch at once:

* every image that will be downscaled enough is first shrunk by an integer factor with
  area averaging (`geometry`'s pre-shrink: the warp's rule in training, the eval rule in
  evaluation), so a 4000 px photo never reaches the canvas at full size;
* the images are copied into the top-left corners of one uint8 canvas (one allocation,
  one copy per image, converted to float once); no nested tensors, whose padding copies
  their sizes to the device with a synchronizing copy;
* train: one `affine_grid` + `grid_sample` with each image's `geometry` matrix; eval:
  one separable resize as two batched matrix products, whatever the image sizes
  (`resize_weights` are `F.interpolate`'s own weights, built on the device).

The same functions run on CPU tensors, which is how CI tests them. Streams and
transfers are `device`'s.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .device import device_streams, hand_over, host_to_device, ready_marker
from .geometry import (
    eval_shrinks,
    grid_sample_thetas,
    preshrink_torch,
    resize_shrink_factors,
    shrunk_matrices,
    warp_shrink_factors,
)
from .loader import ImageDecodeError, SkippedSample
from .pack_format import PackReader
from .spec import PipelineSpec
from .torch_cpu import torchvision_reason

log = logging.getLogger("dali_pipes")

_TORCH_MODE = {"linear": "bilinear", "cubic": "bicubic", "nearest": "nearest"}
_CUBIC_A = {True: -0.5, False: -0.75}  # F.interpolate's bicubic coefficient with and without antialiasing


def transform_images(images: list[torch.Tensor], spec: PipelineSpec, matrices: np.ndarray | None) -> torch.Tensor:
    """Decoded 3 x H x W uint8 images (any device) -> N x S x S x 3 uint8 on that device.

    Train (`matrices`, N x 2 x 3 from `geometry.train_matrices`): pre-shrink (with
    `spec.train_antialias`), one canvas, one batched warp. Eval (None): pre-shrink (an
    antialiased resize of a photo over 4x the size), one canvas, one batched resize.
    """
    heights = np.array([image.shape[-2] for image in images])
    widths = np.array([image.shape[-1] for image in images])
    if matrices is None:
        fy, fx = resize_shrink_factors(heights, widths, spec.image_size) if eval_shrinks(spec) else (1, 1)
        shrunk = _preshrunk(images, fy, fx)
        pixels = _resize_batch(_canvas(shrunk, 0).float(), [image.shape[-2:] for image in shrunk], spec)
    else:
        fy, fx = warp_shrink_factors(matrices) if spec.train_antialias else (1, 1)
        shrunk = _preshrunk(images, fy, fx)
        pixels = _warp_torch(_canvas(shrunk, spec.fill), shrunk_matrices(matrices, fy, fx), spec)
    # Rounded like the CPU path's uint8 output; NHWC memory is what `to_model_input` expects.
    return pixels.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _preshrunk(images: list[torch.Tensor], fy: np.ndarray | int, fx: np.ndarray | int) -> list[torch.Tensor]:
    """`images` with each averaged over its (fy, fx) blocks (`geometry.preshrink_torch`), rounded to uint8.

    Images of one size and factor are shrunk together (datasets often have one or a few sizes).
    """
    factors = np.broadcast_to(np.stack(np.broadcast_arrays(fy, fx), -1), (len(images), 2))
    groups: dict[tuple[int, ...], list[int]] = {}
    for j, (image, (y, x)) in enumerate(zip(images, factors)):
        if y > 1 or x > 1:
            groups.setdefault((*image.shape, int(y), int(x)), []).append(j)
    out = list(images)
    for key, rows in groups.items():
        shrunk = preshrink_torch(torch.stack([images[j] for j in rows]), key[-2], key[-1])
        for j, image in zip(rows, shrunk.round_().to(torch.uint8)):
            out[j] = image
    return out


def _canvas(images: list[torch.Tensor], fill: int) -> torch.Tensor:
    """The uint8 images in the top-left corners of one N x 3 x Hmax x Wmax uint8 tensor, padded with `fill`.

    One allocation and one copy per image (a single `stack` when all have one size); the
    caller converts the canvas to float once.
    """
    first = images[0]
    if all(image.shape == first.shape for image in images):
        return torch.stack(images)
    height, width = max(image.shape[-2] for image in images), max(image.shape[-1] for image in images)
    canvas = torch.full((len(images), first.shape[0], height, width), fill, dtype=torch.uint8, device=first.device)
    for j, image in enumerate(images):
        canvas[j, :, : image.shape[-2], : image.shape[-1]] = image
    return canvas


def _warp_torch(canvas: torch.Tensor, matrices: np.ndarray, spec: PipelineSpec) -> torch.Tensor:
    """Train geometry of the whole batch: one `affine_grid` + `grid_sample` (float N x 3 x S x S).

    Each image sits in the top-left corner of the canvas, padded with `fill`; minus `fill`,
    the padding is 0, exactly what `grid_sample`'s zero padding reads outside an image, so
    sampling the canvas equals sampling each image on its own.
    """
    size, n = spec.image_size, len(canvas)
    pixels = canvas.float()
    if spec.fill:
        pixels.sub_(spec.fill)
    thetas = grid_sample_thetas(matrices, size, tuple(canvas.shape[-2:]))
    # All matrices in one pinned, non-blocking host-to-device copy.
    theta = host_to_device(torch.from_numpy(thetas.astype(np.float32)), canvas.device)
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    # Zero padding around (image - fill), plus fill, is a constant border of `fill`
    # blended exactly as OpenCV's BORDER_CONSTANT blends it.
    warped = F.grid_sample(pixels, grid, mode=_TORCH_MODE[spec.interpolation], padding_mode="zeros",
                           align_corners=False)
    return warped.add_(spec.fill)


def _resize_batch(canvas: torch.Tensor, sizes: Sequence[tuple[int, int]], spec: PipelineSpec) -> torch.Tensor:
    """Eval geometry of the whole batch (float N x 3 x S x S): each image of `sizes` resized to S x S.

    Resizing is separable and linear: out = Wy @ image @ Wx^T with `resize_weights`, which are
    zero beyond each image's own size, so the padding of the canvas never counts.
    """
    n, channels, height, width = canvas.shape
    size = spec.image_size
    lengths = host_to_device(torch.from_numpy(np.array(sizes, dtype=np.float32)), canvas.device)
    wy = resize_weights(lengths[:, 0], height, size, spec.interpolation, spec.eval_antialias)
    wx = resize_weights(lengths[:, 1], width, size, spec.interpolation, spec.eval_antialias)
    across = torch.bmm(canvas.view(n, channels * height, width), wx.transpose(1, 2))  # N x (C H) x S
    columns = across.view(n, channels, height, size).transpose(1, 2).reshape(n, height, channels * size)
    out = torch.bmm(wy, columns)  # N x S(y) x (C S(x))
    return out.view(n, size, channels, size).permute(0, 2, 1, 3)


def resize_weights(lengths: torch.Tensor, span: int, size: int, interpolation: str, antialias: bool) -> torch.Tensor:
    """N x size x span float32 on `lengths`' device: the weights `F.interpolate` gives source pixels 0..span-1
    for each output pixel when it resizes lengths[n] pixels to `size` along one axis (0 beyond lengths[n]).

    Written after PyTorch's kernels (align_corners=False): antialiased bilinear and bicubic
    widen the filter by the downscale and normalize over the taps inside the image (PIL's
    filter); plain bilinear clamps the source coordinate at 0 and the second tap at the last
    pixel; plain bicubic (coefficient -0.75) clamps its four taps' indices; nearest takes
    floor(i * scale).
    """
    device = lengths.device
    length = lengths.float().view(-1, 1, 1)
    scale = length / size
    i = torch.arange(size, device=device, dtype=torch.float32).view(1, -1, 1)
    j = torch.arange(span, device=device, dtype=torch.float32).view(1, 1, -1)
    if interpolation == "nearest":
        return (j == torch.minimum(torch.floor(i * scale), length - 1)).float()
    if antialias:
        return _filtered_weights(length, scale, i, j, interpolation)
    source = scale * (i + 0.5) - 0.5
    if interpolation == "linear":
        source = source.clamp(min=0.0)
        first = torch.floor(source)
        second = torch.where(first < length - 1, first + 1, first)
        frac = source - first
        return (j == first) * (1 - frac) + (j == second) * frac
    first = torch.floor(source)
    t = source - first
    weights = torch.zeros((len(lengths), size, span), device=device)
    for k, coefficient in zip((-1, 0, 1, 2), _cubic_taps(t, _CUBIC_A[False])):
        weights += (j == (first + k).clamp(min=0).minimum(length - 1)) * coefficient
    return weights


def _filtered_weights(length: torch.Tensor, scale: torch.Tensor, i: torch.Tensor, j: torch.Tensor,
                      interpolation: str) -> torch.Tensor:
    """Antialiased weights (PyTorch's `_upsample_*_aa`, PIL's filter), normalized per output pixel."""
    half = 1.0 if interpolation == "linear" else 2.0
    widen = scale.clamp(min=1.0)
    support = half * widen
    center = scale * (i + 0.5)
    low = torch.floor(center - support + 0.5).clamp(min=0)
    high = torch.minimum(torch.floor(center + support + 0.5), length)
    x = ((j - center + 0.5) / widen).abs()
    if interpolation == "linear":
        weights = (1 - x).clamp(min=0)
    else:
        a = _CUBIC_A[True]
        weights = torch.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                              torch.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, torch.zeros_like(x)))
    weights = weights * ((j >= low) & (j < high))
    return weights / weights.sum(-1, keepdim=True)


def _cubic_taps(t: torch.Tensor, a: float) -> tuple[torch.Tensor, ...]:
    """The four cubic-convolution coefficients for fraction `t` (taps at -1, 0, 1, 2)."""
    def near(x: torch.Tensor) -> torch.Tensor:
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: torch.Tensor) -> torch.Tensor:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


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
    stream = device_streams(device).decode
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    hand_over(images, ready_marker(stream), device)
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
