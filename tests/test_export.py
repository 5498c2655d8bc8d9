"""`trainer export` (ONNX, TorchScript) checked against plain torchvision models, and `trainer predict` on .onnx
files."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner
from conftest import make_pack

from dali_pipes import IMAGENET_MEAN, IMAGENET_STD, PackReader
from trainer.cli import main as trainer_main
from trainer.errors import TrainerError

ARCHS = ("mobilenet_v2", "resnet18")
SIZE = 32
FIXED_BATCH = {"resnet18": 2}  # one ONNX export with a fixed batch, to spare the time of a fifth export


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(trainer_main, [str(a) for a in args])
    return result.exit_code, result.output


def _needs_onnx() -> None:
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module)


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pack(tmp_path_factory.mktemp("export"), classes=3, per_class=8, seed=3)


@pytest.fixture(scope="module")
def runs(pack: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One epoch of each architecture at 32 px: any weights do, the tests compare models with their exports."""
    out = {}
    for arch in ARCHS:
        folder = tmp_path_factory.mktemp("runs") / arch
        code, output = _run("run", "--pack", pack, "--arch", arch, "--weights", "none", "--image-size", SIZE,
                            "--workers", 0, "--epochs", 1, "--batch-size", 4, "--backend", "torch", "--out", folder)
        assert code == 0, output
        out[arch] = folder
    return out


@pytest.fixture(scope="module")
def exports(runs: dict[str, Path], pack: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Both formats of both architectures, batch dynamic except resnet18's ONNX (FIXED_BATCH): ONNX exports are
    verified on pack images, TorchScript ones on the seeded random batch."""
    folder = tmp_path_factory.mktemp("exports")
    out = {}
    for arch in ARCHS:
        out[arch, "torchscript"] = folder / f"{arch}.pt"
        code, output = _run("export", "--checkpoint", runs[arch] / "best.pt", "--format", "torchscript",
                            "--out", out[arch, "torchscript"])
        assert code == 0, output
        assert "random inputs" in output and "max abs diff" in output
        try:
            _needs_onnx()
        except pytest.skip.Exception:
            continue
        out[arch, "onnx"] = folder / f"{arch}.onnx"
        batch = ["--batch", str(FIXED_BATCH[arch])] if arch in FIXED_BATCH else []
        code, output = _run("export", "--checkpoint", runs[arch] / "best.pt", "--format", "onnx",
                            "--out", out[arch, "onnx"], "--pack", pack, *batch)
        assert code == 0, output
        assert "test split" in output and "onnxruntime" in output
        assert (f"batch {FIXED_BATCH[arch]}" if arch in FIXED_BATCH else "dynamic batch") in output
    return out


def _batch_dimension(arch: str, fmt: str) -> int | str:
    return FIXED_BATCH[arch] if fmt == "onnx" and arch in FIXED_BATCH else "batch"


def _torchvision_model(checkpoint: Path, num_classes: int, arch: str) -> torch.nn.Module:
    """The checkpoint's weights in a plain torchvision model: an expectation independent of trainer's loading code."""
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
    return model.eval()


def _run_exported(path: Path, fmt: str, images: torch.Tensor) -> torch.Tensor:
    if fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            return torch.jit.load(str(path))(images)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("arch", ARCHS)
def test_export_matches_the_torchvision_model_at_any_batch(exports: dict, runs: dict, pack: Path, arch: str,
                                                           fmt: str) -> None:
    if fmt == "onnx":
        _needs_onnx()
    reference = _torchvision_model(runs[arch] / "best.pt", 3, arch)
    fixed = _batch_dimension(arch, fmt)
    for batch in (1, 3) if fixed == "batch" else (fixed,):
        images = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = reference(images)
        got = _run_exported(exports[arch, fmt], fmt, images)
        assert got.shape == (batch, 3)
        assert (got - expected).abs().max() < 1e-4


@pytest.mark.slow
def test_sidecar_records_preprocessing_classes_and_verification(exports: dict, pack: Path) -> None:
    for (arch, fmt), path in exports.items():
        sidecar = json.loads(Path(str(path) + ".json").read_text())
        assert sidecar["classes"] == list(PackReader(pack).classes)
        assert sidecar["spec"]["image_size"] == SIZE and sidecar["spec"]["interpolation"] == "linear"
        assert sidecar["spec"]["mean"] == list(IMAGENET_MEAN) and sidecar["spec"]["std"] == list(IMAGENET_STD)
        assert sidecar["input"]["shape"] == [_batch_dimension(arch, fmt), 3, SIZE, SIZE]
        assert sidecar["arch"] == arch and sidecar["model_format"] == fmt and sidecar["output"] == "logits"
        assert 0 <= sidecar["verification"]["max_abs_diff"] <= 1e-3


@pytest.mark.slow
def test_onnx_input_batch_is_dynamic_or_fixed(exports: dict) -> None:
    _needs_onnx()
    import onnx

    dims = onnx.load(str(exports["mobilenet_v2", "onnx"])).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value
    assert [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]
    dims = onnx.load(str(exports["resnet18", "onnx"])).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [FIXED_BATCH["resnet18"], 3, SIZE, SIZE]


def _predictions(model_file: Path, folder: Path) -> list[dict]:
    from trainer.evaluation import predict_files

    return predict_files(model_file, [folder], topk=3, device=torch.device("cpu"), batch_size=5)


def _assert_same_predictions(a: list[dict], b: list[dict]) -> None:
    assert [r["path"] for r in a] == [r["path"] for r in b] and len(a) == 24
    for x, y in zip(a, b):
        assert [t["class"] for t in x["top"]] == [t["class"] for t in y["top"]]
        assert all(abs(s["probability"] - t["probability"]) < 1e-5 for s, t in zip(x["top"], y["top"]))


@pytest.mark.slow
def test_predict_from_onnx_equals_predict_from_checkpoint(exports: dict, runs: dict, pack: Path) -> None:
    _needs_onnx()
    images = pack.parent / "src"  # 24 images in batches of 5: resnet18's fixed-batch model takes them 2 at a time
    for arch in ARCHS:
        _assert_same_predictions(_predictions(exports[arch, "onnx"], images),
                                 _predictions(runs[arch] / "best.pt", images))
    code, output = _run("predict", "--checkpoint", exports["resnet18", "onnx"], images / "00_disc", "--topk", "1",
                        "--json")
    assert code == 0, output
    assert len(output.splitlines()) == 8 and all(json.loads(line)["top"][0]["class"] for line in output.splitlines())


@pytest.mark.slow
def test_export_refuses_a_model_that_differs(runs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("trainer.export.TOLERANCE", -1.0)  # nothing can match: the check must fire
    out = tmp_path / "m.pt"
    code, output = _run("export", "--checkpoint", runs["resnet18"] / "best.pt", "--format", "torchscript", "--out", out)
    assert code == 1 and len(output.strip().splitlines()) == 1
    assert "differs from PyTorch" in output and "nothing written" in output
    assert not out.exists() and not Path(str(out) + ".json").exists()


@pytest.mark.slow
def test_embedding_needs_a_margin_head(runs: dict, tmp_path: Path) -> None:
    code, output = _run("export", "--checkpoint", runs["resnet18"] / "best.pt", "--format", "torchscript", "--out",
                        tmp_path / "e.pt", "--embedding")
    assert code == 1 and len(output.strip().splitlines()) == 1
    assert "margin head" in output


@pytest.mark.slow
def test_embedding_export_serves_the_margin_heads_embedding(pack: Path, tmp_path: Path) -> None:
    run = tmp_path / "arcface"
    code, output = _run("run", "--pack", pack, "--arch", "resnet18", "--weights", "none", "--image-size", SIZE,
                        "--workers", 0, "--epochs", 1, "--batch-size", 4, "--backend", "torch", "--head", "arcface",
                        "--embedding-dim", 16, "--out", run)
    assert code == 0, output
    out = tmp_path / "e.pt"
    code, output = _run("export", "--checkpoint", run / "best.pt", "--format", "torchscript", "--out", out,
                        "--embedding")
    assert code == 0, output
    assert json.loads(Path(str(out) + ".json").read_text())["output"] == "embedding"
    # The embedding by hand, from the documented checkpoint keys: torchvision's backbone without
    # its classifier, then head.embedding.0 (linear) and head.embedding.1 (batch norm), eval mode.
    state = torch.load(run / "best.pt", weights_only=True)["model"]
    backbone = torchvision.models.resnet18()
    backbone.fc = torch.nn.Identity()
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    linear, norm = torch.nn.Linear(512, 16), torch.nn.BatchNorm1d(16)
    linear.load_state_dict({k.rsplit(".", 1)[1]: v for k, v in state.items() if k.startswith("head.embedding.0.")})
    norm.load_state_dict({k.rsplit(".", 1)[1]: v for k, v in state.items() if k.startswith("head.embedding.1.")})
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = norm.eval()(linear(backbone.eval()(images)))
    assert (_run_exported(out, "torchscript", images) - expected).abs().max() < 1e-4


@pytest.mark.slow
def test_a_checkpoint_whose_spec_holds_dtype_still_predicts(runs: dict, pack: Path, tmp_path: Path) -> None:
    # The spec once had a `dtype` field ("float32"), so older checkpoints store it; it is ignored on loading.
    payload = torch.load(runs["resnet18"] / "best.pt", map_location="cpu", weights_only=True)
    assert "dtype" not in payload["spec"]
    payload["spec"]["dtype"] = "float32"
    older = tmp_path / "older.pt"
    torch.save(payload, older)
    images = pack.parent / "src" / "00_disc"
    outputs = [_run("predict", "--checkpoint", path, images, "--topk", "2", "--json")
               for path in (runs["resnet18"] / "best.pt", older)]
    assert [code for code, _ in outputs] == [0, 0], outputs
    assert outputs[0][1] == outputs[1][1] and len(outputs[1][1].splitlines()) == 8


def test_no_tensorboard_folder_without_the_flag(runs: dict) -> None:
    assert not (runs["resnet18"] / "tb").exists()


def test_bad_batch_is_a_one_line_usage_error(tmp_path: Path) -> None:
    code, output = _run("export", "--checkpoint", tmp_path / "x.pt", "--format", "onnx", "--out", tmp_path / "m.onnx",
                        "--batch", "0")
    assert code == 2 and len(output.strip().splitlines()) == 1 and "--batch" in output


def test_predict_from_onnx_without_sidecar_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"not a model")
    code, output = _run("predict", "--checkpoint", tmp_path / "m.onnx", tmp_path)
    assert code == 1 and len(output.strip().splitlines()) == 1 and "m.onnx.json" in output


def test_predict_refuses_an_embedding_export(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"x")
    (tmp_path / "m.onnx.json").write_text(json.dumps({"format": "dali-trainer-export", "output": "embedding",
                                                      "classes": ["a", "b"], "spec": {"image_size": 32}}))
    code, output = _run("predict", "--checkpoint", tmp_path / "m.onnx", tmp_path)
    assert code == 1 and len(output.strip().splitlines()) == 1 and "--embedding" in output


@pytest.mark.parametrize("module,extra", [("onnxruntime", "export"), ("tensorboard", "tb")])
def test_missing_extra_names_the_install_command(module: str, extra: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.extras import require

    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError, as when not installed
    with pytest.raises(TrainerError, match=rf"pip install 'dali-trainer\[{extra}\]'"):
        require(module, extra, "this")


def test_onnx_predict_without_onnxruntime_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "m.onnx").write_bytes(b"x")
    (tmp_path / "m.onnx.json").write_text(json.dumps({"format": "dali-trainer-export", "output": "logits",
                                                      "classes": ["a", "b"], "spec": {"image_size": 32}}))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, output = _run("predict", "--checkpoint", tmp_path / "m.onnx", tmp_path)
    assert code == 1 and output.strip() == ("Error: running ONNX models needs the onnxruntime package: "
                                            "pip install 'dali-trainer[export]'")
