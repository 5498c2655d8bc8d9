"""Where `--config` values come from: a YAML or JSON file, or a recipe shipped inside the package.

Recipes are YAML files in `trainer/recipes/` (package data, so an installed trainer has
them too), named by their file name; the first comment line of each says what it is. The
values read here are option names to values; `config.build_config` checks and applies them.
"""
from __future__ import annotations

import importlib.resources
import json
from pathlib import Path
from typing import Any

from trainer.errors import TrainerError


def shipped_recipes() -> dict[str, str]:
    """The recipes shipped with the package, name -> the first comment line of its file (what it is)."""
    found = {}
    for entry in sorted(importlib.resources.files("trainer").joinpath("recipes").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            first = next((line for line in entry.read_text().splitlines() if line.startswith("#")), "#")
            found[entry.name[: -len(".yaml")]] = first.lstrip("#").strip()
    return found


def load_config(source: str) -> dict[str, Any]:
    """`--config SOURCE`: a YAML or JSON file, or else a shipped recipe's name; the values, with `recipe` set to
    SOURCE unless the file already records one (a run's own config.json does)."""
    path = Path(source)
    if path.is_file():
        values = load_config_file(path)
    elif source in shipped_recipes():
        values = load_config_file(Path(str(importlib.resources.files("trainer").joinpath("recipes", f"{source}.yaml"))))
    else:
        raise TrainerError(f"--config {source}: no such file, nor a shipped recipe of that name (recipes: "
                           f"{', '.join(shipped_recipes())}; `trainer recipes` describes them)")
    values.setdefault("recipe", source)
    return values


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML or JSON file of option names to values (dashes or underscores)."""
    if not path.is_file():
        raise TrainerError(f"{path}: config file not found")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise TrainerError(f"{path}: cannot parse config ({_parse_error(exc)})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise TrainerError(f"{path}: config must be a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def _parse_error(exc: Exception) -> str:
    """A parser's message in one line, with the line and column where it found the problem."""
    mark = getattr(exc, "problem_mark", None)  # YAML: the location is on a later line of its message
    if mark is not None:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return str(exc).splitlines()[0]  # JSON names line and column in its first line
