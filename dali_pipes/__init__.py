"""Data pipelines for dali-trainer: the pack format, one preprocessing spec, and backends
(DALI, torch, synthetic) behind one batch contract, `build_loader`.

Only `dali_pipes.dali_backend` imports `nvidia.dali`, and only when that backend is asked
for, so everything here imports on machines without DALI.
"""
from .base import BatchLoader, EpochPlan, plan_epoch, to_model_input
from .loader import BACKENDS, LoaderError, available_backends, build_loader, resolve_backend
from .pack import PackError, PackReader
from .spec import PipelineSpec

__all__ = [
    "BACKENDS", "BatchLoader", "EpochPlan", "LoaderError", "PackError", "PackReader", "PipelineSpec",
    "available_backends", "build_loader", "plan_epoch", "resolve_backend", "to_model_input",
]
