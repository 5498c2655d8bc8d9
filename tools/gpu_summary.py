"""Headline figures of a `tools/gpu_check.sh` run against the GPU targets.

    python tools/gpu_summary.py OUT_DIR [--json summary.json]
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from trainer.cli_usage import HELP_OPTIONS

# End-to-end images/s targets on one H200 (bf16, 224 px), the largest data-wait share, and the
# torch backend's pipeline alone (docs/performance.md).
TARGETS = {"resnet50": 6000, "mobilenet_v2": 12000, "resnet18": 15000}
MAX_DATA_WAIT = 0.02
PIPELINE_TARGET = 20000


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def summarize(out: Path) -> dict[str, Any]:
    """Collect the JSON files of one check into rows with pass/fail against the targets."""
    summary: dict[str, Any] = {"compute": {}, "end_to_end": {}, "pipeline": {}}
    for name, key in (("compute.json", "eager"), ("compute_compiled.json", "compiled")):
        data = _load(out / name)
        for row in (data or {}).get("rows", []):
            summary["compute"].setdefault(row["arch"], {})[key] = row["synthetic_images_per_second"]
            if row.get("compiled"):
                summary["compute"][row["arch"]]["compile_seconds"] = row.get("compile_seconds")
    for row in (_load(out / "train.json") or {}).get("rows", []):
        for backend, result in row["backends"].items():
            if "error" in result:
                summary["end_to_end"].setdefault(row["arch"], {})[backend] = {"error": result["error"]}
                continue
            target = TARGETS.get(row["arch"])
            summary["end_to_end"].setdefault(row["arch"], {})[backend] = {
                **result, "target": target,
                "meets_target": bool(target and result["images_per_second"] >= target
                                     and result["data_wait_fraction"] < MAX_DATA_WAIT),
            }
    for row in (_load(out / "pipeline.json") or {}).get("results", []):
        target = PIPELINE_TARGET if row["name"].startswith("torch") else None
        summary["pipeline"][row["name"]] = {"images_per_second": row["images_per_s"], "target": target,
                                            "meets_target": bool(target and row["images_per_s"] >= target)}
    return summary


def format_summary(summary: dict[str, Any]) -> list[str]:
    """Printed lines."""
    compute = (f"{a} {v.get('eager', 0):,.0f} eager" + (f" / {v['compiled']:,.0f} compiled" if "compiled" in v else "")
               for a, v in summary["compute"].items())
    lines = ["compute only (images/s): " + ", ".join(compute)]
    for arch, backends in summary["end_to_end"].items():
        for backend, r in backends.items():
            if "error" in r:
                lines.append(f"{arch} {backend}: failed: {r['error']}")
            else:
                mark = "meets" if r["meets_target"] else "misses"
                lines.append(f"{arch} {backend}: {r['images_per_second']:,.0f} images/s end to end, data wait "
                             f"{100 * r['data_wait_fraction']:.1f}% ({mark} target {r['target']:,} and "
                             f"<{100 * MAX_DATA_WAIT:.0f}% wait)")
    for name, r in summary["pipeline"].items():
        target = f" ({'meets' if r['meets_target'] else 'misses'} target {r['target']:,})" if r["target"] else ""
        lines.append(f"pipeline {name}: {r['images_per_second']:,.0f} images/s{target}")
    return lines


@click.command(context_settings=HELP_OPTIONS)
@click.argument("out", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--json", "json_out", type=click.Path(path_type=Path))
def main(out: Path, json_out: Path | None) -> None:
    """Print (and save) the headline figures of a gpu_check run."""
    summary = summarize(out)
    click.echo("\n".join(format_summary(summary)))
    if json_out:
        json_out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
