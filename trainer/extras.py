"""Optional dependencies (the `export` and `tb` extras): imported on use, named in one line when missing."""
from __future__ import annotations

import importlib
from types import ModuleType

from trainer.errors import TrainerError


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module`, or raise a one-line `TrainerError` naming the pip extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrainerError(f"{purpose} needs the {module} package: pip install 'dali-trainer[{extra}]'") from None
