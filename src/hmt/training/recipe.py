"""Recipes: YAML files of one run or of stages, ``--set`` overrides, and running the stages in order.

A recipe is either the fields of :class:`TrainConfig` at the top level, or ``common:`` fields
plus a list of ``stages:``, each with a ``name`` and its overrides. A stage's ``init_from`` may
name an earlier stage (``"stage:NAME"``) to start from its final checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from .config import TrainConfig
from .loop import TrainResult, train


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> list[tuple[str, TrainConfig]]:
    """Read a YAML recipe into ``[(stage name, TrainConfig), ...]``.

    ``overrides`` are ``key=value`` strings (YAML values) applied to every stage, e.g.
    ``steps=10`` or ``hmt.segment_length=128``.
    """
    import yaml

    if Path(path).is_dir():
        raise ValueError(f"Recipe {path} is a directory; give a YAML file (see recipes/).")
    try:
        recipe = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError as err:
        raise FileNotFoundError(f"Recipe {path} does not exist (see recipes/ for examples).") from err
    except yaml.YAMLError as err:
        raise ValueError(f"Recipe {path} is not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(recipe, dict):
        raise ValueError(f"Recipe {path} must be a YAML mapping.")
    stages = recipe.pop("stages", None)
    common = recipe.pop("common", {}) if stages is not None else recipe
    if stages is None:
        stages = [{"name": "main"}]
    elif recipe:
        raise ValueError(f"Recipe {path}: with 'stages', put shared fields under 'common' (found {sorted(recipe)}).")
    if not isinstance(stages, list) or not stages:
        raise ValueError(f"Recipe {path}: 'stages' must be a non-empty list of stages (each a mapping with a name), "
                         f"got {stages!r}; or drop 'stages' and put the fields at the top level.")
    if not isinstance(common, dict):
        raise ValueError(f"Recipe {path}: 'common' must be a mapping of fields, got {common!r}.")
    parsed = []
    for stage in stages:
        if not isinstance(stage, dict):
            raise ValueError(f"Recipe {path}: each stage must be a mapping of fields with a name, got {stage!r}.")
        stage = dict(stage)
        name = str(stage.pop("name", f"stage{len(parsed) + 1}"))
        if name in (other for other, _ in parsed):
            raise ValueError(f"Recipe {path}: two stages are named {name!r}; give each stage its own name.")
        values = _merge(common, stage)
        for item in overrides:
            key, _, raw = item.partition("=")
            if not _:
                raise ValueError(f"Override {item!r} must look like key=value.")
            try:
                parsed_value = yaml.safe_load(raw)
            except yaml.YAMLError as err:
                raise ValueError(f"--set {item}: the value is not valid YAML ({' '.join(str(err).split())}).") from err
            _set_dotted(values, key.strip(), parsed_value, item)
        if "output_dir" not in stage:
            values["output_dir"] = str(Path(values.get("output_dir", "runs/hmt")) / name) if len(stages) > 1 else values.get("output_dir", "runs/hmt")
        parsed.append((name, values))
    outputs = {name: values["output_dir"] for name, values in parsed}
    result = []
    for name, values in parsed:
        init = values.get("init_from")
        if isinstance(init, str) and init.startswith("stage:"):
            other = init.split(":", 1)[1]
            if other not in outputs:
                raise ValueError(f"Stage {name!r} starts from unknown stage {other!r}.")
            values["init_from"] = str(Path(outputs[other]) / "final")
        result.append((name, TrainConfig.from_dict(values)))
    return result


def _merge(base: dict, extra: dict) -> dict:
    out = json.loads(json.dumps(base))
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set_dotted(values: dict, key: str, value: Any, item: str) -> None:
    *parents, last = key.split(".")
    if not all(key.split(".")):
        raise ValueError(f"--set {item}: {key!r} is not a field name (e.g. steps=10 or hmt.segment_length=128).")
    for depth, part in enumerate(parents):
        values = values.setdefault(part, {})
        if not isinstance(values, dict):
            where = ".".join(parents[: depth + 1])
            raise ValueError(f"--set {item}: {where} is {values!r}, not a mapping of options, so it has no {last!r}.")
    values[last] = value


def say(message: str) -> None:
    """Print once under ``accelerate launch`` (by the first process), as in a single process."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)


def run_recipe(path: str, stages: Optional[Sequence[str]] = None, overrides: Sequence[str] = (), resume: bool = True) -> list[TrainResult]:
    """Run a recipe's stages in order (or only ``stages``)."""
    results = []
    recipe = load_recipe(path, overrides)
    unknown = [name for name in stages or () if name not in {name for name, _ in recipe}]
    if unknown:
        raise ValueError(f"Recipe {path} has no stage {', '.join(map(repr, unknown))}; its stages: "
                         f"{', '.join(name for name, _ in recipe)}.")
    for name, config in recipe:
        if stages and name not in stages:
            continue
        if (Path(config.output_dir) / "final" / "hmt_config.json").is_file() and not stages:
            say(f"[hmt] stage {name}: {config.output_dir}/final exists, skipping (pass --stage {name} to rerun)")
            continue
        say(f"[hmt] stage {name} -> {config.output_dir}")
        result = train(config, resume=resume)
        results.append(result)
        if result.interrupted:
            break
    return results
