"""Train, evaluate and predict with DeiT-SCM for weakly supervised localization on chest radiographs.

    accelerate launch run_wsol.py                         # the embedded phantom dataset, CPU-friendly defaults
    accelerate launch run_wsol.py --dataset nih --data_dir /data/nih --preset deit-small \
        --backbone_weights deit_small_patch16_224.pth --image_size 224
    python run_wsol.py --do_train false --do_eval false --model_name_or_path outputs/wsol \
        --predict_files patient.dcm other.png          # prediction only: JSON + overlays

Everything lands in `--output_dir`: the model and processor (remote code, safetensors) with a model card,
`all_results.json`, `metrics_plots/`, `heatmap_comparisons/`, `localization_samples/`, `checkpoints/`.
Classification is trained from image labels only; boxes are used for evaluation, with the heatmap
threshold calibrated on a validation split and the test-set oracle reported beside it.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch

from configuration_deit_scm import BACKBONE_PRESETS, SCM_VARIANTS, DeiTSCMConfig
from cxr_data import CLASS_NAMES
from modeling_deit_scm import DeiTSCMForImageClassification
from wsol_card import CardSettings
from wsol_checkpoints import (
    LOCK_FILE,
    TrainState,
    acquire_output_lock,
    clear_run_outputs,
    foreign_outputs,
    load_model_folder,
    release_output_lock,
)
from wsol_data import (
    DataSettings,
    PixelNormalizer,
    build_processor,
    prepare_all,
)
from wsol_evaluation import EvaluationSettings, final_evaluation
from wsol_outputs import (
    predict_files,
    push_to_hub,
    save_model,
    write_run_outputs,
)
from wsol_recipes import (
    RECIPE_CHOICES,
    RECIPES,
    Recipe,
    RunInputError,
    parse_overrides,
    recipe_fills,
    recipe_name,
    resolve_recipe,
)
from wsol_reporting import environment
from wsol_training import TrainingSettings, build_components, resume_and_train

# What a failed write that is the user's to fix looks like: no space or quota left, a read-only or foreign folder.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
logger = logging.getLogger("run_wsol")


# ================================================================================================
# Arguments
# ================================================================================================


class OneLineArgumentParser(argparse.ArgumentParser):
    """Bad flags end with one line on stderr and exit code 2, not a usage block or a traceback."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "y"):
        return True
    if text.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="run_wsol.py", description=__doc__.split("\n\n")[0])
    for add in (_data_arguments, _model_arguments, _optimization_arguments, _run_arguments):
        add(parser)
    args = parser.parse_args(argv)
    refuse_inapplicable_flags(args, parser)
    apply_recipe(args)
    validate_args(args, parser)
    return args


DEFAULT_IMAGE_SIZE = 96
# Flags that shape a new model: a saved model (--model_name_or_path) brings its own config and processor.
NEW_MODEL_FLAGS = ("image_size", "label_smoothing", "drop_path_rate")


def refuse_inapplicable_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """A flag the run would drop without a word is an error; the image size defaults for a new model."""
    given = [f"--{name}" for name in NEW_MODEL_FLAGS if getattr(args, name) is not None]
    if args.model_name_or_path and given:
        parser.error(
            f"{', '.join(given)} cannot apply with --model_name_or_path: the saved model's config and processor "
            "fix them (config fields go in --config_overrides)"
        )
    if args.image_size is None and not args.model_name_or_path:
        args.image_size = DEFAULT_IMAGE_SIZE


PREDICT_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff")


def expand_predict_files(paths: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """Files as given; a folder stands for its images (DICOM/PNG/JPEG/TIFF by suffix, sorted, not recursive)."""
    files: list[str] = []
    for path in paths:
        entry = Path(path)
        if entry.is_dir():
            found = sorted(str(p) for p in entry.iterdir() if p.is_file() and p.suffix.lower() in PREDICT_SUFFIXES)
            if not found:
                parser.error(f"--predict_files: the folder {path} holds no {'/'.join(PREDICT_SUFFIXES)} files")
            files += found
        elif entry.is_file():
            files.append(path)
        else:
            parser.error(f"--predict_files: {path} does not exist")
    return files


def _settings(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """A module's settings dataclass from the flags of the same names (`given` for the others)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.name not in given}, **given)


@dataclass(frozen=True)
class ModelSettings:
    """The model a run trains or loads, resolved once from preset, SCM variant, recipe, flags and
    `--config_overrides` (the class weights wait for the training labels: `class_weights_from`)."""

    model_name_or_path: Optional[str] = None  # a saved model: its own config, `overrides` applied
    preset: str = "deit-micro"
    scm_variant: str = "cxr"
    config_fields: Mapping[str, Any] = field(default_factory=dict)  # a new model's fields beyond the preset
    overrides: Mapping[str, Any] = field(default_factory=dict)  # --config_overrides
    class_weights: str = "variant"  # "auto" | "none" | "variant" | "w0,w1,w2"
    backbone_weights: Optional[str] = None


@dataclass(frozen=True)
class RunSettings:
    """Everything one run does, resolved from the flags in one place (`resolve_settings`); each module
    receives its own part. `flags` keeps the flags as given (after the recipe) for all_results.json and
    the checkpoints' resume check."""

    data: DataSettings
    evaluation: EvaluationSettings
    training: TrainingSettings
    card: CardSettings
    model: ModelSettings
    recipe: str
    image_size: Optional[int]  # a new model's processor; None: the saved model's own
    do_train: bool
    do_eval: bool
    do_predict: bool
    predict_files: tuple[str, ...]
    resume_from_checkpoint: Optional[str]
    overwrite_output_dir: bool
    seed: int
    cpu: bool
    mixed_precision: str
    report_to: str
    flags: Mapping[str, Any]

    @property
    def output_dir(self) -> Path:
        return Path(self.card.output_dir)

    def inputs(self) -> list[Path]:
        """Local paths the run reads: what `--overwrite_output_dir` must never delete."""
        model, data = self.model, self.data
        named = [model.model_name_or_path, model.backbone_weights, data.data_dir, data.cache_dir, *self.predict_files]
        return [Path(p) for p in named if p and Path(p).exists()]


def model_settings(args: argparse.Namespace) -> ModelSettings:
    variant = SCM_VARIANTS[args.scm_variant]
    overrides = dict(args.config_overrides or {})
    smoothing = variant["label_smoothing"] if args.label_smoothing is None else args.label_smoothing
    fields_ = {
        "image_size": args.image_size,
        "drop_path_rate": args.drop_path_rate,
        "label_smoothing": smoothing,
        **RECIPES[args.recipe].config,
        **overrides,
    }
    return ModelSettings(args.model_name_or_path, args.preset, args.scm_variant, fields_, overrides,
                         args.class_weights, args.backbone_weights)  # fmt: skip


def resolve_settings(args: argparse.Namespace) -> RunSettings:
    """The parsed (and validated) flags as the settings each part of the run takes."""
    run_flags = ("recipe", "image_size", "do_train", "do_eval", "do_predict", "resume_from_checkpoint",
                 "overwrite_output_dir", "seed", "cpu", "mixed_precision", "report_to")  # fmt: skip
    return RunSettings(
        data=_settings(DataSettings, args, report_dir=args.output_dir),
        evaluation=_settings(EvaluationSettings, args, batch_size=args.per_device_eval_batch_size),
        training=_settings(TrainingSettings, args, lr_step_epochs=tuple(args.lr_step_epochs),
                           scm_warmup_fraction=RECIPES[args.recipe].scm_warmup_fraction),  # fmt: skip
        card=_settings(CardSettings, args),
        model=model_settings(args),
        predict_files=tuple(args.predict_files),
        flags=dict(vars(args)),
        **{name: getattr(args, name) for name in run_flags},
    )


def apply_recipe(args: argparse.Namespace) -> Recipe:
    """Fill every flag left at None from the recipe (`auto` resolved); record the recipe's name."""
    pretrained = bool(args.backbone_weights or args.model_name_or_path)
    recipe = resolve_recipe(args.recipe, args.scm_variant, pretrained)
    vars(args).update(recipe_fills(recipe, vars(args)))
    args.recipe = recipe.name
    return recipe


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=("phantoms", "nih"), default="phantoms")
    data.add_argument("--data_dir", help="NIH ChestX-ray14 folder (images, Data_Entry_2017*.csv, BBox_List_2017.csv)")
    data.add_argument("--num_phantoms", type=_positive_int, default=1200, help="phantom training images")
    data.add_argument("--phantom_size", type=_positive_int, default=256)
    data.add_argument("--max_train_samples", type=_positive_int)
    data.add_argument("--max_eval_samples", type=_positive_int)
    data.add_argument("--view", choices=("all", "PA", "AP"), default="all")
    data.add_argument("--augment", type=_bool, default=True, help="random affine jitter of training images")
    data.add_argument("--cache_dir", help="preprocessed-array cache (default: HF_DATASETS_CACHE/deit_scm_preprocessed)")
    data.add_argument(
        "--preprocessing_num_workers",
        type=_positive_int,
        default=max(1, min(8, (os.cpu_count() or 1))),
        help="processes for the one-time preprocessing map",
    )
    data.add_argument("--num_workers", type=int, default=0)


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="a saved DeiT-SCM folder or Hub id (instead of --preset)")
    model.add_argument("--preset", choices=sorted(BACKBONE_PRESETS), default="deit-micro")
    model.add_argument("--scm_variant", choices=sorted(SCM_VARIANTS), default="cxr")
    # Parsed here, once: every later use reads the dict.
    model.add_argument("--config_overrides", type=parse_overrides, help='e.g. "hidden_size=64,num_hidden_layers=4"')
    model.add_argument("--backbone_weights", help="timm/transformers DeiT checkpoint, or timm:<name>")
    model.add_argument("--image_size", type=_positive_int, help=f"default {DEFAULT_IMAGE_SIZE}; a saved model's own")
    model.add_argument("--torch_compile", action="store_true")


def _optimization_arguments(parser: argparse.ArgumentParser) -> None:
    train = parser.add_argument_group("training")
    train.add_argument(
        "--recipe",
        type=recipe_name,
        choices=RECIPE_CHOICES,
        default="auto",
        help="defaults of the training flags below (wsol_recipes.py): scratch when nothing pretrained is loaded, "
        "else the SCM variant's (paper: official, the official SCM training; cxr: cxr_finetune, the chest X-ray "
        "fine-tuning)",
    )
    train.add_argument("--num_train_epochs", type=_positive_int)
    train.add_argument("--max_train_steps", type=_positive_int)
    train.add_argument("--per_device_train_batch_size", type=_positive_int)
    train.add_argument("--per_device_eval_batch_size", type=_positive_int, default=64)
    train.add_argument(
        "--learning_rate", type=float, help="backbone; SCM and head follow at the recipe's ratio unless given"
    )
    train.add_argument("--scm_learning_rate", type=float, help="SCM blocks and head")
    train.add_argument("--weight_decay", type=float)
    train.add_argument(
        "--lr_scheduler_type", help='a transformers scheduler name, or "step" (x0.1 at --lr_step_epochs)'
    )
    train.add_argument("--lr_step_epochs", type=int, nargs="*", default=[30], help='epochs of the "step" decay')
    train.add_argument("--num_warmup_steps", type=int)
    train.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1)
    train.add_argument("--max_grad_norm", type=float, help="0 = no clipping")
    train.add_argument("--label_smoothing", type=float, help="defaults to the SCM variant's")
    train.add_argument(
        "--class_weights",
        help='"auto" (inverse train frequency), "none", "variant" (the SCM variant\'s NIH weights), or "w0,w1,w2"',
    )
    train.add_argument("--drop_path_rate", type=float)
    train.add_argument(
        "--scm_warmup_epochs",
        type=int,
        help="epochs trained without the SCM blocks first (logits from S0), so that attention means something "
        "before SCM diffuses it; default 0 with pretrained weights, half the epochs from scratch",
    )
    train.add_argument("--early_stopping_patience", type=int, help="epochs without improvement; 0 = off")
    train.add_argument(
        "--metric_for_best_model", default="macro_f1", choices=("macro_f1", "accuracy", "loss", "max_box_acc")
    )


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    train = parser.add_argument_group("run")
    train.add_argument("--output_dir", default="outputs/wsol")
    train.add_argument("--overwrite_output_dir", action="store_true")
    train.add_argument(
        "--checkpointing_steps", default="epoch", help='N steps, "epoch" (default: a kill loses one epoch), or "none"'
    )
    train.add_argument("--resume_from_checkpoint", help='a checkpoint folder or "latest"')
    train.add_argument(
        "--checkpoints_total_limit", type=_non_negative_int, default=2, help="keep the newest N checkpoints; 0 = all"
    )
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    train.add_argument(
        "--cpu", action="store_true", help="train on CPU (automatic for multi-process runs without a GPU)"
    )
    train.add_argument("--report_to", default="none", help='"none", "all", or tracker names (tensorboard, wandb...)')
    train.add_argument("--push_to_hub", action="store_true")
    train.add_argument("--hub_model_id")
    train.add_argument(
        "--hub_space_id", help="with --push_to_hub: also push the demo (demo/) as this Space and link it from the card"
    )
    actions = parser.add_argument_group("what to run")
    actions.add_argument("--do_train", type=_bool, default=True)
    actions.add_argument("--do_eval", type=_bool, default=True)
    actions.add_argument("--do_predict", type=_bool, default=None, help="default: when --predict_files are given")
    actions.add_argument("--predict_files", nargs="*", default=[], help="PNG/JPEG/DICOM files to predict")


def validate_model_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The config the flags would build, trackers, workers and schedule milestones, checked before any
    data is built: a typo in --config_overrides or an image size the patch does not divide is one line."""
    from accelerate.utils import LoggerType

    unknown = sorted(set(args.config_overrides or {}) - set(DeiTSCMConfig().to_dict()))
    if unknown:
        parser.error(
            f"--config_overrides: unknown config field(s) {', '.join(unknown)} (see configuration_deit_scm.py)"
        )
    if not args.model_name_or_path:
        try:
            DeiTSCMConfig.from_preset(args.preset, args.scm_variant, **model_settings(args).config_fields)
        except (ValueError, TypeError) as error:
            parser.error(f"these flags make an invalid model: {error}")
    trackers = {t.value for t in LoggerType} | {"none"}
    bad = [name for name in args.report_to.split(",") if name.strip() not in trackers]
    if bad:
        parser.error(f"--report_to: unknown tracker(s) {', '.join(bad)}; choose from {', '.join(sorted(trackers))}")
    for name in ("num_workers", "preprocessing_num_workers"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be non-negative, got {getattr(args, name)}")
    if any(epoch < 0 for epoch in args.lr_step_epochs):
        parser.error(f"--lr_step_epochs must be non-negative epochs, got {args.lr_step_epochs}")


def validate_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Check what argparse cannot; every failure is one line (`parser.error`)."""
    if args.dataset == "nih":
        if not args.data_dir:
            parser.error("--dataset nih needs --data_dir")
        if not Path(args.data_dir).is_dir():
            parser.error(f"--data_dir {args.data_dir} is not a folder")
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        if not Path(args.resume_from_checkpoint).is_dir():
            parser.error(f"--resume_from_checkpoint {args.resume_from_checkpoint} does not exist")
    if args.checkpointing_steps == "none":
        args.checkpointing_steps = None
    if args.checkpointing_steps and args.checkpointing_steps != "epoch" and not args.checkpointing_steps.isdigit():
        parser.error(f'--checkpointing_steps must be a number, "epoch" or "none", got {args.checkpointing_steps}')
    if args.checkpointing_steps and args.checkpointing_steps.isdigit() and int(args.checkpointing_steps) <= 0:
        parser.error("--checkpointing_steps must be positive")
    if (
        args.model_name_or_path
        and not Path(args.model_name_or_path).exists()
        and os.environ.get("HF_HUB_OFFLINE") == "1"
    ):
        parser.error(f"--model_name_or_path {args.model_name_or_path} is not a folder and the hub is offline")
    args.predict_files = expand_predict_files(args.predict_files, parser)
    if args.do_predict is None:
        args.do_predict = bool(args.predict_files)
    if args.do_predict and not args.predict_files:
        parser.error("--do_predict needs --predict_files")
    if not args.do_train and (args.do_eval or args.do_predict) and not args.model_name_or_path:
        parser.error("evaluation or prediction without training needs --model_name_or_path")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    validate_model_flags(args, parser)
    validate_numbers(args, parser)
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        parser.error(f"--output_dir {output} is a file, not a folder")
    foreign = foreign_outputs(output)
    if foreign and (args.do_train or args.push_to_hub):
        parser.error(
            f"--output_dir {output} holds {', '.join(p.name for p in foreign)}, which no run wrote and a run "
            "would write over; choose another --output_dir"
        )
    fresh = not (args.overwrite_output_dir or args.resume_from_checkpoint)
    if args.do_train and fresh and ((output / "config.json").exists() or (output / "checkpoints").exists()):
        parser.error(
            f"--output_dir {output} already holds a run; add --overwrite_output_dir or --resume_from_checkpoint"
        )


def validate_numbers(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Rates, decays, patience, smoothing and class weights: finite and in range."""
    for name in ("learning_rate", "scm_learning_rate"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            parser.error(f"--{name} must be a positive number, got {value}")
    for name in ("weight_decay", "max_grad_norm", "drop_path_rate"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            parser.error(f"--{name} must be a non-negative number, got {value}")
    for name in ("num_warmup_steps", "early_stopping_patience"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be non-negative, got {getattr(args, name)}")
    if args.label_smoothing is not None and not 0 <= args.label_smoothing < 1:
        parser.error(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.class_weights not in ("auto", "none", "variant"):
        try:
            weights = [float(v) for v in args.class_weights.split(",")]
        except ValueError:
            parser.error(f"--class_weights: not numbers: {args.class_weights}")
        if len(weights) != len(CLASS_NAMES):
            parser.error(f"--class_weights needs {len(CLASS_NAMES)} comma-separated numbers, auto, none, or variant")
        if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            parser.error(f"--class_weights must be finite, non-negative and not all zero, got {args.class_weights}")


# ================================================================================================
# Model, optimizer
# ================================================================================================


def class_weights_from(
    spec: str, labels: torch.Tensor, default: Optional[list[float]]
) -> Optional[list[float]]:
    """`--class_weights` ("variant": `default`, "none", "auto": from the training labels, or "w0,w1,w2")."""
    if spec == "variant":
        return default
    if spec == "none":
        return None
    if spec == "auto":
        return class_weights_from_counts(labels)
    return [float(v) for v in spec.split(",")]


def class_weights_from_counts(labels: torch.Tensor) -> list[float]:
    """Inverse class frequency, normalized to sum to 1 (the form of the project's NIH weights)."""
    counts = torch.bincount(labels, minlength=len(CLASS_NAMES)).double().clamp_min(1)
    inverse = 1.0 / counts
    return [round(float(w), 4) for w in inverse / inverse.sum()]


def build_model(settings: ModelSettings, train_labels: torch.Tensor) -> DeiTSCMForImageClassification:
    if settings.model_name_or_path:
        model = load_model_folder(settings.model_name_or_path, DeiTSCMForImageClassification, settings.overrides)
    else:
        default = SCM_VARIANTS[settings.scm_variant]["class_weights"]
        weights = class_weights_from(settings.class_weights, train_labels, default)
        config = DeiTSCMConfig.from_preset(
            settings.preset, settings.scm_variant, class_weights=weights, **settings.config_fields
        )
        model = DeiTSCMForImageClassification(config)
    if settings.backbone_weights:
        from convert_deit_weights import load_backbone_weights

        report = load_backbone_weights(model, settings.backbone_weights)
        logger.info(
            "backbone weights: %d missing, %d unused keys", len(report.missing_keys), len(report.unexpected_keys)
        )
    return model


# ================================================================================================
# Main
# ================================================================================================


def make_accelerator(
    cpu: bool, gradient_accumulation_steps: int, mixed_precision: str, report_to: str, output_dir: Path
) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration

    # Accelerate runs several CPU processes (gloo) only when told it is on CPU.
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=cpu or (several and not torch.cuda.is_available()),
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir)),
        # Pinned batches (make_loader) copied without blocking: the copy overlaps the step on a GPU.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
        # SCM's lambda and beta get no gradient while the blocks are warming up.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def start_run(settings: RunSettings) -> tuple[Any, Path]:
    """The Accelerator, logging, the seed and a clean (or resumed) output folder."""
    from accelerate.utils import set_seed

    output_dir = settings.output_dir
    accelerator = make_accelerator(settings.cpu, settings.training.gradient_accumulation_steps,
                                   settings.mixed_precision, settings.report_to, output_dir)  # fmt: skip
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    set_seed(settings.seed)
    if accelerator.is_main_process:
        fresh = settings.do_train and not settings.resume_from_checkpoint
        output_dir.mkdir(parents=True, exist_ok=True)
        lock = acquire_output_lock(output_dir)  # before anything is cleared or written: one run per folder
        if settings.overwrite_output_dir and fresh:
            try:
                clear_run_outputs(output_dir, settings.inputs())
            except BaseException:  # refused: the folder is left as it was found
                release_output_lock(lock)
                raise
    accelerator.wait_for_everyone()
    if settings.report_to != "none":
        scalars = {k: v for k, v in settings.flags.items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("run_wsol", config=scalars)
    return accelerator, output_dir


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Parse, run, and turn a refused input (`RunInputError`) into one line and exit status 2."""
    settings = resolve_settings(parse_args(argv))
    try:
        return run(settings)
    except RunInputError as error:
        sys.stderr.write(f"run_wsol.py: error: {error}\n")
        raise SystemExit(2) from None
    except OSError as error:
        if error.errno not in WRITE_ERRORS:
            raise
        # A full disk, a read-only or foreign folder: the user's to fix, said in one line.
        sys.stderr.write(f"run_wsol.py: error: cannot write {error.filename or settings.output_dir}: "
                         f"{error.strerror}\n")  # fmt: skip
        raise SystemExit(2) from None


def run(settings: RunSettings) -> dict[str, Any]:
    """Train, evaluate, predict and publish as the settings say; returns what all_results.json holds."""
    accelerator, output_dir = start_run(settings)
    try:
        return _run_in(settings, accelerator, output_dir)
    finally:  # the folder is free again however the run ends (a killed run's stale lock is taken over)
        release_output_lock(output_dir / LOCK_FILE)


def _run_in(settings: RunSettings, accelerator: Any, output_dir: Path) -> dict[str, Any]:
    """`run` after the output folder is set up and locked."""
    processor = build_processor(settings.model.model_name_or_path, settings.image_size)
    results: dict[str, Any] = {"args": dict(settings.flags), "num_processes": accelerator.num_processes}
    needs_data = settings.do_train or settings.do_eval
    splits = prepare_all(settings.data, processor, accelerator) if needs_data else {}
    model = build_model(settings.model, splits["train"].labels if splits else torch.zeros(0, dtype=torch.long))
    # The configuration trained, resolved once from preset, variant, recipe, flags and overrides, in full.
    results["model_config"] = model.config.to_dict()
    logger.info("recipe %s; model configuration: %s", settings.recipe, json.dumps(results["model_config"], default=str))
    normalizer = PixelNormalizer(processor)
    parts = build_components(settings.training, accelerator, model, splits["train"], normalizer) if splits else None
    state, predictions = TrainState(), {}
    if settings.do_train:
        state = train_and_save(settings, parts, splits, processor, output_dir)
        results["training"] = training_summary(state)
    if settings.do_eval:
        evaluation = final_evaluation(settings.evaluation, parts, splits)
        results.update(evaluation.results)
        predictions = evaluation.predictions
        processor.localization_threshold, processor.localization_map = evaluation.threshold, evaluation.map_output
        # Probabilities leave the model calibrated: the temperature travels in its config; so do the
        # out-of-distribution score's training statistics and its alarm threshold.
        trained_config = accelerator.unwrap_model(parts.model).config
        trained_config.calibration_temperature = evaluation.temperature
        trained_config.update(evaluation.ood)
        # What was fitted after training is recorded as saved (the statistics' arrays stay in config.json).
        results["model_config"] = {key: value for key, value in trained_config.to_dict().items()
                                   if key not in ("ood_class_means", "ood_precision")}  # fmt: skip
    results["environment"] = environment()
    if accelerator.is_main_process and needs_data:
        write_run_outputs(settings.card, settings.do_eval, accelerator, parts.model, processor, results, state,
                          splits, predictions)  # fmt: skip
    if settings.do_predict and accelerator.is_main_process:
        model_for_prediction = accelerator.unwrap_model(parts.model) if parts else model
        results["predictions"] = predict_files(settings.predict_files, model_for_prediction, processor, output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if settings.card.push_to_hub and accelerator.is_main_process:
        push_to_hub(settings.card.hub_model_id, settings.card.hub_space_id, output_dir)
    return results


def train_and_save(
    settings: RunSettings, parts: Any, splits: dict[str, Any], processor: Any, output_dir: Path
) -> TrainState:
    """Train (or resume), then save the model and processor before anything after training can fail."""
    state = resume_and_train(settings.training, settings.evaluation, parts, splits["validation"], output_dir,
                             settings.resume_from_checkpoint, settings.flags)  # fmt: skip
    if parts.accelerator.is_main_process:
        save_model(parts.accelerator, parts.model, processor, output_dir)
    return state


def training_summary(state: TrainState) -> dict[str, Any]:
    return {
        "steps": state.global_step,
        "epochs": state.epoch,
        "best_epoch": state.best_epoch,
        "scm_warmup_epochs": state.scm_warmup_epochs,
        "history": state.history,
    }


if __name__ == "__main__":
    main()
