"""Faces through the trainer: face backbones, sub-centres, Partial FC over ranks and world sizes, export, the recipe."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import make_pack
from torch import nn

from dali_pipes import PackReader, PipelineSpec
from tools.make_demo_dataset import make_demo_dataset
from tools.pack_dataset import main as pack_main
from trainer.checkpoint import load_checkpoint, read_payload, save_checkpoint
from trainer.cli import main as trainer_main
from trainer.config import build_config
from trainer.distributed import DistContext
from trainer.face_backbones import face_backbone
from trainer.inference import load_torchscript
from trainer.loop import StepConfig, top1_correct, train_step
from trainer.margin_heads import MarginHead
from trainer.margins import margin_target
from trainer.models import FaceClassifier, HeadConfig, build_model, embed
from trainer.partial_fc import grad_norm
from trainer.resume import restore_state
from trainer.run import wrap_model
from trainer.state import build_state

REPO = Path(__file__).resolve().parents[1]
LOADER = ["--backend", "torch", "--workers", "0"]


def _cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(trainer_main, [str(a) for a in args])
    return result.exit_code, result.output


# --- options ----------------------------------------------------------------------------------------------------------


def test_face_architectures_default_to_their_size_and_no_weights() -> None:
    face = build_config({"pack": "p.h5", "arch": "mobilefacenet"})
    assert (face.image_size, face.weights) == (112, "none")
    plain = build_config({"pack": "p.h5", "arch": "resnet18"})
    assert (plain.image_size, plain.weights) == (224, "imagenet")  # unchanged for torchvision models
    assert build_config({"pack": "p.h5", "arch": "iresnet50", "weights": "w.pt"}).weights == "w.pt"


@pytest.mark.parametrize("args, message", [
    (["--arch", "mobilefacenet", "--image-size", "224"], "--arch mobilefacenet takes 112 x 112 aligned faces"),
    (["--arch", "iresnet18", "--weights", "imagenet"], "--arch iresnet18 has no ImageNet weights"),
    (["--subcenters", "3"], "--subcenters needs a margin head (--head arcface or cosface), not --head linear"),
    (["--head", "mlp", "--sample-rate", "0.5"], "--sample-rate needs a margin head"),
    (["--head", "arcface", "--sample-rate", "0"], "--sample-rate is a share of the classes in (0, 1], got 0.0"),
    (["--head", "arcface", "--sample-rate", "1.5"], "--sample-rate is a share of the classes in (0, 1], got 1.5"),
    (["--std", "0.5,0,0.5"], "--std needs three positive values"),
    (["--mean", "0.5,0.5"], "expected 3 comma-separated numbers"),
    (["--rotation", "200"], "--rotation is at most 180 degrees"),
])
def test_face_options_are_one_line_errors_before_any_work(tmp_path: Path, args: list[str], message: str) -> None:
    # The pack does not exist: the option's own error comes first, before anything is read or written.
    code, output = _cli("run", "--pack", tmp_path / "missing.h5", "--out", tmp_path / "r", *args)
    assert code != 0 and message in output and len(output.strip().splitlines()) == 1, output
    assert not (tmp_path / "r").exists()


def test_label_smoothing_is_refused_with_a_sharded_head(tmp_path: Path) -> None:
    pack = make_pack(tmp_path, classes=3, per_class=5, seed=1, min_size=32, max_size=36)
    code, output = _cli("run", "--pack", pack, "--arch", "resnet18", "--weights", "none", "--image-size", 32, "--head",
                        "cosface", "--sample-rate", "0.5", "--label-smoothing", "0.1", "--batch-size", 4, "--out",
                        tmp_path / "r", *LOADER)
    assert code != 0 and "--label-smoothing is not supported by a sharded cosface head" in output
    assert len(output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


# --- models -----------------------------------------------------------------------------------------------------------


def test_margin_head_sits_directly_on_a_face_backbones_embedding() -> None:
    torch.manual_seed(0)
    model = build_model("mobilefacenet", 5, head=HeadConfig(type="arcface", embedding_dim=24, subcenters=3)).eval()
    head_keys = [k for k in model.state_dict() if not k.startswith("backbone.")]
    assert head_keys == ["head.centres"] and model.head.centres.shape == (15, 24)  # no extra linear + batch norm
    reference = face_backbone("mobilefacenet", 24)
    reference.load_state_dict({k[len("backbone."):]: v for k, v in model.state_dict().items() if k != "head.centres"})
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference.eval()(images)
        assert torch.allclose(embed(model, images), expected, atol=1e-5)  # the embedding is the backbone's output
        cosines = F.normalize(expected) @ F.normalize(model.head.centres).T
        assert torch.allclose(model(images), 64.0 * cosines.view(2, 5, 3).max(dim=2).values, atol=1e-3)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_linear_and_mlp_heads_read_a_face_backbones_embedding(kind: str) -> None:
    torch.manual_seed(0)
    model = build_model("mobilefacenet", 4, head=HeadConfig(type=kind, embedding_dim=24, hidden=8)).eval()
    assert isinstance(model, FaceClassifier)
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, features = model(images), embed(model, images)
        last = model.fc if kind == "linear" else model.fc[-1]
        assert logits.shape == (2, 4) and torch.allclose(last(features), logits, atol=1e-5)
        if kind == "linear":  # the penultimate features are the face embedding
            assert torch.allclose(features, model.backbone(images), atol=1e-6)


def _todays_logits(head: MarginHead, embedding: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The margin head before sub-centres, written out: cosines of the normalized vectors, clamped, margin on the
    true class in training."""
    cosines = F.linear(F.normalize(embedding), F.normalize(head.centres)).clamp(-1.0, 1.0)
    if labels is None:
        return head.scale * cosines
    true = cosines.gather(1, labels.view(-1, 1))
    return head.scale * cosines.scatter(1, labels.view(-1, 1), margin_target(true, head.kind, head.margin))


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_one_subcenter_is_exactly_todays_head(kind: str) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 6, head=HeadConfig(type=kind, embedding_dim=8))
    assert model.head.centres.shape == (6, 8)  # the key and shape checkpoints always had
    head = model.head
    features = torch.randn(5, 512, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 3, 5, 3, 1])
    head.embedding[1].eval()
    ours = head(features, labels)
    ours.logsumexp(1).sum().backward()
    grads = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    _todays_logits(head, head.embedding(features), labels).logsumexp(1).sum().backward()
    assert torch.allclose(ours, _todays_logits(head, head.embedding(features), labels), atol=1e-5)
    assert all(torch.allclose(a, p.grad, atol=1e-5) for a, p in zip(grads, head.parameters()))
    head.eval()
    assert torch.allclose(head(features), _todays_logits(head, head.embedding(features), None), atol=1e-5)


# --- Partial FC in one process, through the CLI ----------------------------------------------------------------------


@pytest.mark.slow
def test_sampled_head_trains_resumes_unsharded_and_records_its_options(tmp_path: Path) -> None:
    pack = make_pack(tmp_path, classes=4, per_class=6, seed=2, min_size=32, max_size=40)
    out = tmp_path / "run"
    run = ["run", "--pack", pack, "--arch", "resnet18", "--weights", "none", "--image-size", 32, "--head", "cosface",
           "--embedding-dim", 8,
           "--subcenters", 2, "--batch-size", 4, "--scheduler", "poly", "--rotation", 0, "--mean", "0.5,0.5,0.5",
           "--std", "0.25,0.5,0.5", "--out", out, *LOADER]
    code, output = _cli(*run, "--epochs", 1, "--sample-rate", "0.5")
    assert code == 0, output
    ckpt = read_payload(load_checkpoint(out / "last.pt"))
    assert ckpt.model["head.centres"].shape == (8, 8) and ckpt.head["subcenters"] == 2  # 4 classes x 2, whole
    assert (ckpt.spec["rotation_degrees"], ckpt.spec["mean"], ckpt.spec["std"]) == (0.0, [0.5] * 3, [0.25, 0.5, 0.5])
    assert ckpt.config["sample_rate"] == 0.5 and ckpt.config["scheduler"] == "poly"
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.0 <= record["train_top1"] <= 1.0 and record["val_loss"] > 0  # closed-set validation of the sampled head
    code, output = _cli("run", "--resume", out, "--epochs", 2, "--sample-rate", 1)  # the unsharded head goes on
    assert code == 0, output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    code, output = _cli("run", "--resume", out, "--epochs", 3, "--subcenters", 3)
    assert code != 0 and "--subcenters 3 differs from the checkpoint's 2" in output


# --- export -----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedding_export_of_a_face_model_holds_no_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    classes = [f"id{i}" for i in range(300)]
    head = HeadConfig(type="arcface", embedding_dim=16, subcenters=2)
    model = build_model("mobilefacenet", len(classes), head=head)
    spec = PipelineSpec(image_size=112, mean=(0.5,) * 3, std=(0.5,) * 3)
    save_checkpoint(tmp_path / "c.pt", {"model": model.state_dict(), "classes": classes, "arch": "mobilefacenet",
                                        "epoch": 0, "config": {}, "head": head.to_dict(), "spec": spec.to_dict()})
    code, output = _cli("export", "--checkpoint", tmp_path / "c.pt", "--format", "torchscript", "--out",
                        tmp_path / "e.pt", "--embedding")
    assert code == 0, output
    exported = load_torchscript((tmp_path / "e.pt").read_bytes())
    shapes = [tuple(t.shape) for t in exported.state_dict().values()]
    assert (600, 16) not in shapes and len(shapes) == len(face_backbone("mobilefacenet", 16).state_dict())
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(exported(images), model.eval().backbone(images), atol=1e-4)


@pytest.mark.slow
def test_an_embedding_of_any_scale_exports_when_its_directions_match(tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")  # the export extra
    # A run's last batch norm can leave an embedding of norm ~1e3 or more (its running variance small); consumers
    # L2-normalize it, so the export is checked on directions: float32 rounding at that scale exceeds 1e-3 as is.
    torch.manual_seed(0)
    head = HeadConfig(type="arcface", embedding_dim=16)
    model = build_model("resnet18", 3, head=head)
    with torch.no_grad():
        model.head.embedding[1].weight.mul_(1e6)
    spec = PipelineSpec(image_size=32)
    save_checkpoint(tmp_path / "c.pt", {"model": model.state_dict(), "classes": ["a", "b", "c"], "arch": "resnet18",
                                        "epoch": 0, "config": {}, "head": head.to_dict(), "spec": spec.to_dict()})
    code, output = _cli("export", "--checkpoint", tmp_path / "c.pt", "--format", "onnx", "--out", tmp_path / "e.onnx",
                        "--embedding")
    assert code == 0 and "max abs diff of the L2-normalized embeddings" in output, output
    verification = json.loads((tmp_path / "e.onnx.json").read_text())["verification"]
    assert verification["l2_normalized"] is True and verification["max_abs_diff"] <= 1e-3
    session = onnxruntime.InferenceSession(str(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"])
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    (got,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = embed(model.eval(), images)
    assert expected.abs().max() > 1e4  # the scale that an absolute check would have refused
    assert torch.allclose(F.normalize(torch.from_numpy(got)), F.normalize(expected), atol=1e-5)


# --- Partial FC over two gloo processes, at the trainer's level -------------------------------------------------------

WORLD = 2
NUM_CLASSES, BATCH, STEPS, SAVED_AFTER = 7, 6, 3, 2  # 7 classes: shards of 4 and 3 classes
CFG = {"pack": "unused.h5", "arch": "resnet18", "weights": "none", "image_size": 32, "head": "arcface",
       "embedding_dim": 16, "subcenters": 2, "scale": 16.0, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
       "weight_decay": 5e-4, "grad_clip": 0.05, "seed": 3}
CLASSES = [str(c) for c in range(NUM_CLASSES)]


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batches: rank r takes rows r * BATCH ... (r + 1) * BATCH, one process all of them."""
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(WORLD * BATCH, 3, 32, 32, generator=g),
             torch.randint(0, NUM_CLASSES, (WORLD * BATCH,), generator=g)) for _ in range(STEPS)]


def _state(distributed: bool):  # noqa: ANN202 - a TrainingState
    """The run's state, training, with every batch norm at rest: each sample's output then depends on that sample
    alone, so two ranks of half a batch compute what one process does with all of it."""
    state = build_state(build_config(CFG), NUM_CLASSES, torch.device("cpu"), distributed=distributed)
    state.model.train()
    for module in state.model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return state


def _train(state, model: nn.Module, batches: list, rows: slice) -> list[tuple[float, int]]:  # noqa: ANN001
    """Train steps through the loop's own step; each step's loss and top-1 count."""
    step = StepConfig(nn.CrossEntropyLoss(), None, state.scaler, grad_clip=CFG["grad_clip"], with_labels=True)
    results = []
    for images, labels in batches:
        loss, output, _ = train_step(model, state.optimizer, images[rows], labels[rows], step)
        results.append((loss.item(), int(top1_correct(output, labels[rows]))))
    return results


def _payload(state) -> dict:  # noqa: ANN001
    return state.payload(build_config(CFG), CLASSES, PipelineSpec(image_size=32), epoch=0)


def _worker(rank: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    batches, rows, ctx = _batches(), slice(rank * BATCH, (rank + 1) * BATCH), DistContext(rank, WORLD)
    state = _state(distributed=True)
    model = wrap_model(state.model, build_config(CFG), ctx, torch.device("cpu"))
    result = {"rows": state.model.head.centres.shape[0], "steps": _train(state, model, batches[:SAVED_AFTER], rows)}
    saved = _payload(state)  # every rank calls it: the centres are gathered to rank 0
    if rank == 0:  # written at once, as the run does: the payload holds the live backbone tensors, not copies
        save_checkpoint(Path(folder, "two.pt"), saved)
    result["steps"] += _train(state, model, batches[SAVED_AFTER:], rows)
    final = _payload(state)
    resumed = _state(distributed=True)  # from the one-process checkpoint, onto two ranks
    restore_state(resumed, read_payload(load_checkpoint(Path(folder, "one.pt"))), [])
    resumed_model = wrap_model(resumed.model, build_config(CFG), ctx, torch.device("cpu"))
    result["resumed_steps"] = _train(resumed, resumed_model, batches[SAVED_AFTER:], rows)
    resumed_final = _payload(resumed)
    if rank == 0:
        result.update(final=final["model"], resumed_final=resumed_final["model"])
    torch.save(result, Path(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[dict]]:
    """One process trains the unsharded head (saving one.pt after SAVED_AFTER steps); then two gloo processes train
    the sharded head on the same global batches (saving two.pt), and resume one.pt."""
    folder = tmp_path_factory.mktemp("pfc_run")
    batches = _batches()
    one = _state(distributed=False)
    images, labels = batches[0]
    F.cross_entropy(one.model(images, labels), labels).backward()
    first_norm = float(grad_norm(one.model))  # the clip must act, or a wrong norm could not show
    one.optimizer.zero_grad(set_to_none=True)
    steps = _train(one, one.model, batches[:SAVED_AFTER], slice(None))
    save_checkpoint(folder / "one.pt", _payload(one))
    steps += _train(one, one.model, batches[SAVED_AFTER:], slice(None))
    reference = {"steps": steps, "model": one.model.state_dict(), "first_norm": first_norm}
    mp.spawn(_worker, args=(str(folder),), nprocs=WORLD, join=True)
    return folder, reference, [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_same_weights(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    for key, value in ours.items():
        assert value.shape == theirs[key].shape, key
        assert torch.allclose(value.float(), theirs[key].float(), atol=2e-5), (key, (value - theirs[key]).abs().max())


@pytest.mark.slow
def test_two_processes_at_rate_one_train_as_one_process(worlds: tuple[Path, dict, list[dict]]) -> None:
    _, reference, ranks = worlds
    assert reference["first_norm"] > 4 * CFG["grad_clip"]
    assert [r["rows"] for r in ranks] == [8, 6]  # each rank holds its classes' 2 sub-centres only
    for step, (loss, correct) in enumerate(reference["steps"]):
        assert all(r["steps"][step][0] == pytest.approx(loss, rel=1e-5) for r in ranks), step
        assert sum(r["steps"][step][1] for r in ranks) == correct, step  # train top-1: the ranks' rows add up
    _assert_same_weights(ranks[0]["final"], reference["model"])


@pytest.mark.slow
def test_checkpoint_holds_the_unsharded_heads_keys_and_shapes(worlds: tuple[Path, dict, list[dict]]) -> None:
    folder, _, _ = worlds
    one, two = load_checkpoint(folder / "one.pt"), load_checkpoint(folder / "two.pt")
    assert two["model"]["head.centres"].shape == (NUM_CLASSES * 2, 16)
    _assert_same_weights(two["model"], one["model"])
    # The centres' momentum, gathered whole too: a resume on any world size continues exactly.
    assert one["optimizer"]["state"].keys() == two["optimizer"]["state"].keys()
    for index, state in one["optimizer"]["state"].items():
        theirs = two["optimizer"]["state"][index]["momentum_buffer"]
        assert theirs.shape == state["momentum_buffer"].shape
        assert torch.allclose(theirs, state["momentum_buffer"], atol=2e-5), index


@pytest.mark.slow
def test_resume_under_another_world_size_is_exact(worlds: tuple[Path, dict, list[dict]]) -> None:
    folder, reference, ranks = worlds
    later = reference["steps"][SAVED_AFTER:]
    for step, (loss, correct) in enumerate(later):  # one process's checkpoint, resumed on two
        assert all(r["resumed_steps"][step][0] == pytest.approx(loss, rel=1e-5) for r in ranks), step
        assert sum(r["resumed_steps"][step][1] for r in ranks) == correct
    _assert_same_weights(ranks[0]["resumed_final"], reference["model"])
    one = _state(distributed=False)  # two processes' checkpoint, resumed on one
    restore_state(one, read_payload(load_checkpoint(folder / "two.pt")), [])
    assert [loss for loss, _ in _train(one, one.model, _batches()[SAVED_AFTER:], slice(None))] == pytest.approx(
        [loss for loss, _ in later], rel=1e-5)
    _assert_same_weights(one.model.state_dict(), reference["model"])


# --- the README's faces flow, at toy size -----------------------------------------------------------------------------


def _trainer(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=1800, env=dict(os.environ))


@pytest.mark.slow
def test_faces_from_a_landmarks_csv_to_verification(tmp_path: Path) -> None:
    # The README's flow: synthetic landmarks -> aligned pack -> mobilefacenet with the face recipe, sub-centres and
    # Partial FC on 2 processes -> verification on unseen identities -> resumed on 1 process.
    make_demo_dataset(tmp_path / "faces", classes=8, per_class=5, seed=0, min_size=60, max_size=90, png_every=0,
                      landmarks=tmp_path / "landmarks.csv")
    result = CliRunner().invoke(pack_main, [str(tmp_path / "faces"), str(tmp_path / "faces.h5"), "--split-by", "class",
                                            "--val-ratio", "0.25", "--test-ratio", "0.25", "--landmarks",
                                            str(tmp_path / "landmarks.csv"), "--align", "112", "--workers", "1",
                                            "--quiet"])
    assert result.exit_code == 0, result.output
    reader = PackReader(tmp_path / "faces.h5")
    assert set(reader.heights) == set(reader.widths) == {112}  # aligned crops
    out = tmp_path / "run"
    run = _trainer("run", "--pack", tmp_path / "faces.h5", "--config", "face", "--arch", "mobilefacenet", "--head",
                   "arcface", "--subcenters", 3, "--nproc", 2, "--sample-rate", 0.5, "--embedding-dim", 32,
                   "--batch-size", 4, "--epochs", 1, "--warmup-epochs", 0.5, "--log-every", 1, *LOADER, "--out", out)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "world size 2" in run.stdout and "test verification auc" in run.stdout
    ckpt = read_payload(load_checkpoint(out / "best.pt"))
    assert ckpt.model["head.centres"].shape == (8 * 3, 32) and ckpt.head["subcenters"] == 3
    assert ckpt.spec["mean"] == [0.5] * 3 and ckpt.spec["rotation_degrees"] == 0.0
    assert (ckpt.config["optimizer"], ckpt.config["scheduler"], ckpt.config["monitor"]) == ("sgd", "poly", "val_auc")
    summary = json.loads((out / "summary.json").read_text())
    code, output = _cli("verify", "--checkpoint", out / "best.pt", "--pack", tmp_path / "faces.h5", "--json", *LOADER)
    assert code == 0, output
    figures = json.loads(output.splitlines()[-1])
    assert figures["auc"] == pytest.approx(summary["test_auc"], abs=1e-6) and not math.isnan(figures["auc"])
    code, output = _cli("run", "--resume", out, "--epochs", 2)  # one process, the head whole
    assert code == 0, output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
