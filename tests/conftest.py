"""Shared fixtures: a small demo tree and its pack, made once per session in a temp folder."""
from __future__ import annotations

from pathlib import Path

import pytest

from dali_pipes import PackOptions, pack_folder
from tools.make_demo_dataset import make_demo_dataset


def _dali_imports() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_dali = pytest.mark.skip(reason="nvidia-dali is not installed")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    has_dali, has_cuda = _dali_imports(), _cuda()
    # DALI's pipelines leave threads behind, and forking a multi-threaded process can
    # hang a child on a lock copied while held: run everything that forks first.
    items.sort(key=lambda item: "dali" in item.keywords)
    for item in items:
        if "dali" in item.keywords and not has_dali:
            item.add_marker(skip_dali)
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(skip_cuda)


def make_pack(root: Path, *, classes: int, per_class: int, seed: int, min_size: int = 40, max_size: int = 70,
              val_ratio: float = 0.2, test_ratio: float = 0.2, workers: int = 1) -> Path:
    """Draw a JPEG-only demo tree under `root`/src and pack it into `root`/p.h5."""
    make_demo_dataset(root / "src", classes=classes, per_class=per_class, seed=seed, min_size=min_size,
                      max_size=max_size, png_every=0)
    pack_folder(root / "src", root / "p.h5", PackOptions(val_ratio=val_ratio, test_ratio=test_ratio), workers=workers,
                show_progress=False)
    return root / "p.h5"


@pytest.fixture(scope="session")
def demo_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 classes x 12 images, 48-160 px, JPEG with every 4th a PNG."""
    root = tmp_path_factory.mktemp("demo") / "shapes"
    make_demo_dataset(root, classes=6, per_class=12, seed=0, min_size=48, max_size=160, png_every=4)
    return root


@pytest.fixture(scope="session")
def demo_pack(demo_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo tree packed with default options (10% val, 10% test)."""
    out = tmp_path_factory.mktemp("pack") / "demo.h5"
    pack_folder(demo_tree, out, PackOptions(val_ratio=0.2, test_ratio=0.2), workers=2, show_progress=False)
    return out
