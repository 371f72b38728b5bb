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
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from configuration_deit_scm import BACKBONE_PRESETS, SCM_VARIANTS, DeiTSCMConfig
from cxr_data import CLASS_NAMES
from modeling_deit_scm import DeiTSCMForImageClassification
from wsol_checkpoints import (
    TrainState,
    clear_run_outputs,
    foreign_outputs,
    load_checkpoint,
    load_model_folder,
    resolve_checkpoint,
    run_settings,
    save_checkpoint,
    set_aside_later_checkpoints,
)
from wsol_data import (
    PixelNormalizer,
    PreparedSplit,
    augment_batch,
    build_processor,
    make_loader,
    prepare_all,
)
from wsol_evaluation import final_evaluation, validation_metrics
from wsol_outputs import (
    expand_predict_files,
    predict_files,
    push_to_hub,
    save_model,
    write_run_outputs,
)
from wsol_recipes import RECIPE_CHOICES, apply_recipe, resolve_recipe
from wsol_reporting import environment

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
    apply_recipe(args)
    validate_args(args, parser)
    return args


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
    model.add_argument("--config_overrides", help='e.g. "hidden_size=64,num_hidden_layers=4"')
    model.add_argument("--backbone_weights", help="timm/transformers DeiT checkpoint, or timm:<name>")
    model.add_argument("--image_size", type=_positive_int, default=96)
    model.add_argument("--torch_compile", action="store_true")


def _optimization_arguments(parser: argparse.ArgumentParser) -> None:
    train = parser.add_argument_group("training")
    train.add_argument(
        "--recipe",
        choices=RECIPE_CHOICES,
        default="auto",
        help="defaults of the training flags below (wsol_recipes.py): scratch when nothing pretrained is loaded, "
        "else the SCM variant's (paper: the official SCM training; cxr: the chest X-ray fine-tuning)",
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

    overrides = parse_overrides(args.config_overrides)
    unknown = sorted(set(overrides) - set(DeiTSCMConfig().to_dict()))
    if unknown:
        parser.error(
            f"--config_overrides: unknown config field(s) {', '.join(unknown)} (see configuration_deit_scm.py)"
        )
    if not args.model_name_or_path:
        try:
            DeiTSCMConfig.from_preset(args.preset, args.scm_variant, **config_settings(args))
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


def parse_overrides(text: Optional[str]) -> dict[str, Any]:
    """ "a=1,b=0.5,c=last" -> {"a": 1, "b": 0.5, "c": "last"}."""
    overrides: dict[str, Any] = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value.strip()
    return overrides


def class_weights_from(
    args: argparse.Namespace, labels: torch.Tensor, default: Optional[list[float]]
) -> Optional[list[float]]:
    if args.class_weights == "variant":
        return default
    if args.class_weights == "none":
        return None
    if args.class_weights == "auto":
        return class_weights_from_counts(labels)
    return [float(v) for v in args.class_weights.split(",")]


def class_weights_from_counts(labels: torch.Tensor) -> list[float]:
    """Inverse class frequency, normalized to sum to 1 (the form of the project's NIH weights)."""
    counts = torch.bincount(labels, minlength=len(CLASS_NAMES)).double().clamp_min(1)
    inverse = 1.0 / counts
    return [round(float(w), 4) for w in inverse / inverse.sum()]


def config_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Config fields the flags set (not the class weights, which need the training labels): one place for
    the config `build_model` makes and the one `validate_model_flags` checks."""
    variant = SCM_VARIANTS[args.scm_variant]
    smoothing = variant["label_smoothing"] if args.label_smoothing is None else args.label_smoothing
    return {
        "image_size": args.image_size,
        "drop_path_rate": args.drop_path_rate,
        "label_smoothing": smoothing,
        **resolve_recipe(args).config,
        **parse_overrides(args.config_overrides),
    }


def build_model(args: argparse.Namespace, train_labels: torch.Tensor) -> DeiTSCMForImageClassification:
    if args.model_name_or_path:
        model = load_model_folder(args.model_name_or_path, DeiTSCMForImageClassification,
                                  parse_overrides(args.config_overrides))  # fmt: skip
    else:
        weights = class_weights_from(args, train_labels, SCM_VARIANTS[args.scm_variant]["class_weights"])
        config = DeiTSCMConfig.from_preset(
            args.preset, args.scm_variant, class_weights=weights, **config_settings(args)
        )
        model = DeiTSCMForImageClassification(config)
    if args.backbone_weights:
        from convert_deit_weights import load_backbone_weights

        report = load_backbone_weights(model, args.backbone_weights)
        logger.info(
            "backbone weights: %d missing, %d unused keys", len(report.missing_keys), len(report.unexpected_keys)
        )
    return model


def build_optimizer(args: argparse.Namespace, model: DeiTSCMForImageClassification) -> torch.optim.Optimizer:
    groups = model.parameter_groups(args.learning_rate, args.scm_learning_rate, args.weight_decay)
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups])


# ================================================================================================
# Training
# ================================================================================================


@dataclass
class Components:
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    train_loader: Any
    normalizer: PixelNormalizer
    steps_per_epoch: int
    max_steps: int
    scm_warmup_epochs: int  # epochs before the SCM blocks run; the schedule re-warms at that epoch
    # The best epoch's weights (CPU), which early stopping restores at the end; every checkpoint carries
    # them, so a resumed run restores the same ones.
    best_weights: Optional[dict[str, torch.Tensor]] = None


def build_components(args, accelerator, model, train_split: PreparedSplit, normalizer: PixelNormalizer) -> Components:
    from transformers import get_scheduler

    loader = make_loader(train_split, args.per_device_train_batch_size, shuffle=True, num_workers=args.num_workers)
    optimizer = build_optimizer(args, model)
    updates_per_epoch = math.ceil(len(loader) / max(accelerator.num_processes, 1) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    if args.lr_scheduler_type == "step":
        # The official SCM schedule: x0.1 at each of --lr_step_epochs. Accelerate steps a prepared
        # scheduler once per process for every optimizer step.
        per_epoch = updates_per_epoch * accelerator.num_processes
        milestones = sorted(args.lr_step_epochs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.1 ** sum(step // per_epoch >= m for m in milestones)
        )
    else:
        scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer=optimizer,
            num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
            num_training_steps=max_steps * accelerator.num_processes,
        )
    switch = scm_warmup_epochs(args, math.ceil(max_steps / updates_per_epoch))
    if switch > 0:  # the SCM blocks switch on mid-training: re-warm from there
        rewarm_learning_rate(
            scheduler,
            switch * updates_per_epoch * accelerator.num_processes,
            updates_per_epoch * accelerator.num_processes,
        )
    if args.torch_compile:
        model = torch.compile(model)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    normalizer = normalizer.to(accelerator.device)
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    return Components(accelerator, model, optimizer, scheduler, loader, normalizer, steps_per_epoch, max_steps, switch)


def rewarm_learning_rate(scheduler: torch.optim.lr_scheduler.LambdaLR, start: int, length: int) -> None:
    """Multiply the schedule by a linear ramp from 0 over `length` scheduler steps from `start` on.

    When the SCM blocks switch on mid-training, the logits jump (S grows by up to (1 + F')^blocks where the
    diffused attention peaks) and the loss with them; AdamW's second moments still hold the small
    gradients of before and turn the new large ones into steps several times the learning rate, which
    threw one phantom run from validation macro F1 0.90 to 0.25 for the rest of training. The SCM phase
    therefore starts like a fine-tuning run: fresh AdamW moments (`train_one_epoch`) and this warmup.
    """

    def ramp(step: int) -> float:
        return 1.0 if step < start else min(1.0, (step - start + 1) / length)

    # ramp(0) = 1 (start > 0), so the learning rate the scheduler already set for step 0 stands.
    scheduler.lr_lambdas = [lambda step, f=f: f(step) * ramp(step) for f in scheduler.lr_lambdas]


def scm_warmup_epochs(args: argparse.Namespace, epochs: int) -> int:
    """The SCM paper trains from an ImageNet-pretrained DeiT, whose attention is meaningful from the first
    step. From scratch, diffusing random attention slows learning (on the phantoms: validation loss 0.84
    against 0.75 after 40 epochs), so the `scratch` recipe runs its first half without the blocks."""
    if args.scm_warmup_epochs is not None:
        return args.scm_warmup_epochs
    return int(epochs * resolve_recipe(args).scm_warmup_fraction)


def train(args, parts: Components, state: TrainState, validation: PreparedSplit, output_dir: Path) -> TrainState:
    """Epoch loop with per-epoch validation, checkpoints, early stopping; restores the best weights."""
    accelerator = parts.accelerator
    epochs = math.ceil(parts.max_steps / parts.steps_per_epoch)
    state.scm_warmup_epochs = parts.scm_warmup_epochs
    progress = tqdm(
        total=parts.max_steps, initial=state.global_step, desc="training", disable=not accelerator.is_local_main_process
    )
    # An epoch whose steps are done but whose validation is not (a run stopped after a step checkpoint)
    # is finished first: its history entry and the early-stopping decision must not be lost.
    while state.epoch < epochs and (state.global_step < parts.max_steps or state.step_in_epoch > 0):
        train_one_epoch(args, parts, state, progress, output_dir)
        metrics = validation_metrics(args, parts, validation)
        metrics.update(epoch=state.epoch, step=state.global_step)
        state.history.append(metrics)
        logger.info("epoch %d: %s", state.epoch, {k: round(v, 4) for k, v in metrics.items()})
        if accelerator.trackers:
            accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=state.global_step)
        score = -metrics["loss"] if args.metric_for_best_model == "loss" else metrics[args.metric_for_best_model]
        if state.best_metric is None or score > state.best_metric:
            state.best_metric, state.best_epoch, state.epochs_without_improvement = score, state.epoch, 0
            if args.early_stopping_patience:
                parts.best_weights = {
                    k: v.detach().cpu().clone() for k, v in accelerator.unwrap_model(parts.model).state_dict().items()
                }
        else:
            state.epochs_without_improvement += 1
        state.epoch += 1
        state.step_in_epoch = 0
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, output_dir, state, parts.best_weights, args.checkpoints_total_limit)
        if args.early_stopping_patience and state.epochs_without_improvement >= args.early_stopping_patience:
            logger.info("early stopping after epoch %d (best: epoch %d)", state.epoch - 1, state.best_epoch)
            break
    progress.close()
    if parts.best_weights is not None and args.early_stopping_patience:
        accelerator.unwrap_model(parts.model).load_state_dict(parts.best_weights)
        logger.info("restored the best weights (epoch %d)", state.best_epoch)
    return state


def train_one_epoch(args, parts: Components, state: TrainState, progress: Any, output_dir: Path) -> None:
    accelerator, model = parts.accelerator, parts.model
    if state.global_step >= parts.max_steps:
        return
    model.train()
    loader = parts.train_loader
    loader.set_epoch(state.epoch)
    batches_done = state.step_in_epoch * args.gradient_accumulation_steps
    if batches_done:
        loader = accelerator.skip_first_batches(loader, batches_done)
    if state.epoch == state.scm_warmup_epochs > 0 and state.step_in_epoch == 0:
        # The SCM phase starts with fresh AdamW moments (see `rewarm_learning_rate`).
        parts.optimizer.optimizer.state.clear()
    for pixels, labels, _ in loader:
        with accelerator.accumulate(model):
            # Every random draw of a step (augmentation, stochastic depth) derives from (seed, step,
            # process), so a resumed run repeats them exactly whatever else used the generator before.
            step_seed = args.seed * 1_000_003 + state.global_step * 7919 + accelerator.process_index
            torch.manual_seed(step_seed)
            if args.augment:
                pixels = augment_batch(pixels, torch.Generator().manual_seed(step_seed))
            run_scm = state.epoch >= state.scm_warmup_epochs
            loss = model(parts.normalizer(pixels), labels=labels, run_scm=run_scm).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            parts.optimizer.step()
            parts.scheduler.step()
            parts.optimizer.zero_grad()
        if accelerator.sync_gradients:
            state.global_step += 1
            state.step_in_epoch += 1
            state.train_losses.append(float(accelerator.gather(loss.detach().reshape(1)).mean()))
            progress.update(1)
            progress.set_postfix(loss=f"{state.train_losses[-1]:.3f}")
            checkpoint_every = args.checkpointing_steps
            if checkpoint_every and checkpoint_every.isdigit() and state.global_step % int(checkpoint_every) == 0:
                save_checkpoint(accelerator, output_dir, state, parts.best_weights, args.checkpoints_total_limit)
            if state.global_step >= parts.max_steps:
                break


# ================================================================================================
# Main
# ================================================================================================


def make_accelerator(args: argparse.Namespace) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration

    report_to = None if args.report_to == "none" else args.report_to
    # Accelerate runs several CPU processes (gloo) only when told it is on CPU.
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=args.cpu or (several and not torch.cuda.is_available()),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir),
        # Pinned batches (make_loader) copied without blocking: the copy overlaps the step on a GPU.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
        # SCM's lambda and beta get no gradient while the blocks are warming up.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def inputs_of_run(args: argparse.Namespace) -> list[Path]:
    """Local paths the run reads: what `--overwrite_output_dir` must never delete."""
    named = [args.model_name_or_path, args.backbone_weights, args.data_dir, args.cache_dir, *args.predict_files]
    return [Path(p) for p in named if p and Path(p).exists()]


def start_run(args: argparse.Namespace) -> tuple[Any, Path]:
    """The Accelerator, logging, the seed and a clean (or resumed) output folder."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(args)
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        if args.overwrite_output_dir and args.do_train and not args.resume_from_checkpoint and output_dir.exists():
            clear_run_outputs(output_dir, inputs_of_run(args))
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    if args.report_to != "none":
        accelerator.init_trackers(
            "run_wsol", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        )
    return accelerator, output_dir


def resume_and_train(args, parts: Components, validation: PreparedSplit, output_dir: Path) -> TrainState:
    """Train from scratch or from the checkpoint `--resume_from_checkpoint` names (with its best weights)."""
    state = TrainState()
    checkpoint = resolve_checkpoint(args)
    if checkpoint is not None:
        state, parts.best_weights = load_checkpoint(parts.accelerator, checkpoint, vars(args))
        logger.info("resumed from %s at step %d", checkpoint, state.global_step)
        if parts.accelerator.is_main_process:
            set_aside_later_checkpoints(output_dir, state.global_step)
        parts.accelerator.wait_for_everyone()
    state.settings = run_settings(vars(args))
    return train(args, parts, state, validation, output_dir)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    accelerator, output_dir = start_run(args)
    processor = build_processor(args)
    results: dict[str, Any] = {"args": dict(vars(args)), "num_processes": accelerator.num_processes}
    splits = prepare_all(args, processor, accelerator) if (args.do_train or args.do_eval) else {}
    model = build_model(args, splits["train"].labels if splits else torch.zeros(0, dtype=torch.long))
    normalizer = PixelNormalizer(processor)
    parts = build_components(args, accelerator, model, splits["train"], normalizer) if splits else None
    state, predictions = TrainState(), {}
    if args.do_train:
        state = resume_and_train(args, parts, splits["validation"], output_dir)
        if accelerator.is_main_process:
            # The trained model is on disk before anything after training can fail.
            save_model(accelerator, parts.model, processor, output_dir)
        results["training"] = {
            "steps": state.global_step,
            "epochs": state.epoch,
            "best_epoch": state.best_epoch,
            "scm_warmup_epochs": state.scm_warmup_epochs,
            "history": state.history,
        }
    if args.do_eval:
        evaluation = final_evaluation(args, parts, splits)
        results.update(evaluation.results)
        predictions = evaluation.predictions
        processor.localization_threshold, processor.localization_map = evaluation.threshold, evaluation.map_output
        # Probabilities leave the model calibrated: the temperature travels in its config.
        accelerator.unwrap_model(parts.model).config.calibration_temperature = evaluation.temperature
    results["environment"] = environment()
    if accelerator.is_main_process and (args.do_train or args.do_eval):
        write_run_outputs(args, accelerator, parts.model, processor, results, state, splits, predictions)
    if args.do_predict and accelerator.is_main_process:
        model_for_prediction = accelerator.unwrap_model(parts.model) if parts else model
        results["predictions"] = predict_files(args, model_for_prediction, processor, output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if args.push_to_hub and accelerator.is_main_process:
        push_to_hub(args, output_dir)
    return results


if __name__ == "__main__":
    main()
