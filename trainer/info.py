"""`trainer info`: what a pack holds, as text or one JSON object."""
from __future__ import annotations

from typing import Any

import numpy as np

from dali_pipes import PackReader, plan_cache, plural, split_kind
from trainer.run_cache import amount


def _stats(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"min": 0, "median": 0, "mean": 0.0, "max": 0}
    return {"min": int(values.min()), "median": float(np.median(values)), "mean": round(float(values.mean()), 1),
            "max": int(values.max())}


def pack_summary(reader: PackReader, cache_size: int | None = None) -> dict[str, Any]:
    """Counts per split and class, image-size statistics, rejects and format of a pack; with `cache_size`, what
    `trainer run --cache ram|device --cache-size N` would hold (`cache`)."""
    counts = np.bincount(reader.labels, minlength=reader.num_classes)
    per_split_class = {split: reader.class_counts(split).tolist() for split in reader.split_counts()}
    sizes = np.diff(reader.offsets)
    return {
        "path": str(reader.path),
        "format_version": reader.format_version,
        "num_images": len(reader),
        "num_classes": reader.num_classes,
        "classes": list(reader.classes),
        "splits": reader.split_counts(),
        "split_counts": reader.split_counts(),  # the packer's JSON name for the same counts
        "split_by": split_kind(reader.labels, reader.splits),
        "images_per_class": {"min": int(counts.min()) if len(counts) else 0,
                             "max": int(counts.max()) if len(counts) else 0},
        "class_counts": {name: {"total": int(counts[i]), **{s: per_split_class[s][i] for s in per_split_class}}
                         for i, name in enumerate(reader.classes)},
        "height": _stats(reader.heights),
        "width": _stats(reader.widths),
        "bytes": {"total": int(reader.offsets[-1]),
                  "mean_per_image": round(float(sizes.mean()), 1) if len(sizes) else 0.0},
        "rejects": reader.rejects(),
        "empty_classes": reader.empty_classes,
        "options": reader.options,
        **({"cache": cache_summary(reader, cache_size)} if cache_size is not None else {}),
    }


def cache_summary(reader: PackReader, size: int) -> dict[str, int]:
    """The decoded cache of every image at short side `size`: its `size`, `images` and `bytes` of pixels."""
    plan = plan_cache(reader, range(len(reader)), size)
    return {"size": size, "images": len(plan), "bytes": plan.nbytes}
def _alignment_lines(options: dict[str, Any]) -> list[str]:
    """How the pack's faces were aligned (packed with --align), as summary lines; none for other packs."""
    size = options.get("align")
    if not size:
        return []
    kept = "; images without landmarks kept unaligned" if options.get("keep_unaligned") else ""
    return [f"  faces aligned to the ArcFace template, {size} x {size}, by the landmarks of {options['landmarks']}"
            + kept]


def format_summary(summary: dict[str, Any], max_classes: int = 20) -> list[str]:
    """Human-readable lines for `pack_summary`."""
    splits = ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
    h, w = summary["height"], summary["width"]
    unseen = ": val and test hold classes train never saw" if summary["split_by"] == "class" else ""
    lines = [
        f"{summary['path']}: pack format {summary['format_version']}",
        f"  {plural(summary['num_images'], 'image')} ({splits}), {plural(summary['num_classes'], 'class')}, "
        f"{summary['images_per_class']['min']}-{summary['images_per_class']['max']} images per class",
        f"  split by {summary['split_by']}{unseen}",
        *_alignment_lines(summary["options"]),
        f"  height {h['min']}-{h['max']} px (median {h['median']:g}), width {w['min']}-{w['max']} px "
        f"(median {w['median']:g}), {summary['bytes']['total'] / 1e6:.1f} MB of JPEG "
        f"({summary['bytes']['mean_per_image'] / 1e3:.1f} kB per image)",
        "  classes:",
    ]
    for name, count in list(summary["class_counts"].items())[:max_classes]:
        lines.append(f"    {name}: {count['total']} (train {count['train']}, val {count['val']}, test {count['test']})")
    if len(summary["class_counts"]) > max_classes:
        lines.append(f"    ... and {len(summary['class_counts']) - max_classes} more (--json lists all)")
    rejects = summary["rejects"]
    if "cache" in summary:
        cache = summary["cache"]
        lines.append(f"  --cache-size {cache['size']}: {amount(cache['bytes'])} of pixels for {cache['images']} images "
                     "(--cache ram holds them once per machine; --cache device also about 1/N on each of N GPUs)")
    lines.append(f"  rejected files: {len(rejects)}")
    lines += [f"    {r['path']}: {r['reason']}" for r in rejects[:20]]
    if len(rejects) > 20:
        lines.append(f"    ... and {len(rejects) - 20} more (--json lists all)")
    if summary["empty_classes"]:
        lines.append(f"  empty class folders (no class made): {', '.join(summary['empty_classes'])}")
    return lines
