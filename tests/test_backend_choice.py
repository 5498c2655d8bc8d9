"""The one place a backend is chosen (`dali_pipes.choose_backend`), and what the data package may import."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dali_pipes
from dali_pipes import LoaderError, choose_backend

REPO = Path(__file__).resolve().parents[1]


def test_named_backends_are_taken_as_they_are() -> None:
    assert choose_backend("torch", "cpu") == ("torch", None)
    assert choose_backend("synthetic", torch.device("cpu")) == ("synthetic", None)
    with pytest.raises(LoaderError, match="unknown backend 'nope'"):
        choose_backend("nope", "cpu")


@pytest.mark.parametrize("installed", [True, False])
def test_auto_says_what_it_chose(monkeypatch: pytest.MonkeyPatch, installed: bool) -> None:
    probes: list[str] = []
    monkeypatch.setattr("dali_pipes.backends.dali_available", lambda: probes.append("probe") or installed)
    name, note = choose_backend("auto", "cuda:1")
    assert name == ("dali" if installed else "torch") and probes == ["probe"]
    assert note == f"backend auto -> {name} (device cuda:1, DALI {'available' if installed else 'not installed'})"
    name, note = choose_backend("auto", "cpu")
    assert (name, probes) == ("torch", ["probe"])  # no second probe: off CUDA, DALI is never looked for
    assert note is not None and note.startswith("backend auto -> torch (device cpu")
    if not installed:
        with pytest.raises(LoaderError, match="needs NVIDIA DALI") as missing:
            choose_backend("dali", "cpu")
        assert "nvidia-dali-cuda120" in str(missing.value) and "nvidia-dali-cuda130" in str(missing.value)
        assert "\n" not in str(missing.value)


_FRESH = """
import importlib, json, pkgutil, sys
import dali_pipes
modules = sorted(m.name for m in pkgutil.iter_modules(dali_pipes.__path__))
for name in modules:
    importlib.import_module(f"dali_pipes.{{name}}")
chosen = dali_pipes.choose_backend("auto", "cpu")
loader = dali_pipes.build_loader({pack!r}, "val", backend="auto", batch_size=4, train=False, image_size=32,
                                 num_workers=1)
images, labels = next(iter(loader))
trainer = any(m.split(".")[0] == "trainer" for m in sys.modules)
print(json.dumps({{"modules": modules, "chosen": chosen[0], "loader": loader.backend, "rows": len(labels),
                   "dali": "nvidia.dali" in sys.modules, "trainer": trainer}}))
"""


def test_auto_on_cpu_never_imports_dali_and_nothing_imports_trainer(demo_pack: Path) -> None:
    # A fresh interpreter: this one may hold DALI from other tests.
    result = subprocess.run([sys.executable, "-c", _FRESH.format(pack=str(demo_pack))], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"backends", "dali_backend", "geometry", "torch_cpu", "torch_gpu"} <= set(seen["modules"])
    assert seen["chosen"] == seen["loader"] == "torch" and seen["rows"] == 4
    assert seen["dali"] is False and seen["trainer"] is False


def test_every_public_name_resolves() -> None:
    assert sorted(dali_pipes.__all__) == sorted(dali_pipes._EXPORTS)
    for name in dali_pipes.__all__:
        assert getattr(dali_pipes, name) is not None, name
