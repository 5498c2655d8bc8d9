"""The scripts in tools/ run end to end at toy sizes, so they cannot rot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _python(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_gpu_check_smoke_and_charts(tmp_path: Path) -> None:
    # Every part but the tests (which need a GPU), at toy sizes on the CPU, through the script itself.
    out = tmp_path / "check"
    result = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), str(out), "--smoke"], cwd=REPO,
                            capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else result.stderr
    assert result.returncode == 0, log[-3000:]
    results = {name: json.loads((out / f"{name}.json").read_text())
               for name in ("compute", "compute_compiled", "pipeline", "train", "summary")}
    assert results["compute"]["compiled"] is False and results["compute_compiled"]["compiled"] is True
    compiled = results["compute_compiled"]["rows"][0]
    assert compiled["compiled"] and compiled["compile_seconds"] > 0 and compiled["synthetic_images_per_second"] > 0
    row = results["train"]["rows"][0]
    assert row["arch"] == "resnet18" and row["synthetic_images_per_second"] > 0 and "torch" in row["backends"]
    assert 0 <= row["backends"]["torch"]["data_wait_fraction"] <= 1
    names = [r["name"] for r in results["pipeline"]["results"]]
    assert names[:2] == ["(a) notebook PIL float32", "(b) decode only"] and "torch uint8" in names
    assert {"(d) torch uint8 cache ram", "(d) torch uint8 cache device"} <= set(names)
    summary = results["summary"]
    assert "resnet18" in summary["end_to_end"] and summary["compute"]["resnet18"]["compile_seconds"] > 0
    assert summary["pipeline"]["torch uint8"]["target"] == 20000

    from tools.plot_bench import plot_pipeline, plot_train

    plot_pipeline(results["pipeline"], tmp_path / "pipeline.png", "smoke")
    plot_train(results["train"], tmp_path / "train.png", "smoke")
    for png in ("pipeline.png", "train.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_gpu_check_refuses_an_unknown_part_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), str(tmp_path / "out"), "--part", "nope"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--part tests|compute|pipeline|train" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bench_pack_runs(tmp_path: Path) -> None:
    result = _python("tools/bench_pack.py", "--images", "20", "--min-size", "40", "--max-size", "60", "--workers", "2",
                     "--json", str(tmp_path / "pack.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "pack.json").read_text())["rows"]
    assert [r["copied"] for r in rows] == [20, 0] and [r["reencoded"] for r in rows] == [0, 20]
    assert all(r["packer_rate"] > 0 and r["ratio"] > 0 for r in rows)


def test_make_demo_dataset_does_not_depend_on_workers(tmp_path: Path) -> None:
    from tools.make_demo_dataset import make_demo_dataset

    make_demo_dataset(tmp_path / "one", classes=3, per_class=5, min_size=20, max_size=30, png_every=2, workers=1)
    make_demo_dataset(tmp_path / "two", classes=3, per_class=5, min_size=20, max_size=30, png_every=2, workers=2)
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.*"))
    assert one == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.*")) and len(one) == 15
    assert all((tmp_path / "one" / p).read_bytes() == (tmp_path / "two" / p).read_bytes() for p in one)


@pytest.mark.slow
def test_bench_cache_scale_runs(tmp_path: Path) -> None:
    result = _python("tools/bench_cache_scale.py", "--images", "40", "--classes", "4", "--side", "40", "--cache-size",
                     "36", "--image-size", "32", "--batch-size", "8", "--workers", "1", "--workdir", str(tmp_path),
                     "--json", str(tmp_path / "scale.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((tmp_path / "scale.json").read_text())
    assert figures["images"] == 40 and figures["cache_bytes"] == 40 * 36 * 36 * 3 and figures["peak_pss_mb"] > 0
    assert "cache ram: decoded 40 images" in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["scale.json"]  # the images, pack and run are gone
