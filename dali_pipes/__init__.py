"""Data pipelines for dali-trainer: the pack format and its writer, one preprocessing spec and
one geometry, and backends (DALI, torch, synthetic) behind one batch contract, `build_loader`.

Only `dali_pipes.dali_backend` imports `nvidia.dali`, and only when that backend is chosen
(`choose_backend`, the one place that chooses), so everything here imports on machines
without DALI. Names are resolved lazily, so `import dali_pipes.pack_sources` (the packer's
worker processes) does not pay for torch. `trainer` and `tools` import the names listed
here; nothing here imports `trainer`.

Where each concept lives:

* `spec`: the preprocessing spec and its constants; `geometry`: the one per-sample affine
  matrix every backend warps with, its conversions to each backend's convention, and the
  integer pre-shrink before large downscales.
* `pack_format`: the pack's layout and `PackReader`; `pack_writer`: how a pack is written
  (`pack_folder`); `pack_sources`: finding, verifying and encoding source files;
  `splits`: train/val/test assignment.
* `loader`: what a loader is (request, epoch plan, shards, skipped samples, the base);
  `backends`: the registry, `choose_backend` and `build_loader`.
* `torch_backend` (the DataLoader, over `torch_cpu` and `torch_gpu`, with `device` for
  streams and transfers and `prefetch` for the background thread), `dali_backend`,
  `synthetic_backend`: one module per backend.
* `cache`: the decoded cache (every image decoded once, in shared memory);
  `cached_backend`: the loaders over it (`build_loader(cache=...)`).
* `inputs`: model inputs from loose files; `atomic`: atomic file writes and output checks;
  `progress`: the progress line; `seeded`: the vectorized per-sample random draws; `cores`:
  the default worker count; `words`: counts in words (`plural`).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    **dict.fromkeys(["OutputError", "atomic_path", "atomic_write_bytes", "check_output", "check_output_folder"],
                    "atomic"),
    **dict.fromkeys(["BACKENDS", "available_backends", "build_loader", "choose_backend", "resolve_backend"],
                    "backends"),
    **dict.fromkeys(["default_workers"], "cores"),
    **dict.fromkeys(["largest_zoom"], "crop"),
    **dict.fromkeys(["CACHE_DIR_ENV", "CachePlan", "DecodedCache", "Room", "build_cache", "cache_dir", "cache_file",
                     "default_cache_size", "free_room", "plan_cache", "shard_bytes"], "cache"),
    **dict.fromkeys(["sample_augmentation"], "geometry"),
    **dict.fromkeys(["preprocess"], "inputs"),
    **dict.fromkeys(["BatchLoader", "EpochPlan", "ImageDecodeError", "LoaderError", "LoaderRequest", "SkippedSample",
                     "plan_epoch", "samples_per_rank", "to_model_input"], "loader"),
    **dict.fromkeys(["PackError", "PackReader"], "pack_format"),
    **dict.fromkeys(["IMAGE_EXTENSIONS", "encode_file", "load_rgb"], "pack_sources"),
    **dict.fromkeys(["PackFailure", "PackOptions", "PackReport", "format_report", "pack_folder"], "pack_writer"),
    **dict.fromkeys(["plural"], "words"),
    **dict.fromkeys(["Progress"], "progress"),
    **dict.fromkeys(["IMAGENET_MEAN", "IMAGENET_STD", "PipelineSpec"], "spec"),
    **dict.fromkeys(["class_split", "split_kind"], "splits"),
}
__all__ = [
    "BACKENDS", "BatchLoader", "EpochPlan", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "ImageDecodeError",
    "LoaderError", "LoaderRequest", "OutputError", "PackError", "PackFailure", "PackOptions", "PackReader",
    "PackReport", "PipelineSpec", "Progress", "SkippedSample", "atomic_path", "atomic_write_bytes",
    "available_backends", "build_loader", "check_output", "check_output_folder", "choose_backend", "class_split",
    "default_workers", "encode_file", "format_report", "load_rgb", "pack_folder", "plan_epoch", "plural", "preprocess",
    "resolve_backend", "sample_augmentation", "samples_per_rank", "split_kind", "to_model_input",
    # the decoded cache
    "CACHE_DIR_ENV", "CachePlan", "DecodedCache", "Room", "build_cache", "cache_dir", "cache_file",
    "default_cache_size", "free_room", "largest_zoom", "plan_cache", "shard_bytes",
]

if TYPE_CHECKING:
    from .atomic import OutputError, atomic_path, atomic_write_bytes, check_output, check_output_folder
    from .backends import BACKENDS, available_backends, build_loader, choose_backend, resolve_backend
    from .cache import (
        CACHE_DIR_ENV,
        CachePlan,
        DecodedCache,
        Room,
        build_cache,
        cache_dir,
        cache_file,
        default_cache_size,
        free_room,
        plan_cache,
        shard_bytes,
    )
    from .cores import default_workers
    from .crop import largest_zoom
    from .geometry import sample_augmentation
    from .inputs import preprocess
    from .loader import (
        BatchLoader,
        EpochPlan,
        ImageDecodeError,
        LoaderError,
        LoaderRequest,
        SkippedSample,
        plan_epoch,
        samples_per_rank,
        to_model_input,
    )
    from .pack_format import PackError, PackReader
    from .pack_sources import IMAGE_EXTENSIONS, encode_file, load_rgb
    from .pack_writer import PackFailure, PackOptions, PackReport, format_report, pack_folder
    from .progress import Progress
    from .spec import IMAGENET_MEAN, IMAGENET_STD, PipelineSpec
    from .splits import class_split, split_kind
    from .words import plural


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dali_pipes' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return __all__
