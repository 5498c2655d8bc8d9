"""The run configuration: one frozen dataclass, the single source of every option and default.

The click options of `trainer run` are generated from the fields below, so a name, a
default, a choice list or a help text is written once. Values come from, in rising
priority: the defaults here, an optional YAML/JSON file or shipped recipe (`--config`,
read by `trainer.config_files`), the command line.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import click

from dali_pipes.spec import CROP_RATIO, DEFAULT_IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, PipelineSpec, check_range
from trainer.errors import TrainerError
from trainer.face_backbones import FACE_ARCHS, FACE_INPUT_SIZE
from trainer.margins import MARGIN_HEADS
from trainer.monitor import MONITORS

# Adam applies weight decay as an L2 term inside its adaptive step, where 0.05 costs accuracy,
# so it gets PyTorch's 0; AdamW's decoupled decay keeps the usual 0.05; SGD gets torchvision's 1e-4.
DEFAULT_WEIGHT_DECAY = {"adam": 0.0, "adamw": 0.05, "sgd": 1e-4}
ARCH_HELP = (f"mobilenet_v2, resnet18, resnet50, or any torchvision classification model name; face backbones for "
             f"{FACE_INPUT_SIZE} px aligned crops: {', '.join(FACE_ARCHS)}")
HEAD_TYPES = ("linear", "mlp", *MARGIN_HEADS)  # what --head takes (trainer.models builds each)
# Help of the options `trainer run` shares with eval, embed, verify and predict (cli.loader_options);
# WORKERS_HELP also with tools/pack_dataset.py, whose worker processes decode too (`dali_pipes.default_workers`).
BACKEND_HELP = "Data backend (auto: dali on CUDA when installed, else torch)."
WORKERS_HELP = ("Worker processes that decode images (DALI: threads); 0: this process decodes. Default: the usable "
                "cores // LOCAL_WORLD_SIZE (the processes torchrun starts on this node), at least 1.")
DEVICE_HELP = "auto, cpu, cuda or cuda:N (under --nproc or torchrun: cuda, each process on the GPU of its LOCAL_RANK)."
# The one overwrite rule of every command that writes a result file (the packer, export, embed, eval and verify --out).
FORCE_HELP = "Replace output files that exist (without it, an existing output is an error)."
TTA_MODES = ("none", "flip")  # what --tta takes (trainer.tta applies each)
TTA_HELP = ("Test-time augmentation: flip averages the logits of each image and its mirror (embeddings: the sum of "
            "both normalized, as insightface).")
CACHE_MODES = ("none", "ram", "device")


def _opt(help: str, choices: tuple[str, ...] | None = None, minimum: float | None = None, flag: bool = False,
         count: int = 0, number: type = float, metavar: str | None = None, cli: bool = True) -> dict[str, Any]:
    """A field's option: help, choices, lower bound, on/off flag, `count` comma-separated numbers of type `number`
    (shown as `metavar`), and whether it is a command-line option at all."""
    return {"help": help, "choices": choices, "min": minimum, "flag": flag, "count": count, "number": number,
            "metavar": metavar, "cli": cli}


class NumberList(click.ParamType):
    """`count` comma-separated numbers (`0.35,1`); a config file may give a list. Converted to a tuple of `kind`."""

    name = "numbers"

    def __init__(self, count: int, kind: type = float) -> None:
        self.count, self.kind = count, kind

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[Any, ...]:
        items = list(value) if isinstance(value, (list, tuple)) else str(value).split(",")
        try:
            numbers = tuple(self.kind(item) for item in items)
        except (TypeError, ValueError):
            numbers = ()
        if len(numbers) != self.count:
            self.fail(f"expected {self.count} comma-separated numbers, got {value!r}", param, ctx)
        return numbers


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run; saved as config.json beside the run.

    Fields are grouped as `trainer run --help` lists them: data, model and head, optimization
    and schedule, precision and placement, validation and stopping, logging and output.
    """

    # Data
    pack: str = field(default="", metadata=_opt(
        "Pack file made by tools/pack_dataset.py. [required, unless --config or --resume gives it]"))
    image_size: int | None = field(default=None, metadata=_opt(
        f"Square input size in pixels. [default: {DEFAULT_IMAGE_SIZE}; {FACE_INPUT_SIZE}, the only size they take, for "
        "the face architectures]", minimum=8))
    rotation: float = field(default=PipelineSpec.rotation_degrees, metadata=_opt(
        "Training rotation, uniform in +-DEG degrees (0: none, as aligned faces want).", minimum=0.0, metavar="DEG"))
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN, metadata=_opt(
        "Per-channel mean subtracted from [0, 1] RGB pixels. [default: ImageNet's, 0.485,0.456,0.406]", count=3,
        metavar="R,G,B"))
    std: tuple[float, float, float] = field(default=IMAGENET_STD, metadata=_opt(
        "Per-channel std the pixels are divided by, after the mean. [default: ImageNet's, 0.229,0.224,0.225]", count=3,
        metavar="R,G,B"))
    batch_size: int = field(default=64, metadata=_opt("Batch size per process.", minimum=1))
    backend: str = field(default="auto", metadata=_opt(BACKEND_HELP, choices=("auto", "dali", "torch", "synthetic")))
    workers: int | None = field(default=None, metadata=_opt(WORKERS_HELP, minimum=0))
    seed: int = field(default=0, metadata=_opt("Seed of initialization, data order and augmentation."))
    cache: str = field(default="none", metadata=_opt(
        "Decode every image once, before the first epoch, and keep the pixels: ram (in shared memory, one copy per "
        "machine for all its processes and loader workers), device (each GPU holds its shard, staged from shared "
        "memory), none. Cached batches go through the torch path, whatever --backend says.", choices=CACHE_MODES))
    cache_size: int | None = field(default=None, metadata=_opt(
        "Short side in px of the cached images (area-averaged, aspect ratio kept, never enlarged). [default: "
        "the smallest that keeps all the run can show: --image-size (the training warp stretches each side of an "
        "image onto it) times the largest magnification of --crop-scale/--crop-ratio, sqrt(max(ratio_max, "
        "1/ratio_min) / scale_min), and at least --eval-image-size]", minimum=8))
    cache_max_gb: float | None = field(default=None, metadata=_opt(
        "Refuse a --cache larger than this many GB (its shared-memory copy, and each GPU's copy for device). "
        "[default: half the free RAM, and half the GPU's free memory]", minimum=0.0))
    # Model and head
    arch: str = field(default="mobilenet_v2", metadata=_opt(f"Model: {ARCH_HELP}."))
    weights: str | None = field(default=None, metadata=_opt(
        "imagenet (torchvision's weights), none, or a PATH to a state dict or checkpoint. [default: imagenet; none for "
        "the face architectures, which have no ImageNet weights]"))
    freeze: int = field(default=0, metadata=_opt(
        "Freeze the first N backbone blocks (MobileNetV2: features[0:N]; ResNet: stem, layer1..4).", minimum=0))
    head: str = field(default="linear", metadata=_opt(
        "Classifier head (arcface, cosface: margin heads for face verification).",
        choices=HEAD_TYPES))
    hidden: int = field(default=512, metadata=_opt("Hidden units of the mlp head.", minimum=1))
    dropout: float = field(default=0.2, metadata=_opt(
        "Dropout of the mlp head, or before a face architecture's embedding layer.", minimum=0.0))
    activation: str = field(default="relu", metadata=_opt(
        "Activation of the mlp head.", choices=("relu", "leaky_relu")))
    embedding_dim: int = field(default=512, metadata=_opt("Embedding size of the arcface/cosface head.", minimum=1))
    margin: float | None = field(default=None, metadata=_opt(
        "Margin of the arcface (angle, radians; default 0.5) or cosface (cosine; default 0.35) head.", minimum=0.0))
    scale: float = field(default=64.0, metadata=_opt("Scale of the arcface/cosface logits.", minimum=0.0))
    subcenters: int = field(default=1, metadata=_opt(
        "Sub-centres per class of the arcface/cosface head (sub-centre ArcFace, for noisy labels): a class's logit is "
        "its closest sub-centre's.", minimum=1, metavar="K"))
    sample_rate: float = field(default=1.0, metadata=_opt(
        "Partial FC, with a margin head: each step's softmax takes every class in the global batch and random others "
        "up to this share of the classes, in (0, 1]. Under --nproc the class centres are sharded over the processes "
        "at any rate.", minimum=0.0, metavar="R"))
    # Optimization and schedule
    optimizer: str = field(default="adamw", metadata=_opt("Optimizer.", choices=("adam", "adamw", "sgd")))
    lr: float = field(default=1e-3, metadata=_opt("Learning rate for the global batch.", minimum=0.0))
    weight_decay: float | None = field(default=None, metadata=_opt(
        "Weight decay (never on biases and normalization weights). [default: adam 0 as PyTorch, adamw 0.05, "
        "sgd 1e-4 as torchvision's references]", minimum=0.0))
    momentum: float = field(default=0.9, metadata=_opt("SGD momentum.", minimum=0.0))
    label_smoothing: float = field(default=0.0, metadata=_opt("Label smoothing of the loss.", minimum=0.0))
    grad_clip: float | None = field(default=None, metadata=_opt(
        "Clip the gradients' global norm to this value (default: no clipping).", minimum=0.0))
    accum_steps: int = field(default=1, metadata=_opt(
        "Gradient accumulation: one optimizer step every N batches (the global batch is --batch-size x N x "
        "processes; DDP all-reduces only at the step). Schedules and --log-every count optimizer steps.", minimum=1,
        metavar="N"))
    ema: float = field(default=0.0, metadata=_opt(
        "Keep an exponential moving average of the weights with this decay (e.g. 0.999; timm's ModelEmaV3 warm-up), "
        "updated every optimizer step and validated each epoch beside them (val_*_ema); best.pt takes the better. "
        "0: off.", minimum=0.0, metavar="DECAY"))
    epochs: int = field(default=20, metadata=_opt("Maximum number of epochs.", minimum=1))
    scheduler: str = field(default="cosine", metadata=_opt(
        "Learning-rate schedule (poly: (1 - t) ** 2 after the warm-up, insightface's for faces).",
        choices=("step", "cosine", "poly", "plateau", "none")))
    step_size: int = field(default=10, metadata=_opt(
        "Epochs between decays (step), or patience epochs (plateau).", minimum=1))
    gamma: float = field(default=0.1, metadata=_opt("Decay factor (step, plateau).", minimum=0.0))
    warmup_epochs: float = field(default=0.0, metadata=_opt("Linear warm-up length in epochs.", minimum=0.0))
    # Augmentation and image sizes
    crop_scale: tuple[float, float] | None = field(default=None, metadata=_opt(
        "Random-resized crop of each training image: its area a fraction MIN,MAX of the image's (torchvision's "
        "RandomResizedCrop scale, e.g. 0.08,1), part of the one warp. [default: off: the whole image, resized]",
        count=2, metavar="MIN,MAX"))
    crop_ratio: tuple[float, float] = field(default=CROP_RATIO, metadata=_opt(
        "Aspect-ratio range MIN,MAX (width / height) of the random-resized crop. [default: 0.75,1.333]", count=2,
        metavar="MIN,MAX"))
    color_jitter: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0), metadata=_opt(
        "Colour jitter strengths B,C,S of brightness, contrast and saturation (torchvision's ColorJitter), applied "
        "per training batch on the device. [default: 0,0,0: off]", count=3, metavar="B,C,S"))
    random_erasing: float = field(default=0.0, metadata=_opt(
        "Probability of erasing a random box of each training image to the mean colour (torchvision's "
        "RandomErasing, after normalization).", minimum=0.0, metavar="P"))
    mixup: float = field(default=0.0, metadata=_opt(
        "Mixup alpha: a mixed batch is blended with itself reversed, weight ~ Beta(alpha, alpha), with soft targets "
        "(label smoothing folded in) and train top-1 counted against the larger label; 0: off.", minimum=0.0,
        metavar="ALPHA"))
    cutmix: float = field(default=0.0, metadata=_opt(
        "CutMix alpha: a box of the reversed batch pasted in instead (half the mixed batches when --mixup is on too); "
        "0: off.", minimum=0.0, metavar="ALPHA"))
    mix_prob: float = field(default=1.0, metadata=_opt("Probability that a batch is mixed (--mixup, --cutmix).",
                                                       minimum=0.0, metavar="P"))
    progressive: int | None = field(default=None, metadata=_opt(
        "Progressive resizing: train at MIN_SIZE px first, rising linearly to --image-size over --ramp-epochs in "
        "multiples of 32 (FFCV's rule); metrics.jsonl's image_size says each epoch's. [default: off]", minimum=8,
        metavar="MIN_SIZE"))
    ramp_epochs: tuple[int, int] | None = field(default=None, metadata=_opt(
        "START,END: the epochs (counted from 1) between which --progressive rises. [default: 1,EPOCHS]", count=2,
        number=int, metavar="START,END"))
    eval_image_size: int | None = field(default=None, metadata=_opt(
        "Size validation, test and the checkpoint's preprocessing (eval, predict, export) use. [default: "
        "--image-size]", minimum=8, metavar="SIZE"))
    tta: str = field(default="none", metadata=_opt(TTA_HELP + " Used by validation and the test; summary.json "
                                                   "records it.", choices=TTA_MODES))
    # Precision and placement
    device: str = field(default="auto", metadata=_opt(DEVICE_HELP))
    amp: str = field(default="auto", metadata=_opt(
        "Mixed precision (auto: bf16 where supported, fp16 otherwise, off on CPU).",
        choices=("auto", "bf16", "fp16", "off")))
    channels_last: bool = field(default=True, metadata=_opt("Use channels_last memory format.", flag=True))
    compile: bool = field(default=False, metadata=_opt("torch.compile the model.", flag=True))
    sync_bn: bool = field(default=False, metadata=_opt(
        "Under DDP, synchronize batch-norm statistics across processes.", flag=True))
    skip_nonfinite: bool = field(default=False, metadata=_opt(
        "Skip (and count) steps whose loss or gradients are not finite, instead of stopping; costs one host sync per "
        "step.", flag=True))
    # Validation and stopping
    monitor: str = field(default="val_loss", metadata=_opt("Metric for best.pt and early stopping.", choices=MONITORS))
    patience: int = field(default=5, metadata=_opt(
        "Epochs without improvement before stopping (0: never stop early).", minimum=0))
    min_delta: float = field(default=0.0, metadata=_opt("Smallest change that counts as an improvement.", minimum=0.0))
    topk: int = field(default=5, metadata=_opt("k of the top-k accuracy reported.", minimum=1))
    # Logging and output
    log_every: int = field(default=20, metadata=_opt("Steps between host syncs for the progress line.", minimum=1))
    log_seconds: float = field(default=30.0, metadata=_opt(
        "Seconds between progress lines when the output is not a terminal (a log file); 0: every step.", minimum=0.0))
    tensorboard: bool = field(default=False, metadata=_opt(
        "Write TensorBoard logs into OUT/tb/: loss and lr every --log-every steps, the epoch metrics, one training "
        "batch (needs the tb extra).", flag=True))
    out: str = field(default="", metadata=_opt("Run folder (default: runs/<arch>-<timestamp>)."))
    # Not an option: the shipped recipe (or config file) --config named, recorded in config.json.
    recipe: str = field(default="", metadata=_opt("The recipe or config file the run started from.", cli=False))

    def __post_init__(self) -> None:
        # Resolved here, so config.json and checkpoints hold the values used.
        if self.weight_decay is None:
            object.__setattr__(self, "weight_decay", DEFAULT_WEIGHT_DECAY[self.optimizer])
        face = self.arch in FACE_ARCHS
        if self.image_size is None:
            object.__setattr__(self, "image_size", FACE_INPUT_SIZE if face else DEFAULT_IMAGE_SIZE)
        if self.weights is None:
            object.__setattr__(self, "weights", "none" if face else "imagenet")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, as written to config.json and checkpoints."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with `changes` applied and validated."""
        return validate(dataclasses.replace(self, **changes))


def config_fields() -> tuple[dataclasses.Field[Any], ...]:
    """The dataclass fields (each an option of `trainer run`, `recipe` aside)."""
    return dataclasses.fields(RunConfig)


def option_name(name: str) -> str:
    """Field name -> command-line option (`batch_size` -> `--batch-size`)."""
    return "--" + name.replace("_", "-")


def run_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a click command with one option per `RunConfig` field (defaults None = not given)."""
    for f in reversed(config_fields()):
        meta = f.metadata
        if not meta["cli"]:
            continue
        default = f.default
        shown = "" if default in ("", None) or "[default:" in meta["help"] else f" [default: {default}]"
        if meta["flag"]:
            shown = f" [default: {'on' if default else 'off'}]"
        if meta["flag"]:
            decls = [f"{option_name(f.name)}/--no-{f.name.replace('_', '-')}"]
            func = click.option(*decls, f.name, default=None, help=meta["help"] + shown)(func)
            continue
        kind = _click_type(f)
        func = click.option(option_name(f.name), f.name, type=kind, default=None, metavar=meta["metavar"],
                            help=meta["help"] + shown)(func)
    return func


def _click_type(f: dataclasses.Field[Any]) -> click.ParamType:
    meta = f.metadata
    if meta["count"]:
        return NumberList(meta["count"], meta["number"])
    if meta["choices"]:
        return click.Choice(meta["choices"])
    base = f.type if isinstance(f.type, type) else str(f.type)
    if base in (int, "int", "int | None"):
        return click.IntRange(min=meta["min"]) if meta["min"] is not None else click.INT
    if base in (float, "float", "float | None"):
        return click.FloatRange(min=meta["min"]) if meta["min"] is not None else click.FLOAT
    return click.STRING


def build_config(cli_values: Mapping[str, Any], file_values: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults, then the file's values, then the command line's (None: not given)."""
    known = {f.name for f in config_fields()}
    file_values = dict(file_values or {})
    unknown = sorted(set(file_values) - known)
    if unknown:
        raise TrainerError(f"unknown config keys: {', '.join(unknown)} (valid: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for name in known:
        if cli_values.get(name) is not None:
            values[name] = cli_values[name]
        elif name in file_values:
            values[name] = _coerce(name, file_values[name])
    return validate(RunConfig(**values))


def _coerce(name: str, value: Any) -> Any:
    f = next(f for f in config_fields() if f.name == name)
    if value is None:
        return f.default
    try:
        if f.metadata["flag"]:
            if not isinstance(value, bool):
                raise ValueError
            return value
        kind = _click_type(f)
        return kind.convert(value, None, None)
    except (ValueError, click.BadParameter) as exc:
        expected = "true/false" if f.metadata["flag"] else f.type
        detail = exc.format_message() if isinstance(exc, click.BadParameter) else f"expected {expected}"
        raise TrainerError(f"config key {name!r}: invalid value {value!r} ({detail})") from None


def validate(cfg: RunConfig) -> RunConfig:
    """Cross-field checks that a single option's type cannot express."""
    if not cfg.pack:
        raise TrainerError("no pack given: pass --pack PACK.h5 (make one with tools/pack_dataset.py)")
    _check_augmentation(cfg)
    _check_mechanics(cfg)
    _check_face_arch(cfg)
    _check_margin_head(cfg)
    if min(cfg.std) <= 0:
        raise TrainerError(f"--std needs three positive values, got {','.join(map(str, cfg.std))}")
    if cfg.rotation > 180:
        raise TrainerError(f"--rotation is at most 180 degrees, got {cfg.rotation}")
    if cfg.dropout >= 1:
        raise TrainerError(f"--dropout must be below 1, got {cfg.dropout}")
    if cfg.label_smoothing >= 1:
        raise TrainerError(f"--label-smoothing must be below 1, got {cfg.label_smoothing}")
    if cfg.warmup_epochs >= cfg.epochs and cfg.warmup_epochs > 0:
        raise TrainerError(f"--warmup-epochs ({cfg.warmup_epochs}) must be shorter than --epochs ({cfg.epochs})")
    if cfg.cache == "none" and (cfg.cache_size is not None or cfg.cache_max_gb is not None):
        raise TrainerError("--cache-size and --cache-max-gb need --cache ram or --cache device")
    if cfg.cache != "none" and cfg.backend == "synthetic":
        raise TrainerError(f"--cache {cfg.cache} keeps the pack's images, --backend synthetic makes random ones: "
                           "drop one of the two")
    if cfg.device != "auto" and not (cfg.device == "cpu" or cfg.device == "cuda" or cfg.device.startswith("cuda:")):
        raise TrainerError(f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    return cfg


def _check_range(option: str, bounds: Sequence[float] | None, low: float, high: float) -> None:
    """A MIN,MAX option inside (low, high], or one line naming it (the spec's own rule, `check_range`)."""
    if bounds is not None:
        try:
            check_range(option, bounds, low, high)
        except ValueError as exc:
            raise TrainerError(str(exc)) from None


def _check_augmentation(cfg: RunConfig) -> None:
    _check_range("--crop-scale", cfg.crop_scale, 0.0, 1.0)
    _check_range("--crop-ratio", cfg.crop_ratio, 0.0, math.inf)
    if min(cfg.color_jitter) < 0:
        raise TrainerError(f"--color-jitter needs three strengths >= 0, got {','.join(map(str, cfg.color_jitter))}")
    for option, value in (("--random-erasing", cfg.random_erasing), ("--mix-prob", cfg.mix_prob)):
        if value > 1:
            raise TrainerError(f"{option} is a probability, at most 1; got {value}")
    if cfg.progressive is not None and cfg.progressive > cfg.image_size:
        raise TrainerError(f"--progressive {cfg.progressive} is the smallest training size; it must not exceed "
                           f"--image-size {cfg.image_size}")
    if cfg.ramp_epochs is not None:
        start, end = cfg.ramp_epochs
        if not 1 <= start <= end:
            raise TrainerError(f"--ramp-epochs START,END needs 1 <= START <= END (epochs count from 1), got "
                               f"{start},{end}")


def _check_mechanics(cfg: RunConfig) -> None:
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.head in MARGIN_HEADS:
        raise TrainerError(f"--mixup and --cutmix mix two classes in one image, which a margin head ({cfg.head}) "
                           "cannot take: drop them, or use --head linear or mlp")
    if cfg.ema >= 1:
        raise TrainerError(f"--ema is a decay below 1 (e.g. 0.999), got {cfg.ema}")
def _check_face_arch(cfg: RunConfig) -> None:
    if cfg.arch not in FACE_ARCHS:
        return
    if cfg.image_size != FACE_INPUT_SIZE:
        raise TrainerError(f"--arch {cfg.arch} takes {FACE_INPUT_SIZE} x {FACE_INPUT_SIZE} aligned faces, not "
                           f"--image-size {cfg.image_size}: drop --image-size (pack with tools/pack_dataset.py "
                           f"--landmarks FILE --align {FACE_INPUT_SIZE})")
    if cfg.weights == "imagenet":
        raise TrainerError(no_imagenet_weights(cfg.arch))


def no_imagenet_weights(arch: str) -> str:
    """The error for `--weights imagenet` with face backbone `arch`."""
    return (f"--arch {arch} has no ImageNet weights: pass --weights none (from scratch, its default) or a PATH to a "
            "checkpoint")


def _check_margin_head(cfg: RunConfig) -> None:
    if not 0 < cfg.sample_rate <= 1:
        raise TrainerError(f"--sample-rate is a share of the classes in (0, 1], got {cfg.sample_rate}")
    margin = cfg.head in MARGIN_HEADS
    for option, used in (("--subcenters", cfg.subcenters > 1), ("--sample-rate", cfg.sample_rate < 1)):
        if used and not margin:
            raise TrainerError(f"{option} needs a margin head (--head {' or '.join(MARGIN_HEADS)}), not --head "
                               f"{cfg.head}")
