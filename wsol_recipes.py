"""Training recipes of `run_wsol.py`: the default of every training flag, and where each comes from; and the
reading of flags (`--config_overrides` text, recipe names, flags recorded by earlier versions), and the one
error every module raises for a refused input (`RunInputError`, through `refuse`).

Three recipes, chosen with `--recipe` (default `auto`):

* `official` — the official SCM training (Bai et al., ECCV 2022; code hbai98/SCM, CUB DeiT-S): one learning
  rate for every parameter, AdamW with weight decay 0.05 (none on 1-D parameters, biases, position
  embeddings and the CLS token), ×0.1 step decay at epoch 30 of 30, no warmup, no gradient clipping,
  stochastic depth 0.1, plain cross-entropy.
* `cxr_finetune` — this project's chest X-ray fine-tuning (the original training scripts): backbone 5e-5, SCM and
  head 5e-4, weight decay 5e-4, batch 32, 55 epochs, class-weighted cross-entropy with label smoothing 0.1,
  early stopping.
* `scratch` — the embedded default: a DeiT trained from scratch on the phantoms in CPU minutes. No paper
  trains DeiT-SCM from scratch; every value was measured on the phantoms' validation split
  (`bench/RESULTS.md`).

`auto` picks `scratch` when nothing pretrained is loaded (no `--backbone_weights`, no
`--model_name_or_path`), else the SCM variant's recipe (`VARIANT_RECIPES`: `paper` -> `official`, `cxr` ->
`cxr_finetune`). A flag given on the command line always wins over the recipe. The recipes were once named
like the variants; `--recipe paper` and `--recipe cxr` still mean `official` and `cxr_finetune`.

`--learning_rate` is the backbone's learning rate. Unless `--scm_learning_rate` is given too, the SCM
blocks and the head follow it at the recipe's ratio (1× for `official`, 10× for `cxr_finetune`), so one flag
scales the whole recipe.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn, Optional


class RunInputError(ValueError):
    """A mistake in what the user gave a run (flags, data folder, model folder, checkpoint). `run_wsol.py`
    prints it in one line and exits with status 2, as argparse does; a library caller catches it."""


def refuse(message: str) -> NoReturn:
    """Raise `RunInputError(message)`: the one way the run's modules reject an input."""
    raise RunInputError(message)


RECIPE_CHOICES = ("auto", "official", "cxr_finetune", "scratch")
# The SCM variant -> the recipe `auto` picks for it when something pretrained is loaded.
VARIANT_RECIPES = {"paper": "official", "cxr": "cxr_finetune"}
# Former recipe names, still read on the command line: each recipe was named after its variant.
LEGACY_RECIPE_NAMES = dict(VARIANT_RECIPES)


@dataclass(frozen=True)
class Recipe:
    """Defaults of the training flags. `class_weights` takes the flag's words ("variant" = the SCM
    variant's weights); `scm_warmup_fraction` is the share of epochs trained before the SCM blocks run;
    `config` holds model fields the recipe needs (e.g. the conv stem for from-scratch backbones)."""

    name: str
    learning_rate: float
    scm_learning_rate: float
    weight_decay: float
    lr_scheduler_type: str
    num_warmup_steps: int
    max_grad_norm: float
    drop_path_rate: float
    label_smoothing: Optional[float]  # None: the SCM variant's
    class_weights: str
    num_train_epochs: int
    per_device_train_batch_size: int
    early_stopping_patience: int
    scm_warmup_fraction: float
    config: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    "official": Recipe(
        name="official",
        learning_rate=5e-5,
        scm_learning_rate=5e-5,
        weight_decay=0.05,
        lr_scheduler_type="step",
        num_warmup_steps=0,
        max_grad_norm=0.0,
        drop_path_rate=0.1,
        label_smoothing=0.0,
        class_weights="none",
        num_train_epochs=30,
        per_device_train_batch_size=256,
        early_stopping_patience=0,
        scm_warmup_fraction=0.0,
        sources={"*": "official SCM code and CUB config (hbai98/SCM: train_cam.py, configs/CUB/deit_scm_small)"},
    ),
    "cxr_finetune": Recipe(
        name="cxr_finetune",
        learning_rate=5e-5,
        scm_learning_rate=5e-4,
        weight_decay=5e-4,
        lr_scheduler_type="cosine",
        num_warmup_steps=50,
        max_grad_norm=1.0,
        drop_path_rate=0.0,
        label_smoothing=None,
        class_weights="variant",
        num_train_epochs=55,
        per_device_train_batch_size=32,
        early_stopping_patience=10,
        scm_warmup_fraction=0.0,
        sources={
            "*": "the project's original chest X-ray training scripts",
            "lr_scheduler_type": "this project (cosine with 50 warmup steps)",
            "num_warmup_steps": "this project",
            "max_grad_norm": "this project",
            "early_stopping_patience": "this project (the scripts stop early; their patience is not recorded)",
        },
    ),
    "scratch": Recipe(
        name="scratch",
        learning_rate=5e-4,
        scm_learning_rate=5e-4,
        weight_decay=0.05,
        lr_scheduler_type="cosine",
        num_warmup_steps=50,
        max_grad_norm=1.0,
        drop_path_rate=0.0,
        label_smoothing=None,
        class_weights="none",
        num_train_epochs=40,
        per_device_train_batch_size=32,
        early_stopping_patience=0,
        scm_warmup_fraction=0.5,
        # The convolutional stem with 4-wide kernels: every token centred on its patch (a 3-wide stem
        # shifts the maps by 3.5 px at 96x96, a third of a median finding's width); chosen on the
        # validation boxes of seeds 0-2 (bench/RESULTS.md).
        config={"patch_embedding": "conv_stem", "conv_stem_kernel_size": 4},
        sources={"*": "measured on the phantoms' validation split (bench/RESULTS.md)"},
    ),
}

# Flags a recipe fills when the command line leaves them out (argparse default None).
RECIPE_FLAGS = tuple(
    f.name for f in fields(Recipe) if f.name not in ("name", "config", "sources", "scm_warmup_fraction")
)


def resolve_recipe(recipe: str, scm_variant: str, pretrained: bool) -> Recipe:
    """The recipe `recipe` names, `auto` resolved: the SCM variant's own recipe when something pretrained
    is loaded (`pretrained`), else `scratch`."""
    if recipe != "auto":
        return RECIPES[recipe]
    return RECIPES[VARIANT_RECIPES[scm_variant]] if pretrained else RECIPES["scratch"]


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
    if isinstance(current.get("config_overrides"), str):
        current["config_overrides"] = parse_overrides(current["config_overrides"])
    if current.get("recipe") in LEGACY_RECIPE_NAMES:
        current["recipe"] = LEGACY_RECIPE_NAMES[current["recipe"]]
    return current


def recipe_name(text: str) -> str:
    """`--recipe`'s type: the name, a former one translated."""
    return LEGACY_RECIPE_NAMES.get(text, text)


def recipe_fills(recipe: Recipe, flags: Mapping[str, Any]) -> dict[str, Any]:
    """The flag values the recipe supplies: every `RECIPE_FLAGS` entry left at None in `flags`, and the SCM
    learning rate at the recipe's ratio when only `learning_rate` is given."""
    fills = {name: getattr(recipe, name) for name in RECIPE_FLAGS if flags.get(name) is None}
    if flags.get("learning_rate") is not None and flags.get("scm_learning_rate") is None:
        fills["scm_learning_rate"] = flags["learning_rate"] * recipe.scm_learning_rate / recipe.learning_rate
    return fills


__all__ = [
    "LEGACY_RECIPE_NAMES", "Recipe", "RECIPES", "RECIPE_CHOICES", "RECIPE_FLAGS", "RunInputError", "VARIANT_RECIPES",
    "current_flag_values", "parse_overrides", "recipe_fills", "recipe_name", "refuse", "resolve_recipe",
]  # fmt: skip
