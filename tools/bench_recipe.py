"""Time to accuracy of the shipped recipes: test top-1 against wall time, each recipe within a wall-clock budget.

    python tools/bench_recipe.py PACK --out DIR [--recipes seed,fast] [--budget 300] [--epochs 2,4,8,16]
                                 [--image-size 64] [--set KEY=VALUE ...]

Each point is one complete `trainer run --config RECIPE --epochs E` (its own schedule over
its E epochs, as FFCV's tables list one run per epoch count), at the recipe's wall time
(`summary.json`'s train_seconds: training and validation, the part the recipe decides)
and the test top-1 of its best.pt; the table adds the CPU seconds of the whole process,
which a machine shared with other work disturbs less. A recipe's runs go from the
shortest `--epochs` up, as long as its `--budget` (seconds, all its runs together) allows
the next one, predicted from its last run's time per epoch; the first run always
happens. The recipes take turns at each length, so a change in the machine's load
falls on all of them alike.

`--image-size S` rescales a recipe's sizes (image, progressive, eval) by S / its
--image-size, so every recipe runs at a size this machine can afford and keeps its own
ratios. `--set KEY=VALUE` adds an option to every run (`--set arch=resnet18 --set
weights=none`; a flag as KEY=true or KEY=false). Writes DIR/bench_recipe.json and
DIR/bench_recipe.png (one curve per recipe), and prints the table and the verdict: how
long the other recipes took to reach the first recipe's final accuracy.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from trainer.cli_usage import HELP_OPTIONS, OneLineUsageCommand
from trainer.config import RunConfig
from trainer.config_files import load_config
from trainer.metrics import write_json
from trainer.plots import CURVE_COLORS, pyplot, save_figure

SIZE_FIELDS = ("progressive", "eval_image_size")  # scaled with image_size


@dataclass(frozen=True)
class Point:
    """One complete run of a recipe."""

    recipe: str
    epochs: int
    seconds: float  # training and validation (summary.json's train_seconds)
    cpu_seconds: float  # user + system time of the whole `trainer run` process
    test_top1: float
    best_epoch: int
    best_weights: str
    run: str


def scaled_sizes(recipe: str, image_size: int | None) -> dict[str, int]:
    """The recipe's sizes rescaled so that its --image-size becomes `image_size` (nothing when None)."""
    if image_size is None:
        return {}
    values = load_config(recipe)
    base = int(values.get("image_size", RunConfig.image_size))
    sizes = {"image_size": image_size}
    for name in SIZE_FIELDS:
        if values.get(name) is not None:
            sizes[name] = max(8, round(int(values[name]) * image_size / base))
    return sizes


def option_args(values: dict[str, Any]) -> list[str]:
    """Command-line options for `values` (field names; flags as booleans)."""
    args = []
    for name, value in values.items():
        option = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(option if value else "--no-" + name.replace("_", "-"))
        else:
            args += [option, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    return args


def parse_sets(pairs: tuple[str, ...]) -> dict[str, Any]:
    """--set KEY=VALUE pairs as field names to values (true/false as booleans)."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.ClickException(f"--set {pair!r}: expected KEY=VALUE")
        values[key.replace("-", "_")] = {"true": True, "false": False}.get(value.lower(), value)
    return values


def train(pack: Path, recipe: str, epochs: int, out: Path, options: dict[str, Any]) -> Point:
    """One `trainer run` of `recipe` for `epochs` epochs into `out`; its point."""
    command = [sys.executable, "-m", "trainer", "run", "--pack", str(pack), "--config", recipe, "--epochs", str(epochs),
               "--out", str(out), *option_args(options)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(command, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise click.ClickException(f"{recipe}, {epochs} epochs failed: {last}")
    summary = json.loads((out / "summary.json").read_text())
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return Point(recipe, epochs, summary["train_seconds"], cpu, summary["test_top1"], summary["best_epoch"],
                 summary.get("best_weights", "raw"), str(out))


def bench(pack: Path, out: Path, recipes: list[str], epochs: list[int], budget: float, image_size: int | None,
          options: dict[str, Any], say: Any = click.echo) -> list[Point]:
    """Every recipe's runs within its budget (see the module docstring), the recipes taking turns."""
    points: list[Point] = []
    spent = dict.fromkeys(recipes, 0.0)
    per_epoch: dict[str, float] = {}
    for count in sorted(epochs):
        for recipe in recipes:
            if recipe in per_epoch and spent[recipe] + per_epoch[recipe] * count > budget:
                continue  # this length and every longer one would pass the budget
            start = time.perf_counter()
            point = train(pack, recipe, count, out / f"{recipe}-{count}", {**scaled_sizes(recipe, image_size),
                                                                             **options})
            wall = time.perf_counter() - start
            spent[recipe] += wall
            per_epoch[recipe] = wall / count
            points.append(point)
            say(f"{recipe:8s} {count:3d} epochs  {point.seconds:7.1f} s  test top-1 {point.test_top1:.3f}")
    return points


def table(points: list[Point]) -> list[str]:
    """The markdown table of the points."""
    lines = ["| recipe | epochs | wall time (s) | CPU time (s) | test top-1 | best epoch | best weights |",
             "|---|---|---|---|---|---|---|"]
    order = list(dict.fromkeys(p.recipe for p in points))
    lines += [f"| {p.recipe} | {p.epochs} | {p.seconds:.1f} | {p.cpu_seconds:.1f} | {p.test_top1:.3f} | "
              f"{p.best_epoch} | {p.best_weights} |" for p in sorted(points, key=lambda p: (order.index(p.recipe),
                                                                                         p.epochs))]
    return lines


def verdict(points: list[Point], reference: str) -> list[str]:
    """How soon each other recipe reached `reference`'s final accuracy, against the time `reference` took."""
    mine = [p for p in points if p.recipe == reference]
    if not mine:
        return []
    final = max(mine, key=lambda p: p.epochs)
    lines = [f"{reference} final: test top-1 {final.test_top1:.3f} after {final.seconds:.1f} s ({final.epochs} epochs)"]
    for recipe in dict.fromkeys(p.recipe for p in points if p.recipe != reference):
        reached = [p for p in points if p.recipe == recipe and p.test_top1 >= final.test_top1]
        if reached:
            first = min(reached, key=lambda p: p.seconds)
            lines.append(f"{recipe} reached it in {first.seconds:.1f} s ({first.epochs} epochs, test top-1 "
                         f"{first.test_top1:.3f}): {first.seconds / final.seconds:.2f} of {reference}'s time")
        else:
            best = max((p for p in points if p.recipe == recipe), key=lambda p: p.test_top1)
            lines.append(f"{recipe} did not reach it within its budget (best test top-1 {best.test_top1:.3f} "
                         f"after {best.seconds:.1f} s)")
    return lines


def plot(points: list[Point], path: Path, title: str) -> None:
    """Test top-1 against wall time, one curve per recipe, each point labelled with its epochs."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for color, recipe in zip(CURVE_COLORS, dict.fromkeys(p.recipe for p in points)):
        mine = sorted((p for p in points if p.recipe == recipe), key=lambda p: p.seconds)
        ax.plot([p.seconds for p in mine], [p.test_top1 for p in mine], "o-", color=color, label=recipe)
        for p in mine:
            ax.annotate(f"{p.epochs} ep", (p.seconds, p.test_top1), textcoords="offset points", xytext=(4, -10),
                        fontsize=8)
    ax.set_xlabel("wall time of the run: training and validation (s)")
    ax.set_ylabel("test top-1")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


@click.command(cls=OneLineUsageCommand, context_settings=HELP_OPTIONS)
@click.argument("pack", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the runs.")
@click.option("--recipes", default="seed,fast", show_default=True,
              help="Shipped recipe names (or config files), comma-separated; the first is the reference.")
@click.option("--epochs", "epoch_list", default="2,4,8,16", show_default=True, help="Run lengths, comma-separated.")
@click.option("--budget", default=300.0, show_default=True, type=click.FloatRange(min=1),
              help="Wall-clock seconds per recipe, all its runs together.")
@click.option("--image-size", type=click.IntRange(min=8), help="Rescale each recipe's sizes to this --image-size.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="An option for every run (repeatable).")
def main(pack: Path, out: Path, recipes: str, epoch_list: str, budget: float, image_size: int | None,
         sets: tuple[str, ...]) -> None:
    """Train each recipe on PACK for a wall-clock budget; test top-1 against wall time as a table and a PNG."""
    try:
        epochs = [int(e) for e in epoch_list.split(",")]
    except ValueError:
        raise click.ClickException(f"--epochs {epoch_list!r}: expected comma-separated integers") from None
    names = [name.strip() for name in recipes.split(",") if name.strip()]
    out.mkdir(parents=True, exist_ok=True)
    points = bench(pack, out, names, epochs, budget, image_size, parse_sets(sets))
    lines = table(points) + [""] + verdict(points, names[0])
    click.echo("\n".join(lines))
    write_json(out / "bench_recipe.json", {"pack": str(pack), "budget": budget, "image_size": image_size,
                                           "set": list(sets), "points": [asdict(p) for p in points],
                                           "verdict": verdict(points, names[0])})
    plot(points, out / "bench_recipe.png", f"time to accuracy on {pack.name}")


if __name__ == "__main__":
    main()
