"""The `trainer` command: parse, build, call, and report any failure in one line.

No training logic lives here; each command hands over to a module that owns it.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

from dali_pipes import LoaderError, OutputError, PackError, plural
from trainer.cli_usage import HELP_OPTIONS, TrainerGroup
from trainer.config import BACKEND_HELP, DEVICE_HELP, FORCE_HELP, TTA_HELP, TTA_MODES, WORKERS_HELP, run_options
from trainer.errors import RunInterrupted, TrainerError
from trainer.verification import MAX_ALL_PAIRS, SAMPLED_PAIRS

F = TypeVar("F", bound=Callable[..., Any])

# Exceptions whose message is already a sentence for the user; anything else gets its
# type named too, and a pointer to --debug.
USER_ERRORS: tuple[type[BaseException], ...] = (PackError, LoaderError, OutputError, TrainerError)
CHECKPOINT_HELP = "best.pt or last.pt of a run, or the run's folder (its best.pt)."


def one_line_errors(func: F) -> F:
    """Add `--debug` and turn exceptions into one `error: ...` line with exit status 1."""

    @click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
    @functools.wraps(func)
    def wrapper(*args: Any, debug: bool, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except RunInterrupted as exc:
            click.echo(str(exc), err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - the whole point is one line for any failure
            if debug:
                raise
            if isinstance(exc, USER_ERRORS):
                message = str(exc)
            elif isinstance(exc, OSError) and exc.strerror:
                message = f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror}"
            else:
                text = str(exc).splitlines()[0] if str(exc) else ""
                message = f"{type(exc).__name__}: {text} (run with --debug for the traceback)"
            raise click.ClickException(message) from None

    return wrapper  # type: ignore[return-value]


@click.group(cls=TrainerGroup, context_settings={**HELP_OPTIONS, "max_content_width": 100})
@click.version_option(package_name="dali-trainer")
def main() -> None:
    """Train and evaluate image classifiers on HDF5 packs, fed by DALI or torchvision pipelines."""
    _show_pipeline_log()


def _show_pipeline_log() -> None:
    """dali_pipes' notes (the backend `auto` chose, skipped images) on stderr, one plain line each."""
    import logging

    logger = logging.getLogger("dali_pipes")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


@main.command()
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--cache-size", type=click.IntRange(min=8),
              help="Also say what `trainer run --cache ram|device --cache-size N` would hold (JSON: cache).")
@one_line_errors
def info(pack: Path, as_json: bool, cache_size: int | None) -> None:
    """Counts per split and class, image sizes and rejected files of PACK."""
    from dali_pipes import PackReader
    from trainer.info import format_summary, pack_summary

    summary = pack_summary(PackReader(pack), cache_size)
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo("\n".join(format_summary(summary)))


@main.command(context_settings={"show_default": False})
@run_options
@click.option("--config", "config_file", metavar="FILE|RECIPE",
              help="YAML or JSON file of option names to values, or the name of a shipped recipe (`trainer recipes` "
                   "lists them); command-line options win. config.json records it as `recipe`.")
@click.option("--resume", type=click.Path(path_type=Path),
              help="Continue the run in this folder from its last.pt (its config.json, overridden by options given "
                   "here).")
@click.option("--reschedule", is_flag=True,
              help="With --resume and another --epochs: plan the learning-rate schedule over the new --epochs (by "
                   "default it keeps its planned length).")
@click.option("--nproc", type=click.IntRange(min=1), default=1,
              help="Processes on this machine: launches torchrun with DDP (one per GPU; gloo on the CPU).")
@one_line_errors
def run(config_file: str | None, resume: Path | None, reschedule: bool, nproc: int, **options: Any) -> None:
    """Train a classifier on a pack: fine-tuning, frozen blocks, early stopping, top-k metrics.

    \b
    Examples:
      trainer run --pack pack.h5 --arch mobilenet_v2 --freeze 10 --head mlp --optimizer adamw
      trainer run --pack pack.h5 --config fast --epochs 30
    """
    from trainer.config import build_config
    from trainer.config_files import load_config
    from trainer.distributed import destroy_process_group, env_context, init_process_group, resolve_device
    from trainer.resume import resume_values
    from trainer.run import fit
    from trainer.run_folder import default_out_dir, discard_untrained, prepare_out_dir

    file_values = load_config(config_file) if config_file else {}
    if resume is not None:
        file_values = resume_values(resume, file_values)
    cfg = build_config(options, file_values)
    if nproc > 1 and "RANK" not in os.environ:
        from trainer.preflight import preflight

        preflight(cfg, nproc, resume)  # one line here, rather than once per rank and a torchrun traceback
        sys.exit(launch_torchrun(cfg, nproc, resume, reschedule))
    ctx = env_context()
    device = resolve_device(cfg.device, ctx)
    init_process_group(ctx, device)
    try:
        if not cfg.out:
            # Every rank must write to the folder rank 0 named (their clocks may differ).
            cfg = cfg.replace(out=str(ctx.broadcast_object(str(default_out_dir(cfg.arch)))))
        fresh = ctx.is_main and not Path(cfg.out).exists()
        if ctx.is_main:
            prepare_out_dir(Path(cfg.out), resume is not None)
        try:
            ctx.barrier()
            fit(cfg, ctx, device, resume=resume is not None, reschedule=reschedule, echo=click.echo)
        except BaseException:
            if fresh:  # a run that failed before its first checkpoint leaves no folder behind
                discard_untrained(Path(cfg.out))
            raise
    finally:
        destroy_process_group()


@main.command()
@one_line_errors
def recipes() -> None:
    """The recipes shipped with the trainer, for `trainer run --config NAME`: name and what each is.

    \b
    Example:
      trainer run --pack pack.h5 --config fast --epochs 30
    """
    from trainer.config_files import shipped_recipes

    listed = shipped_recipes()
    width = max(map(len, listed), default=0)
    for name, description in listed.items():
        click.echo(f"{name:{width}}  {description}")


def tta_option(func: F) -> F:
    """--tta for the inference commands; the default is the checkpoint's own (its run's --tta)."""
    return click.option("--tta", type=click.Choice(TTA_MODES), default=None,
                        help=TTA_HELP + " [default: the checkpoint's, as its run validated]")(func)


def launch_torchrun(cfg: Any, nproc: int, resume: Path | None, reschedule: bool = False) -> int:
    """Re-run this command under `torchrun --standalone --nproc_per_node=nproc` with the resolved config."""
    import subprocess
    import tempfile

    from trainer.run_folder import default_out_dir

    if not cfg.out:
        cfg = cfg.replace(out=str(default_out_dir(cfg.arch)))
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "config.json"
        config_path.write_text(json.dumps(cfg.to_dict()))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "trainer", "run", "--config", str(config_path)]
        if resume is not None:
            command += ["--resume", str(resume)]
        if reschedule:
            command.append("--reschedule")
        return subprocess.call(command)


def _eval_device(choice: str) -> Any:
    from trainer.distributed import env_context, resolve_device

    return resolve_device(choice, env_context())


def _warn(message: str) -> None:
    click.echo(message, err=True)


def loader_options(backends: tuple[str, ...] = ("auto", "dali", "torch")) -> Callable[[F], F]:
    """--split, --batch-size, --backend (one of `backends`), --workers, --device: how a command reads a pack split."""
    synthetic = " synthetic: random images, to time the model alone." if "synthetic" in backends else ""
    options = [
        click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]),
                     help="Split of the pack to read."),
        click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
                     help="Images per batch."),
        click.option("--backend", default="auto", show_default=True, type=click.Choice(backends),
                     help=BACKEND_HELP + synthetic),
        click.option("--workers", type=click.IntRange(min=0), help=WORKERS_HELP),
        click.option("--device", default="auto", show_default=True, help=DEVICE_HELP),
    ]

    def decorate(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


@main.command("eval")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help=CHECKPOINT_HELP)
@click.option("--pack", required=True, type=click.Path(path_type=Path),
              help="Pack with the same classes as the checkpoint.")
@loader_options(backends=("auto", "dali", "torch", "synthetic"))
@click.option("--topk", default=5, show_default=True, type=click.IntRange(min=1),
              help="Report top-1 .. top-k accuracy.")
@click.option("--out", type=click.Path(path_type=Path), help="Folder for the confusion-matrix PNG.")
@tta_option
@click.option("--force", is_flag=True, help=FORCE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@one_line_errors
def eval_command(checkpoint: Path, pack: Path, split: str, topk: int, batch_size: int, backend: str,
                 workers: int | None, device: str, out: Path | None, tta: str | None, force: bool,
                 as_json: bool) -> None:
    """Top-1..top-k accuracy, loss and per-class accuracy of a checkpoint on a pack split."""
    from trainer.evaluation import evaluate_checkpoint, format_eval

    result, plot = evaluate_checkpoint(checkpoint, pack, split=split, topk=topk, batch_size=batch_size,
                                       backend=backend, device=_eval_device(device), workers=workers, out=out,
                                       force=force, warn=_warn, tta=tta)
    click.echo(json.dumps(result) if as_json else "\n".join(format_eval(result)))
    if plot is not None:  # after the figures: a failed write loses only the picture
        plot.write()


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="best.pt or last.pt of a run, the run's folder (its best.pt), or a .onnx file from `trainer export` "
                   "(run by onnxruntime on the CPU).")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--topk", default=5, show_default=True, type=click.IntRange(min=1), help="Classes to list per image.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@tta_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image, one per line.")
@one_line_errors
def predict(checkpoint: Path, inputs: tuple[Path, ...], topk: int, device: str, tta: str | None,
            as_json: bool) -> None:
    """Top-k classes with probabilities for each IMAGE_OR_DIR, with the checkpoint's own preprocessing."""
    from trainer.evaluation import predict_files

    results = predict_files(checkpoint, inputs, topk=topk, device=_eval_device(device), warn=_warn, tta=tta)
    for r in results:
        if as_json:
            click.echo(json.dumps(r))
        else:
            click.echo(f"{r['path']}: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"]))
    if not results:
        raise TrainerError("none of the given images could be read")


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help=CHECKPOINT_HELP + " Any head.")
@click.option("--pack", type=click.Path(path_type=Path), help="Embed a split of this pack (with labels and paths).")
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="FILE.h5 (HDF5), or FILE.npy with FILE.json beside it.")
@loader_options()
@tta_option
@click.option("--force", is_flag=True, help=FORCE_HELP)
@one_line_errors
def embed(checkpoint: Path, pack: Path | None, split: str, inputs: tuple[Path, ...], out: Path, batch_size: int,
          backend: str, workers: int | None, device: str, tta: str | None, force: bool) -> None:
    """L2-normalized embeddings of a pack split (--pack P --split S) or of image PATHS, written to --out.

    Margin heads give their embedding; linear and mlp heads their penultimate features.
    """
    from trainer.embedding import embed_command

    result = embed_command(checkpoint, out, pack=pack, split=split if pack is not None else None, inputs=inputs,
                           device=_eval_device(device), batch_size=batch_size, backend=backend, workers=workers,
                           warn=_warn, force=force, tta=tta)
    click.echo(f"wrote {plural(result['num_embeddings'], 'embedding')} of dimension {result['dim']} "
               f"to {', '.join(result['files'])}")


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help=CHECKPOINT_HELP + " Any head.")
@click.option("--pack", required=True, type=click.Path(path_type=Path),
              help="Pack whose split holds the identities to verify.")
@loader_options()
@click.option("--pairs", "pairs_file", type=click.Path(path_type=Path),
              help="File of path_a,path_b,same lines (paths relative to the packed folder, absolute, or relative to "
                   "the working directory); default: all pairs.")
@click.option("--num-pairs", type=click.IntRange(min=1),
              help=f"Sample this many genuine and as many impostor pairs without replacement (a kind with fewer is "
                   f"taken whole) instead of scoring all pairs. Default: all pairs, up to {MAX_ALL_PAIRS:,}; above "
                   f"that {SAMPLED_PAIRS:,} of each kind are sampled.")
@click.option("--seed", default=0, show_default=True, help="Seed of the sampled pairs and of the 10 folds.")
@click.option("--out", type=click.Path(path_type=Path), help="Folder for roc.png.")
@tta_option
@click.option("--force", is_flag=True, help=FORCE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@one_line_errors
def verify(checkpoint: Path, pack: Path, split: str, pairs_file: Path | None, num_pairs: int | None, seed: int,
           batch_size: int, backend: str, workers: int | None, device: str, out: Path | None, tta: str | None,
           force: bool, as_json: bool) -> None:
    """Face verification (AUC, EER, 10-fold accuracy, TAR@FAR) and rank-1/5 identification on a pack split."""
    from trainer.embedding import format_verification, verify_command

    figures = verify_command(checkpoint, pack, split=split, pairs_file=pairs_file, num_pairs=num_pairs, seed=seed,
                             device=_eval_device(device), batch_size=batch_size, backend=backend, workers=workers,
                             out=out, force=force, tta=tta)
    click.echo(json.dumps(figures) if as_json else "\n".join(format_verification(figures)))


def _batch_choice(value: str) -> int | None:
    if value == "dynamic":
        return None
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise click.BadParameter(f"{value!r} is neither 'dynamic' nor a positive integer", param_hint="'--batch'")


@main.command("export")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help=CHECKPOINT_HELP)
@click.option("--format", "fmt", required=True, type=click.Choice(["onnx", "torchscript"]),
              help="onnx (opset 18, torch.export-based exporter) or torchscript (traced).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Model file to write; its sidecar is FILE.json (preprocessing spec, classes, verification).")
@click.option("--batch", default="dynamic", show_default=True,
              help="dynamic, or a fixed batch size N (ONNX's input shape; TorchScript traces with N).")
@click.option("--embedding", is_flag=True,
              help="Export the embedding output of a margin-head (arcface/cosface) model instead of logits.")
@click.option("--pack", type=click.Path(path_type=Path),
              help="Verify on a few of this pack's images (default: a seeded random batch).")
@click.option("--force", is_flag=True, help=FORCE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the sidecar as one JSON object.")
@one_line_errors
def export_command(checkpoint: Path, fmt: str, out: Path, batch: str, embedding: bool, pack: Path | None,
                   force: bool, as_json: bool) -> None:
    """Export a checkpoint to ONNX or TorchScript, in eval mode, checked against PyTorch's outputs.

    \b
    Example:
      trainer export --checkpoint runs/r/best.pt --format onnx --out model.onnx --pack pack.h5
    """
    from trainer.export import export_checkpoint
    from trainer.inference import sidecar_path

    result = export_checkpoint(checkpoint, out, fmt=fmt, batch=_batch_choice(batch), embedding=embedding, pack=pack,
                               force=force)
    if as_json:
        click.echo(json.dumps(result))
        return
    check = result["verification"]
    shape = "dynamic batch" if result["input"]["shape"][0] == "batch" else f"batch {result['input']['shape'][0]}"
    compared = "max abs diff of the L2-normalized embeddings" if check["l2_normalized"] else "max abs diff"
    click.echo(f"wrote {out} ({fmt}, {result['output']}, {shape}) and {sidecar_path(out)}; outputs match PyTorch "
               f"within {check['max_abs_diff']:.1e} ({compared}, tolerance {check['tolerance']:g}) on "
               f"{check['inputs']} via {check['runtime']}")


if __name__ == "__main__":
    main()
