"""Training recipes of `run_wsol.py`: JSON files in `recipes/` that replace the training flags' defaults, and
the reading of flags recorded by earlier versions (`--config_overrides` text, former recipe names).

Three recipes ship, chosen with `--recipe NAME` (default `auto`), or any JSON file with `--recipe PATH`:

* `official` — the official SCM training (Bai et al., ECCV 2022; code hbai98/SCM, CUB DeiT-S).
* `cxr_finetune` — this project's chest X-ray fine-tuning (the original training scripts).
* `scratch` — the embedded default: a DeiT trained from scratch on the phantoms in CPU minutes; its training
  values are the flags' own defaults, it adds the model's convolutional stem.

`auto` picks `scratch` when nothing pretrained is loaded (no `--backbone_weights`, no `--model_name_or_path`),
else the SCM variant's recipe (`VARIANT_RECIPES`). A flag given on the command line always wins over the
recipe. Every run writes `recipe.json` (the recipe with every value it used): copy it, edit it, pass its path.
The recipes were once named like the variants; `--recipe paper` and `--recipe cxr` still mean `official` and
`cxr_finetune`.

`--learning_rate` is the backbone's learning rate. Unless `--scm_learning_rate` is given too, the SCM blocks and
the head follow it at the recipe's ratio (1x for `official`, 10x for `cxr_finetune`), so one flag scales the
whole recipe.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from deit_scm_cxr.errors import refuse

RECIPE_FOLDER = Path(__file__).with_name("recipes")
RECIPE_CHOICES = ("auto", "official", "cxr_finetune", "scratch")
# The SCM variant -> the recipe `auto` picks for it when something pretrained is loaded.
VARIANT_RECIPES = {"paper": "official", "cxr": "cxr_finetune"}
# Former recipe names, still read on the command line: each recipe was named after its variant.
LEGACY_RECIPE_NAMES = dict(VARIANT_RECIPES)
RECIPE_KEYS = ("description", "sources", "model_config", "training")


@dataclass(frozen=True)
class Recipe:
    """A recipe file: `training` holds flag values (any training flag of `OptimizationArguments`), which
    replace the flags' defaults; `model_config` holds config fields a new model gets (under
    `--config_overrides`); `sources` says where each value comes from (`"*"`: all the others)."""

    name: str
    description: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: Path, name: Optional[str] = None) -> Recipe:
        """Read a recipe JSON file; a malformed one is a `RunInputError` naming the file."""
        from deit_scm_cxr.training.arguments import recipe_flag_names

        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            refuse(f"--recipe {path}: not a readable JSON recipe ({error})")
        if not isinstance(data, dict) or not isinstance(data.get("training", {}), dict):
            refuse(f"--recipe {path}: a recipe is a JSON object with a \"training\" object of flag values")
        training = data.get("training", {})
        unknown = sorted(set(data) - set(RECIPE_KEYS)) + sorted(set(training) - set(recipe_flag_names()))
        if unknown:
            refuse(f"--recipe {path}: unknown key(s) {', '.join(unknown)}; a recipe holds {', '.join(RECIPE_KEYS)} "
                   f"and sets training flags only ({', '.join(recipe_flag_names())})")  # fmt: skip
        return cls(name=name or str(path), description=data.get("description", ""),
                   training=dict(data.get("training", {})), model_config=dict(data.get("model_config", {})),
                   sources=dict(data.get("sources", {})))  # fmt: skip

    def resolved(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """This recipe with every training flag at the value a run used (`values`): what a run records as
        `recipe.json`, which `--recipe path/to/recipe.json` reproduces."""
        return {"description": self.description, "sources": dict(self.sources), "model_config": dict(self.model_config),
                "training": {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}}  # fmt: skip


def load_recipe(name: str) -> Recipe:
    """A shipped recipe by name (`official`, `cxr_finetune`, `scratch`; a former name translated)."""
    name = LEGACY_RECIPE_NAMES.get(name, name)
    return Recipe.from_file(RECIPE_FOLDER / f"{name}.json", name=name)


def resolve_recipe(recipe: str, scm_variant: str, pretrained: bool) -> Recipe:
    """The recipe `recipe` names (a shipped name or a JSON file), `auto` resolved: the SCM variant's own recipe
    when something pretrained is loaded (`pretrained`), else `scratch`."""
    recipe = LEGACY_RECIPE_NAMES.get(recipe, recipe)
    if recipe == "auto":
        return load_recipe(VARIANT_RECIPES[scm_variant] if pretrained else "scratch")
    if recipe in RECIPE_CHOICES:
        return load_recipe(recipe)
    if recipe.endswith(".json") or Path(recipe).is_file():
        if not Path(recipe).is_file():
            refuse(f"--recipe {recipe}: no such file")
        return Recipe.from_file(Path(recipe))
    refuse(f"--recipe {recipe!r}: invalid choice; choose from {', '.join(RECIPE_CHOICES)} or a JSON file")


def parse_overrides(text: Optional[str]) -> dict[str, Any]:
    """`--config_overrides` text, "a=1,b=0.5,c=last" -> {"a": 1, "b": 0.5, "c": "last"} (JSON values where
    they parse, else the text)."""
    overrides: dict[str, Any] = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value.strip()
    return overrides


def current_flag_values(flags: Mapping[str, Any]) -> dict[str, Any]:
    """Flags recorded by earlier versions in today's form: `config_overrides` as its parsed dict (it was the
    text), `recipe` by its current name. How a checkpoint's recorded flags are read."""
    current = dict(flags)
    if "config_overrides" in current and not isinstance(current["config_overrides"], dict):
        # Recorded as the flag's text, or as None when not given (argparse's default before 0.2).
        current["config_overrides"] = parse_overrides(current["config_overrides"])
    if current.get("recipe") in LEGACY_RECIPE_NAMES:
        current["recipe"] = LEGACY_RECIPE_NAMES[current["recipe"]]
    if "scm_warmup_fraction" not in current and current.get("recipe") in RECIPE_CHOICES[1:]:
        # Recorded before the share was a flag: it was the recipe's (half the epochs from scratch, else none).
        current["scm_warmup_fraction"] = 0.5 if current["recipe"] == "scratch" else 0.0
    return current


__all__ = [
    "LEGACY_RECIPE_NAMES", "RECIPE_CHOICES", "RECIPE_FOLDER", "Recipe", "VARIANT_RECIPES", "current_flag_values",
    "load_recipe", "parse_overrides", "resolve_recipe",
]  # fmt: skip
