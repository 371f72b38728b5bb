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
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch

from deit_scm_cxr.data.cxr import CLASS_NAMES
from deit_scm_cxr.data.prepare import (
    DataSettings,
    PixelNormalizer,
    build_processor,
    prepare_all,
)
from deit_scm_cxr.errors import WRITE_ERRORS, RunInputError, RunWriteError
from deit_scm_cxr.evaluation.evaluator import EvaluationSettings, final_evaluation
from deit_scm_cxr.evaluation.reporting import environment
from deit_scm_cxr.hub.configuration_deit_scm import SCM_VARIANTS, DeiTSCMConfig
from deit_scm_cxr.hub.modeling_deit_scm import DeiTSCMForImageClassification
from deit_scm_cxr.outputs.card import CardSettings
from deit_scm_cxr.outputs.writer import (
    push_to_hub,
    save_model,
    write_run_outputs,
)
from deit_scm_cxr.predict import predict_files
from deit_scm_cxr.training.arguments import model_fields, parse_args
from deit_scm_cxr.training.checkpoints import (
    LOCK_FILE,
    TrainState,
    acquire_output_lock,
    clear_run_outputs,
    discard_previous_run,
    load_model_folder,
    release_output_lock,
)
from deit_scm_cxr.training.loop import TrainingSettings, build_components, resume_and_train

logger = logging.getLogger("run_wsol")
RECIPE_FILE = "recipe.json"


# ================================================================================================
# Settings: the parsed flags (`arguments.py`) as each module's part
# ================================================================================================


def _settings(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """A module's settings dataclass from the flags of the same names (`given` for the others)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.name not in given}, **given)


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """The model a run trains or loads, resolved once from preset, SCM variant, recipe, flags and
    `--config_overrides` (the class weights wait for the training labels: `class_weights_from`)."""

    model_name_or_path: Optional[str]  # a saved model: its own config, `overrides` applied
    preset: str
    scm_variant: str
    config_fields: Mapping[str, Any]  # a new model's fields beyond the preset
    overrides: Mapping[str, Any]  # --config_overrides
    class_weights: str  # "auto" | "none" | "variant" | "w0,w1,w2"
    backbone_weights: Optional[str]


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
    cpu_threads: int  # 0: the cores this process may use (`cpu_threads_for`)
    mixed_precision: str
    report_to: str
    flags: Mapping[str, Any]
    recipe_values: Mapping[str, Any] = field(default_factory=dict)  # the resolved recipe: recipe.json

    @property
    def output_dir(self) -> Path:
        return Path(self.card.output_dir)

    def inputs(self) -> list[Path]:
        """Local paths the run reads: what `--overwrite_output_dir` must never delete."""
        model, data = self.model, self.data
        named = [model.model_name_or_path, model.backbone_weights, data.data_dir, data.cache_dir, self.recipe,
                 *self.predict_files]  # fmt: skip
        return [Path(p) for p in named if p and Path(p).exists()]


def model_settings(args: argparse.Namespace) -> ModelSettings:
    return ModelSettings(model_name_or_path=args.model_name_or_path, preset=args.preset, scm_variant=args.scm_variant,
                         config_fields=model_fields(args), overrides=args.config_overrides,
                         class_weights=args.class_weights, backbone_weights=args.backbone_weights)  # fmt: skip


def resolve_settings(args: argparse.Namespace) -> RunSettings:
    """The parsed (and checked) flags as the settings each part of the run takes."""
    run_flags = ("recipe", "image_size", "do_train", "do_eval", "do_predict", "resume_from_checkpoint",
                 "overwrite_output_dir", "seed", "cpu", "cpu_threads", "mixed_precision", "report_to")  # fmt: skip
    flags = {k: v for k, v in vars(args).items() if k != "recipe_values"}
    return RunSettings(
        data=_settings(DataSettings, args, report_dir=args.output_dir),
        evaluation=_settings(EvaluationSettings, args, batch_size=args.per_device_eval_batch_size,
                              map_smoothing_sigmas=tuple(args.map_smoothing_sigmas)),
        training=_settings(TrainingSettings, args, lr_step_epochs=tuple(args.lr_step_epochs)),
        card=_settings(CardSettings, args),
        model=model_settings(args),
        predict_files=tuple(args.predict_files),
        flags=flags,
        recipe_values=args.recipe_values,
        **{name: getattr(args, name) for name in run_flags},
    )


def settings_for(*flags: str) -> RunSettings:
    """The settings a run with these command-line flags would use (every default, the recipe, the flags):
    how a library caller or a benchmark gets a module's settings without repeating a default."""
    return resolve_settings(parse_args(list(flags)))


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
        from deit_scm_cxr.convert import load_backbone_weights

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


def cpu_threads_for(requested: int) -> int:
    """The torch threads of a run on CPU: `requested`, or with 0 the cores this process may use, shared among
    this machine's processes (`LOCAL_WORLD_SIZE`).

    Why not torch's own count: `accelerate launch` without a config (the README's command) sets
    OMP_NUM_THREADS=1 on a machine without a GPU unless told `--cpu`, so the default job trained on one core
    of two: 1.4x slower than on both (bench/RESULTS.md, issue 31)."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


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
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads_for(settings.cpu_threads))
        logger.info("training on CPU with %d torch threads", torch.get_num_threads())
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


def cli() -> None:
    """The console script `deit-scm-train` (and `run_wsol.py`, `python -m deit_scm_cxr.training`)."""
    main()


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Parse, run, and turn a refused input (`RunInputError`) into one line and exit status 2."""
    settings = resolve_settings(parse_args(argv))
    try:
        return run(settings)
    except (RunInputError, RunWriteError) as error:
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
        results = _run_in(settings, accelerator, output_dir)
        if accelerator.is_main_process:  # complete: the run --overwrite_output_dir set aside may go now
            discard_previous_run(output_dir)
        return results
    finally:  # the folder is free again however the run ends (a killed run's stale lock is taken over)
        release_output_lock(output_dir / LOCK_FILE)


def _run_in(settings: RunSettings, accelerator: Any, output_dir: Path) -> dict[str, Any]:
    """`run` after the output folder is set up and locked."""
    processor = build_processor(settings.model.model_name_or_path, settings.image_size)
    results: dict[str, Any] = {"args": dict(settings.flags), "num_processes": accelerator.num_processes}
    if accelerator.is_main_process and settings.do_train and settings.recipe_values:
        # The recipe with every value this run used: `--recipe output_dir/recipe.json` trains the same way.
        (output_dir / RECIPE_FILE).write_text(json.dumps(settings.recipe_values, indent=2) + "\n")
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
        processor.localization_smoothing = evaluation.smoothing
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
        results["predictions"] = predict_files(settings.predict_files, model_for_prediction, processor,
                                                     output_dir / "predictions")
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
    cli()
