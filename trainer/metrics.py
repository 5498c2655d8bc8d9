"""Metrics on disk: one JSON object per epoch in metrics.jsonl, and JSON summaries, written atomically."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from trainer.checkpoint import atomic_write_bytes

# The mark of figures measured on --backend synthetic's random images: the first line `trainer run` and
# `trainer eval` print starts with it, and their JSON says `synthetic_data: true`.
SYNTHETIC_NOTE = "SYNTHETIC DATA (random images, not the pack's: the figures measure speed only)"


def _clean(value: Any) -> Any:
    # JSON has no NaN or infinity; write null so every line parses everywhere.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    """Atomically write `data` as indented JSON."""
    text = json.dumps(_clean(data), indent=2, sort_keys=False) + "\n"
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All epoch records of a metrics.jsonl (empty when the file does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    """Atomically rewrite metrics.jsonl with `records` (small: one line per epoch)."""
    text = "".join(json.dumps(_clean(r)) + "\n" for r in records)
    atomic_write_bytes(path, lambda f: f.write(text.encode()))
