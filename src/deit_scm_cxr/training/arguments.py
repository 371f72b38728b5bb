"""The flags of the main job (`run_wsol.py`, `deit-scm-train`), declared once: four dataclasses parsed by
`transformers.HfArgumentParser`. A field's default is the only default; a recipe (`recipes.py`) replaces the
training defaults before the command line is read, and a flag the user types always wins over both.
`--help` prints the value a run will use (`--recipe official --help` shows that recipe's values).

Every refused flag ends in one line and exit status 2 (`RunInputError` from the checks, `error` from argparse).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional

from transformers import HfArgumentParser

from deit_scm_cxr.errors import RunInputError, refuse
from deit_scm_cxr.hub.configuration_deit_scm import BACKBONE_PRESETS, DEFAULT_ID2LABEL, SCM_VARIANTS, DeiTSCMConfig
from deit_scm_cxr.hub.localization import SMOOTHING_SIGMAS, check_smoothing
from deit_scm_cxr.training.recipes import Recipe, parse_overrides, resolve_recipe

PREDICT_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
# Flags that shape a new model: a saved model (--model_name_or_path) brings its own config and processor.
NEW_MODEL_FLAGS = ("image_size", "label_smoothing", "drop_path_rate")


def _help(text: str, **more: Any) -> dict[str, Any]:
    return {"help": text, **more}


@dataclass
class DataArguments:
    """Where the images come from and how they are prepared."""

    dataset: Literal["phantoms", "nih"] = field(default="phantoms", metadata=_help("the embedded phantoms, or NIH"))
    data_dir: Optional[str] = field(
        default=None, metadata=_help("NIH ChestX-ray14 folder (images, Data_Entry_2017*.csv, BBox_List_2017.csv)")
    )
    num_phantoms: int = field(default=1200, metadata=_help("phantom training images"))
    num_eval_phantoms: Optional[int] = field(
        default=None,
        metadata=_help("the count the validation (1/6) and test (1/4) splits are sized from; None: --num_phantoms. "
                       "Fix it to grow only the training split"),  # fmt: skip
    )
    phantom_size: int = field(default=256, metadata=_help("phantom side in pixels"))
    max_train_samples: Optional[int] = field(default=None, metadata=_help("keep the first N training images"))
    max_eval_samples: Optional[int] = field(default=None, metadata=_help("keep the first N of each evaluation split"))
    view: Literal["all", "PA", "AP"] = field(default="all", metadata=_help("NIH view position kept"))
    augment: bool = field(default=True, metadata=_help("random affine jitter of training images"))
    cache_dir: Optional[str] = field(
        default=None, metadata=_help("preprocessed-array cache (default: HF_DATASETS_CACHE/deit_scm_preprocessed)")
    )
    preprocessing_num_workers: int = field(
        default_factory=lambda: max(1, min(8, os.cpu_count() or 1)),
        metadata=_help("processes for the one-time preprocessing map"),
    )
    num_workers: int = field(default=0, metadata=_help("data-loader workers"))

    def __post_init__(self) -> None:
        _positive(self, "num_phantoms", "num_eval_phantoms", "phantom_size", "max_train_samples", "max_eval_samples",
                  "preprocessing_num_workers")  # fmt: skip
        _non_negative(self, "num_workers")


@dataclass
class ModelArguments:
    """The model a run trains (a preset and an SCM variant) or loads (a saved folder)."""

    model_name_or_path: Optional[str] = field(
        default=None, metadata=_help("a saved DeiT-SCM folder or Hub id (instead of --preset)")
    )
    preset: str = field(default="deit-micro", metadata=_help("backbone size", choices=sorted(BACKBONE_PRESETS)))
    scm_variant: str = field(default="cxr", metadata=_help("SCM settings", choices=sorted(SCM_VARIANTS)))
    config_overrides: Optional[str] = field(
        default=None, metadata=_help('config fields, e.g. "hidden_size=64,num_hidden_layers=4"')
    )
    backbone_weights: Optional[str] = field(
        default=None, metadata=_help("timm/transformers DeiT checkpoint, or timm:<name>")
    )
    image_size: int = field(default=96, metadata=_help("a new model's input side; a saved model keeps its own"))
    torch_compile: bool = field(default=False, metadata=_help("torch.compile the model"))

    def __post_init__(self) -> None:
        _positive(self, "image_size")


@dataclass
class OptimizationArguments:
    """Training: the defaults are the `scratch` recipe's; `--recipe` replaces them with another's."""

    recipe: str = field(
        default="auto",
        metadata=_help(
            "a recipe's name (official, cxr_finetune, scratch) or a JSON file; auto: scratch when nothing pretrained "
            "is loaded, else the SCM variant's (paper: official, cxr: cxr_finetune)"
        ),
    )
    num_train_epochs: int = field(default=40, metadata=_help("epochs"))
    max_train_steps: Optional[int] = field(default=None, metadata=_help("optimizer steps; overrides the epochs"))
    per_device_train_batch_size: int = field(default=32, metadata=_help("training batch per process"))
    per_device_eval_batch_size: int = field(default=64, metadata=_help("evaluation batch per process"))
    learning_rate: float = field(
        default=5e-4, metadata=_help("backbone; SCM and head follow at the recipe's ratio unless given")
    )
    scm_learning_rate: float = field(default=5e-4, metadata=_help("SCM blocks and head"))
    weight_decay: float = field(default=0.05, metadata=_help("AdamW decay (none on norms, biases, embeddings)"))
    lr_scheduler_type: str = field(
        default="cosine", metadata=_help('a transformers scheduler name, or "step" (x0.1 at --lr_step_epochs)')
    )
    lr_step_epochs: list[int] = field(default_factory=lambda: [30], metadata=_help('epochs of the "step" decay'))
    num_warmup_steps: int = field(default=50, metadata=_help("linear warmup steps"))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("batches per optimizer step"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping; 0 = none"))
    label_smoothing: Optional[float] = field(default=None, metadata=_help("None: the SCM variant's"))
    class_weights: str = field(
        default="none",
        metadata=_help(
            '"auto" (inverse train frequency), "none", "variant" (the SCM variant\'s NIH weights), or "w0,w1,w2"'
        ),
    )
    drop_path_rate: float = field(default=0.0, metadata=_help("stochastic depth"))
    scm_warmup_fraction: float = field(
        default=0.5,
        metadata=_help("share of the epochs trained without the SCM blocks first (logits from S0), so that attention "
                       "means something before SCM diffuses it"),  # fmt: skip
    )
    scm_warmup_epochs: Optional[int] = field(default=None, metadata=_help("those epochs as a number (overrides)"))
    early_stopping_patience: int = field(default=0, metadata=_help("epochs without improvement; 0 = off"))
    metric_for_best_model: Literal["macro_f1", "accuracy", "loss", "max_box_acc", "pointing_game"] = field(
        default="macro_f1",
        metadata=_help("the validation metric that picks the saved epoch (max_box_acc, pointing_game: of the map "
                       "that points best that epoch, unsmoothed)"),  # fmt: skip
    )

    def __post_init__(self) -> None:
        _positive(self, "num_train_epochs", "max_train_steps", "per_device_train_batch_size",
                  "per_device_eval_batch_size", "gradient_accumulation_steps")  # fmt: skip
        _non_negative(self, "num_warmup_steps", "early_stopping_patience", "scm_warmup_epochs")
        for name in ("learning_rate", "scm_learning_rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                refuse(f"--{name} must be a positive number, got {value}")
        for name in ("weight_decay", "max_grad_norm", "drop_path_rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                refuse(f"--{name} must be a non-negative number, got {value}")
        if not 0 <= self.scm_warmup_fraction < 1:
            refuse(f"--scm_warmup_fraction must be in [0, 1), got {self.scm_warmup_fraction}")
        if any(epoch < 0 for epoch in self.lr_step_epochs):
            refuse(f"--lr_step_epochs must be non-negative epochs, got {self.lr_step_epochs}")
        if self.label_smoothing is not None and not 0 <= self.label_smoothing < 1:
            refuse(f"--label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _check_class_weights(self.class_weights)


@dataclass
class RunArguments:
    """What runs, where it is written, how it is checkpointed, reported and published."""

    output_dir: str = field(default="outputs/wsol", metadata=_help("the run's folder"))
    overwrite_output_dir: bool = field(default=False, metadata=_help("replace a finished run in --output_dir"))
    checkpointing_steps: Optional[str] = field(
        default="epoch", metadata=_help('N steps, "epoch" (a kill loses one epoch at most), or "none"')
    )
    resume_from_checkpoint: Optional[str] = field(default=None, metadata=_help('a checkpoint folder or "latest"'))
    checkpoints_total_limit: int = field(default=2, metadata=_help("keep the newest N checkpoints; 0 = all"))
    seed: int = field(default=42, metadata=_help("phantom series, patient split, initialization, shuffling"))
    mixed_precision: Literal["no", "fp16", "bf16"] = field(default="no", metadata=_help("autocast dtype"))
    cpu: bool = field(default=False, metadata=_help("train on CPU (automatic for multi-process runs without a GPU)"))
    cpu_threads: int = field(
        default=0,
        metadata=_help("torch threads of a run on CPU; 0: the cores this process may use, shared among this "
                       "machine's processes (OMP_NUM_THREADS is not read: accelerate launch sets it to 1 without "
                       "a config)"),  # fmt: skip
    )
    report_to: str = field(default="none", metadata=_help('"none", "all", or tracker names (tensorboard, wandb...)'))
    push_to_hub: bool = field(default=False, metadata=_help("upload the model folder to --hub_model_id"))
    hub_model_id: Optional[str] = field(default=None, metadata=_help("the model's Hub id"))
    hub_space_id: Optional[str] = field(
        default=None, metadata=_help("with --push_to_hub: also push the demo as this Space and link it from the card")
    )
    do_train: bool = field(default=True, metadata=_help("train"))
    do_eval: bool = field(default=True, metadata=_help("evaluate on validation and test"))
    map_smoothing_sigmas: list[float] = field(
        default_factory=lambda: list(SMOOTHING_SIGMAS),
        metadata=_help("Gaussian widths (tokens) each map may be smoothed with on its grid, chosen per map on the "
                       "validation boxes; 0 alone: no smoothing"),  # fmt: skip
    )
    do_predict: Optional[bool] = field(default=None, metadata=_help("None: when --predict_files are given"))
    predict_files: list[str] = field(
        default_factory=list, metadata=_help("PNG/JPEG/DICOM files or folders to predict")
    )

    def __post_init__(self) -> None:
        _non_negative(self, "checkpoints_total_limit", "cpu_threads")
        if not self.map_smoothing_sigmas:
            refuse("--map_smoothing_sigmas needs one or more widths (0 alone: no smoothing)")
        for sigma in self.map_smoothing_sigmas:  # the processor's rule for a width, checked before training
            try:
                check_smoothing(sigma, "--map_smoothing_sigmas")
            except ValueError as error:
                refuse(str(error))
        if self.checkpointing_steps == "none":
            self.checkpointing_steps = None
        steps = self.checkpointing_steps
        if steps and steps != "epoch" and not (steps.isdigit() and int(steps) > 0):
            refuse(f'--checkpointing_steps must be a positive number, "epoch" or "none", got {steps}')


ARGUMENT_CLASSES: tuple[Any, ...] = (DataArguments, ModelArguments, OptimizationArguments, RunArguments)


def _positive(arguments: Any, *names: str) -> None:
    for name in names:
        value = getattr(arguments, name)
        if value is not None and value <= 0:
            refuse(f"--{name} must be a positive integer, got {value}")


def _non_negative(arguments: Any, *names: str) -> None:
    for name in names:
        value = getattr(arguments, name)
        if value is not None and value < 0:
            refuse(f"--{name} must be non-negative, got {value}")


def _check_class_weights(spec: str) -> None:
    if spec in ("auto", "none", "variant"):
        return
    try:
        weights = [float(v) for v in spec.split(",")]
    except ValueError:
        refuse(f"--class_weights: not numbers: {spec}")
    if len(weights) != len(DEFAULT_ID2LABEL):
        refuse(f"--class_weights needs {len(DEFAULT_ID2LABEL)} comma-separated numbers, auto, none, or variant")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        refuse(f"--class_weights must be finite, non-negative and not all zero, got {spec}")


class ArgumentParser(HfArgumentParser):
    """`HfArgumentParser` whose errors are one line on stderr and exit status 2, not a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser(prog: str = "run_wsol.py") -> ArgumentParser:
    return ArgumentParser(list(ARGUMENT_CLASSES), prog=prog, description="Train, evaluate and predict with DeiT-SCM.")


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict[str, Any]:
    """The flags typed in `argv` (not those left at a default), by destination, with their parsed values."""
    saved = [action.default for action in parser._actions]  # per action: --x and --no_x share a destination
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        namespace, _ = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    finally:
        for action, default in zip(parser._actions, saved):
            action.default = default
    return vars(namespace)


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = "run_wsol.py") -> argparse.Namespace:
    """The flags as one namespace: defaults, then the recipe, then what the user typed; checked, with
    `recipe` resolved to a name or path, `recipe_values` the resolved recipe (what `recipe.json` records) and
    `config_overrides` parsed. A refused flag exits with one line and status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    try:
        given = given_flags(parser, argv)

        def value(name: str) -> Any:  # as typed, else the flag's default (the recipe is not applied yet)
            return given[name] if name in given else parser.get_default(name)

        pretrained = bool(value("backbone_weights") or value("model_name_or_path"))
        recipe = resolve_recipe(value("recipe"), value("scm_variant"), pretrained)
        defaults = dict(recipe.training)
        if "learning_rate" in given and "scm_learning_rate" not in given:
            # One flag scales the whole recipe: SCM blocks and head follow the backbone at the recipe's ratio.
            ratio = defaults.get("scm_learning_rate", parser.get_default("scm_learning_rate")) / defaults.get(
                "learning_rate", parser.get_default("learning_rate")
            )
            defaults["scm_learning_rate"] = given["learning_rate"] * ratio
        parser.set_defaults(**defaults)
        namespace = parser.parse_args(argv)  # --help prints here, with the recipe's values
        parsed = [cls(**{f.name: getattr(namespace, f.name) for f in fields(cls)}) for cls in ARGUMENT_CLASSES]
        args = argparse.Namespace(**{k: v for part in parsed for k, v in asdict(part).items()})
        args.recipe = recipe.name
        args.recipe_values = recipe.resolved({name: getattr(args, name) for name in recipe_flag_names()})
        args.config_overrides = parse_overrides(args.config_overrides)
        check_arguments(args, set(given))
    except RunInputError as error:
        sys.stderr.write(f"{prog}: error: {error}\n")
        raise SystemExit(2) from None
    return args


def recipe_flag_names() -> tuple[str, ...]:
    """The flags a recipe may set: every training flag but `--recipe` itself."""
    return tuple(f.name for f in fields(OptimizationArguments) if f.name != "recipe")


def check_arguments(args: argparse.Namespace, given: set[str]) -> None:
    """What one dataclass cannot check alone: flags that contradict each other, files that must exist, the
    model the flags would build. Raises `RunInputError`."""
    inapplicable = [f"--{name}" for name in NEW_MODEL_FLAGS if name in given]
    if args.model_name_or_path:
        if inapplicable:
            refuse(f"{', '.join(inapplicable)} cannot apply with --model_name_or_path: the saved model's config and "
                   "processor fix them (config fields go in --config_overrides)")  # fmt: skip
        args.image_size = None
    if args.dataset == "nih":
        if not args.data_dir:
            refuse("--dataset nih needs --data_dir")
        if not Path(args.data_dir).is_dir():
            refuse(f"--data_dir {args.data_dir} is not a folder")
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        if not Path(args.resume_from_checkpoint).is_dir():
            refuse(f"--resume_from_checkpoint {args.resume_from_checkpoint} does not exist")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if args.model_name_or_path and not Path(args.model_name_or_path).exists() and offline:
        refuse(f"--model_name_or_path {args.model_name_or_path} is not a folder and the hub is offline")
    args.predict_files = expand_predict_files(args.predict_files)
    if args.do_predict is None:
        args.do_predict = bool(args.predict_files)
    if args.do_predict and not args.predict_files:
        refuse("--do_predict needs --predict_files")
    if not args.do_train and (args.do_eval or args.do_predict) and not args.model_name_or_path:
        refuse("evaluation or prediction without training needs --model_name_or_path")
    if args.push_to_hub and not args.hub_model_id:
        refuse("--push_to_hub needs --hub_model_id")
    check_model_flags(args)
    check_output_dir(args)


def model_fields(args: argparse.Namespace) -> dict[str, Any]:
    """A new model's config fields beyond the preset: flags, then the recipe's model fields, then overrides."""
    variant = SCM_VARIANTS[args.scm_variant]
    smoothing = variant["label_smoothing"] if args.label_smoothing is None else args.label_smoothing
    return {
        "image_size": args.image_size,
        "drop_path_rate": args.drop_path_rate,
        "label_smoothing": smoothing,
        **args.recipe_values.get("model_config", {}),
        **args.config_overrides,
    }


def check_model_flags(args: argparse.Namespace) -> None:
    """The config the flags would build and the trackers, checked before any data is built: a typo in
    --config_overrides or an image size the patch does not divide is one line."""
    from accelerate.utils import LoggerType

    unknown = sorted(set(args.config_overrides) - set(DeiTSCMConfig().to_dict()))
    if unknown:
        refuse(f"--config_overrides: unknown config field(s) {', '.join(unknown)} (see configuration_deit_scm.py)")
    if not args.model_name_or_path:
        try:
            DeiTSCMConfig.from_preset(args.preset, args.scm_variant, **model_fields(args))
        except (ValueError, TypeError) as error:
            refuse(f"these flags make an invalid model: {error}")
    trackers = {t.value for t in LoggerType} | {"none"}
    bad = [name for name in args.report_to.split(",") if name.strip() not in trackers]
    if bad:
        refuse(f"--report_to: unknown tracker(s) {', '.join(bad)}; choose from {', '.join(sorted(trackers))}")


def check_output_dir(args: argparse.Namespace) -> None:
    """A file, a folder of someone else's files, or a finished run (without --overwrite_output_dir) is refused."""
    from deit_scm_cxr.training.checkpoints import foreign_outputs

    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        refuse(f"--output_dir {output} is a file, not a folder")
    foreign = foreign_outputs(output)
    if foreign and (args.do_train or args.push_to_hub):
        refuse(f"--output_dir {output} holds {', '.join(p.name for p in foreign)}, which no run wrote and a run "
               "would write over; choose another --output_dir")  # fmt: skip
    fresh = not (args.overwrite_output_dir or args.resume_from_checkpoint)
    if args.do_train and fresh and ((output / "config.json").exists() or (output / "checkpoints").exists()):
        refuse(f"--output_dir {output} already holds a run; add --overwrite_output_dir or --resume_from_checkpoint")


def expand_predict_files(paths: Sequence[str]) -> list[str]:
    """Files as given; a folder stands for its images (DICOM/PNG/JPEG/TIFF by suffix, sorted, not recursive)."""
    files: list[str] = []
    for path in paths:
        entry = Path(path)
        if entry.is_dir():
            found = sorted(str(p) for p in entry.iterdir() if p.is_file() and p.suffix.lower() in PREDICT_SUFFIXES)
            if not found:
                refuse(f"--predict_files: the folder {path} holds no {'/'.join(PREDICT_SUFFIXES)} files")
            files += found
        elif entry.is_file():
            files.append(path)
        else:
            refuse(f"--predict_files: {path} does not exist")
    return files


__all__ = [
    "ARGUMENT_CLASSES", "ArgumentParser", "DataArguments", "ModelArguments", "OptimizationArguments", "Recipe",
    "RunArguments", "build_parser", "check_arguments", "given_flags", "model_fields", "parse_args",
    "recipe_flag_names",
]  # fmt: skip
