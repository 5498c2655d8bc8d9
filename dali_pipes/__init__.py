"""Data pipelines for dali-trainer: the pack format and its writer, one preprocessing spec,
and backends (DALI, torch, synthetic) behind one batch contract, `build_loader`.

Only `dali_pipes.dali_backend` imports `nvidia.dali`, and only when that backend is asked
for, so everything here imports on machines without DALI. Names are resolved lazily, so
`import dali_pipes.packing` (the packer's worker processes) does not pay for torch.
`trainer` imports only the names listed here; nothing here imports `trainer`.

Where each concept lives: what a loader is (request, epoch plan, skipped samples, the
base class) in `base`; the backends in `dali_backend`, `torch_backend` and
`synthetic_backend`, picked by `loader.build_loader`; the pack format in `pack`; how a
pack is written in `writer` (per-file steps in `packing`); model inputs from loose
files in `inputs`; atomic file writes in `atomic`; the progress line in `progress`;
one-line usage errors in `cli_usage`.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    **dict.fromkeys(["atomic_path", "atomic_write_bytes"], "atomic"),
    **dict.fromkeys(["BatchLoader", "EpochPlan", "ImageDecodeError", "LoaderError", "LoaderRequest", "SkippedSample",
                     "plan_epoch", "samples_per_rank", "to_model_input"], "base"),
    **dict.fromkeys(["OneLineUsageCommand", "TrainerGroup"], "cli_usage"),
    **dict.fromkeys(["preprocess"], "inputs"),
    **dict.fromkeys(["BACKENDS", "available_backends", "build_loader", "resolve_backend"], "loader"),
    **dict.fromkeys(["PackError", "PackReader"], "pack"),
    **dict.fromkeys(["IMAGE_EXTENSIONS", "class_split", "load_rgb", "split_kind"], "packing"),
    **dict.fromkeys(["Progress"], "progress"),
    **dict.fromkeys(["PipelineSpec"], "spec"),
    **dict.fromkeys(["PackFailure", "PackOptions", "PackReport", "pack_folder"], "writer"),
}
__all__ = [
    "BACKENDS", "BatchLoader", "EpochPlan", "IMAGE_EXTENSIONS", "ImageDecodeError", "LoaderError", "LoaderRequest",
    "OneLineUsageCommand", "PackError", "PackFailure", "PackOptions", "PackReader", "PackReport", "PipelineSpec",
    "Progress", "SkippedSample", "TrainerGroup", "atomic_path", "atomic_write_bytes", "available_backends",
    "build_loader", "class_split", "load_rgb", "pack_folder", "plan_epoch", "preprocess", "resolve_backend", "samples_per_rank",
    "split_kind", "to_model_input",
]

if TYPE_CHECKING:
    from .atomic import atomic_path, atomic_write_bytes
    from .base import (BatchLoader, EpochPlan, ImageDecodeError, LoaderError, LoaderRequest, SkippedSample, plan_epoch,
                       samples_per_rank, to_model_input)
    from .cli_usage import OneLineUsageCommand, TrainerGroup
    from .inputs import preprocess
    from .loader import BACKENDS, available_backends, build_loader, resolve_backend
    from .pack import PackError, PackReader
    from .packing import IMAGE_EXTENSIONS, class_split, load_rgb, split_kind
    from .progress import Progress
    from .spec import PipelineSpec
    from .writer import PackFailure, PackOptions, PackReport, pack_folder


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dali_pipes' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return __all__
