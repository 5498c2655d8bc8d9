"""Charts for docs/performance.md from the benchmark JSON files.

    python tools/plot_bench.py --pipeline bench_pipeline.json [--train bench_train.json] --out docs/img

- pipeline_throughput.png: images/s of each pipeline of `tools/bench_pipeline.py`, with the
  original notebook loader and the decode-only ceiling drawn as reference lines;
- train_throughput.png: compute-only (synthetic backend) against end-to-end images/s per
  architecture, from `tools/bench_train.py`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from trainer.cli_usage import HELP_OPTIONS
from trainer.plots import pyplot, save_figure


def plot_pipeline(data: dict[str, Any], path: Path, title: str) -> None:
    """Horizontal bars of images/s per pipeline, notebook and decode-only marked."""
    plt = pyplot()
    rows = data["results"]
    names = [r["name"] for r in rows]
    rates = [r["images_per_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    colors = ["#999999" if n.startswith("(") else "#2a7ab9" for n in names]
    ax.barh(names[::-1], rates[::-1], color=colors[::-1])
    for y, (rate, row) in enumerate(zip(rates[::-1], rows[::-1])):
        ax.text(rate, y, f" {rate:,.0f}  ({row['vs_notebook']:.2f}x notebook, {row['vs_decode']:.2f}x decode)",
                va="center", fontsize=8)
    ax.set(xlabel="images/s", title=title, xlim=(0, max(rates) * 1.6))
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)


def plot_train(data: dict[str, Any], path: Path, title: str) -> None:
    """Grouped bars per architecture: bare loop, trainer + synthetic, and each backend end to end."""
    plt = pyplot()
    rows = data["rows"]
    series: dict[str, list[float]] = {"bare loop": [], "synthetic (compute only)": []}
    backends = sorted({b for r in rows for b, v in r["backends"].items() if "error" not in v})
    for b in backends:
        series[f"{b} end to end"] = []
    for r in rows:
        series["bare loop"].append(r["bare_images_per_second"])
        series["synthetic (compute only)"].append(r["synthetic_images_per_second"])
        for b in backends:
            series[f"{b} end to end"].append(r["backends"].get(b, {}).get("images_per_second", 0.0))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series.items()):
        xs = [i + k * width for i in range(len(rows))]
        ax.bar(xs, values, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [r["arch"] for r in rows])
    ax.set(ylabel="images/s", title=title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)


@click.command(context_settings=HELP_OPTIONS)
@click.option("--pipeline", "pipeline_json", type=click.Path(path_type=Path, exists=True),
              help="JSON of tools/bench_pipeline.py.")
@click.option("--train", "train_json", type=click.Path(path_type=Path, exists=True),
              help="JSON of tools/bench_train.py.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=Path("docs/img"), show_default=True)
@click.option("--label", default="", help="Machine description for the titles.")
def main(pipeline_json: Path | None, train_json: Path | None, out: Path, label: str) -> None:
    """Write the performance charts."""
    if not pipeline_json and not train_json:
        raise click.ClickException("give --pipeline and/or --train JSON files")
    out.mkdir(parents=True, exist_ok=True)
    suffix = f" ({label})" if label else ""
    if pipeline_json:
        plot_pipeline(json.loads(pipeline_json.read_text()), out / "pipeline_throughput.png",
                      f"Train-mode pipelines, 224 px{suffix}")
        click.echo(f"wrote {out / 'pipeline_throughput.png'}")
    if train_json:
        plot_train(json.loads(train_json.read_text()), out / "train_throughput.png", f"Training images/s{suffix}")
        click.echo(f"wrote {out / 'train_throughput.png'}")


if __name__ == "__main__":
    main()
