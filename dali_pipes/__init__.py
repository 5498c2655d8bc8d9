"""Data pipelines for dali-trainer: the pack format, one preprocessing spec, and backends
(DALI, torch, synthetic) behind one batch contract, `build_loader`.

Only `dali_pipes.dali_backend` imports `nvidia.dali`, and only when that backend is asked
for, so everything here imports on machines without DALI. Names are resolved lazily, so
`import dali_pipes.packing` (the packer's worker processes) does not pay for torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "BatchLoader": "base", "EpochPlan": "base", "plan_epoch": "base", "to_model_input": "base",
    "BACKENDS": "loader", "LoaderError": "loader", "available_backends": "loader", "build_loader": "loader",
    "resolve_backend": "loader", "PackError": "pack", "PackReader": "pack", "PipelineSpec": "spec",
    "Progress": "progress", "OneLineUsageCommand": "cli_usage", "TrainerGroup": "cli_usage",
    "atomic_path": "atomic", "atomic_write_bytes": "atomic",
    "PackFailure": "writer", "PackOptions": "writer", "PackReport": "writer", "pack_folder": "writer",
}
__all__ = [
    "BACKENDS", "BatchLoader", "EpochPlan", "LoaderError", "OneLineUsageCommand", "PackError", "PackFailure", "PackOptions", "PackReader",
    "PackReport", "PipelineSpec",    "Progress", "TrainerGroup",
    "atomic_path", "atomic_write_bytes", "available_backends", "build_loader", "pack_folder", "plan_epoch", "resolve_backend", "to_model_input",
]

if TYPE_CHECKING:
    from .atomic import atomic_path, atomic_write_bytes
    from .base import BatchLoader, EpochPlan, plan_epoch, to_model_input
    from .cli_usage import OneLineUsageCommand, TrainerGroup
    from .loader import BACKENDS, LoaderError, available_backends, build_loader, resolve_backend
    from .pack import PackError, PackReader
    from .progress import Progress
    from .spec import PipelineSpec
    from .writer import PackFailure, PackOptions, PackReport, pack_folder


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dali_pipes' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return __all__
